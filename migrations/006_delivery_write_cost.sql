-- Fewer index entries written per delivery (issue 4, throughput). Measured with pg_stat_statements
-- on bench/deliveries.py: settling notifications was the costliest statement, most of it index
-- maintenance, because every change of a notification's status wrote a new entry into each of its
-- four indexes.

-- Nothing looks deliveries up by leased_by (leases are renewed and released by key), yet every
-- PENDING row paid for this index at insert.
DROP INDEX IF EXISTS deliveries_lease_idx;

-- An index on status kept every status change from being a HOT update (a new row version on the
-- same page, no index entries). The admin list it served filters on status while reading newest
-- first; this index gives that order without mentioning status. The client's list keeps
-- notifications_client_idx.
DROP INDEX IF EXISTS notifications_status_idx;
-- Built in the migration's transaction, so not CONCURRENTLY: on a large notifications table it holds
-- up writes to it while it builds; apply it at a quiet time.
CREATE INDEX IF NOT EXISTS notifications_created_idx ON notifications (created_at DESC, notification_id);

-- Room on each page for the updated versions of its rows (settled, emitted), so that those
-- updates can be HOT. Applies to pages written from now on.
ALTER TABLE notifications SET (fillfactor = 70);
