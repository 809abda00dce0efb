-- An outbox row without a payload is relayed as a Kafka tombstone (a null value) for its key.
-- Retention queues one when it forgets a deletion (agents/retention.py): it follows the key's
-- delete event on the compacted topic, replicas then forget the key, and compaction removes the
-- delete (and, after the topic's delete.retention.ms, the tombstone itself).
ALTER TABLE rule_outbox ALTER COLUMN payload DROP NOT NULL;
ALTER TABLE silence_outbox ALTER COLUMN payload DROP NOT NULL;
