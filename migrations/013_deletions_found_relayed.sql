-- When a retention round first found each deletion relayed (its key neither in its outbox nor in a
-- batch in flight): its delete event was on the topic by then (agents/retention.py). Forgetting a
-- deletion records this time, not its deleted_at plus a round, in `forgotten_deletions.relayed_before`
-- (migrations/012): that sum assumed a round every RETENTION_INTERVAL_S while the delete waited, and a
-- delete relayed after the rounds had stopped (the aggregate workers down along with the relay) was
-- forgotten with a time before its relay, so a rule store that had read the topic in between, and
-- missed the delete, was trusted. NULL: not found relayed yet; a deletion is forgotten only once it was.
ALTER TABLE deleted_rules ADD COLUMN relayed_by timestamptz;
ALTER TABLE deleted_silences ADD COLUMN relayed_by timestamptz;
-- Deletions made before this migration and relayed already keep the time they had (their deleted_at,
-- to which the round is added): found relayed now, every rule store stopped before now would be
-- rebuilt once the first of them is forgotten.
UPDATE deleted_rules SET relayed_by = deleted_at
WHERE rule_id NOT IN (SELECT rule_id FROM rule_outbox)
  AND rule_id NOT IN (SELECT unnest(keys) FROM outbox_in_flight WHERE outbox = 'rule_outbox');
UPDATE deleted_silences SET relayed_by = deleted_at
WHERE silence_id NOT IN (SELECT silence_id FROM silence_outbox)
  AND silence_id NOT IN (SELECT unnest(keys) FROM outbox_in_flight WHERE outbox = 'silence_outbox');
-- Each round looks up those not found relayed yet: normally the few made since the last round.
CREATE INDEX deleted_rules_not_found_relayed_idx ON deleted_rules (rule_id) WHERE relayed_by IS NULL;
CREATE INDEX deleted_silences_not_found_relayed_idx ON deleted_silences (silence_id) WHERE relayed_by IS NULL;
