-- How far back a worker's rule store must have read `rule.changed` to be trusted at start
-- (tables/rule_replica.py `outdated`). Retention forgets a deletion, and queues the null record that
-- lets compaction remove its delete, only once the deletion is older than its worker's
-- DELETED_RULE_RETENTION_DAYS (agents/retention.py). A store stopped before such a delete was
-- relayed may find the delete and the null both compacted away, and would match the rule for ever.
-- Every deletion forgotten so far was relayed before `relayed_before`: retention records it in the
-- transaction that forgets, whatever its setting, and every worker reads it, whatever its own, so
-- the check no longer assumes that all workers have the same setting. One row per deletions table
-- (`deleted_rules`, `deleted_silences`; silence replicas keep no store and read none).
CREATE TABLE forgotten_deletions (
    deletions       text PRIMARY KEY,
    relayed_before  timestamptz NOT NULL
);
