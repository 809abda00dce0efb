-- An outbox row marked `tombstone` is relayed as a Kafka tombstone (a null value) for its key.
-- Retention queues one when it forgets a deletion (agents/retention.py): it follows the key's
-- delete event on the compacted topic, replicas then forget the key, and compaction removes the
-- delete (and, after the topic's delete.retention.ms, the tombstone itself). Its payload is the
-- key's delete event, which a relay of an earlier release (a rolling deployment, a rollback) sends
-- instead: a delete every replica ignores by its version, not a JSON null each would dead-letter.
ALTER TABLE rule_outbox ADD COLUMN tombstone boolean NOT NULL DEFAULT false;
ALTER TABLE silence_outbox ADD COLUMN tombstone boolean NOT NULL DEFAULT false;
