-- The fingerprint a SUPPRESSED notification repeated (docs/grouping.md, repeat suppression). A group
-- member silenced when its group closes was notified to nobody, so the repeats of its fingerprint it
-- suppressed meanwhile must not stay lost: the closer finds them by this column (the partial index:
-- a client's suppressed repeats of one fingerprint since the member joined) and notifies the first
-- no silence mutes. NULL on every other row, and on one suppressed before this migration. Nullable,
-- without a default: adding it rewrites no row.
ALTER TABLE notifications ADD COLUMN fingerprint text;
CREATE INDEX notifications_suppressed_fingerprint_idx ON notifications (client_id, fingerprint, created_at)
    WHERE status = 'SUPPRESSED';
