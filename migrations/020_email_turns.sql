-- Email is leased round-robin per tenant (docs/delivery.md, "No head-of-line blocking"): every
-- tenant's email waits for the one all-email rate, and a worker holds only what that rate sends in
-- 10 s, the rest waiting in Postgres. Leased oldest first from deliveries_due_idx, one tenant's storm
-- of queued email kept every other tenant's first email waiting behind all of it. The sweep now
-- finds the endpoints with email waiting by this index, one probe each, and reads each one's oldest
-- due rows. Partial: a webhook's or Slack's row writes no entry in it (an email row writes one here
-- and one in deliveries_due_idx, which a release before this one still reads its email from).
-- Built in the migration's transaction, so not CONCURRENTLY: on a large deliveries table it holds
-- up writes to it while it builds; apply it at a quiet time.
CREATE INDEX deliveries_email_idx ON deliveries (endpoint_id, next_attempt_at)
    WHERE status = 'PENDING' AND channel = 'email';
