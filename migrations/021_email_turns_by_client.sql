-- The sweep's email turns are per tenant (020_email_turns.sql), and it found them per endpoint: a
-- probe of deliveries_email_idx for every endpoint with PENDING email and a read of up to the
-- worker's email room of each one's rows, with a lookup of each row's client. In a storm over many
-- endpoints (28,800, each with email queued) that was every sweep of every worker, every second,
-- reading hundreds of thousands of rows (bench/email_sweep.py, docs/performance.md). With the
-- client on the row, the sweep probes once per tenant with email waiting and reads of each no more
-- than its email room, oldest first, across all its endpoints.
-- client_id is set only where the sweep needs it (a PENDING email row); it is the notification's
-- client, set by this trigger on insert and when a row becomes PENDING again (a redelivery), so a
-- release before this one, which does not write it, leaves no email the sweep cannot find.
ALTER TABLE deliveries ADD COLUMN client_id uuid;

CREATE FUNCTION deliveries_client_of_email() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    NEW.client_id := (SELECT n.client_id FROM notifications n WHERE n.notification_id = NEW.notification_id);
    RETURN NEW;
END
$$;

CREATE TRIGGER deliveries_client_of_email BEFORE INSERT OR UPDATE OF status, channel ON deliveries
    FOR EACH ROW WHEN (NEW.client_id IS NULL AND NEW.status = 'PENDING' AND NEW.channel = 'email')
    EXECUTE FUNCTION deliveries_client_of_email();

UPDATE deliveries d SET client_id = n.client_id FROM notifications n
WHERE n.notification_id = d.notification_id AND d.status = 'PENDING' AND d.channel = 'email';

-- Built in the migration's transaction, as 020's was: on a large deliveries table it holds up
-- writes to it while it builds. deliveries_email_idx was read by no release but 020's, never
-- released: this one replaces it.
CREATE INDEX deliveries_email_client_idx ON deliveries (client_id, next_attempt_at)
    WHERE status = 'PENDING' AND channel = 'email';
DROP INDEX deliveries_email_idx;

-- The other rows' candidates are read oldest first from deliveries_due_idx leaving email out: in a
-- storm, each sweep read every due email row to find the webhooks behind it (the whole queue, 0.2 s
-- and more a sweep at 576,000 emails: docs/delivery.md, The sweep's cost). This index holds the
-- other rows only. deliveries_due_idx stays for a release before 020, which reads email from it.
CREATE INDEX deliveries_other_due_idx ON deliveries (next_attempt_at)
    WHERE status = 'PENDING' AND channel <> 'email';
