-- What each outbox relay has handed to the broker and not yet seen through (agents/rule_outbox.py):
-- the keys of its batch, recorded and committed before the first send, and deleted in the
-- transaction that deletes the batch's rows. A relay that loses its Postgres session loses its
-- lock with it, and its sends still on their way can land after the next relay's newer versions
-- of the same keys; one killed (or stopped) before it queues those keys again leaves this row,
-- and the relay that finds it once nothing of those sends can still be on its way queues each
-- key's current version (or remembered deletion) again, to come last on the compacted topic.
CREATE TABLE outbox_in_flight (
    in_flight_id  bigserial PRIMARY KEY,
    outbox        text NOT NULL,
    keys          uuid[] NOT NULL,
    recorded_at   timestamptz NOT NULL DEFAULT now()
);
