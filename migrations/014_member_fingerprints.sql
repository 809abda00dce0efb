-- The fingerprint a group member counted as notified when it joined its group (docs/grouping.md,
-- repeat suppression), and the time it wrote to `fingerprints` then. A member silenced when its group
-- closes was notified to nobody: its fingerprint is forgotten, if that time is still the one
-- `fingerprints` holds, so that it suppresses no repeat once the silence ended, as a match silenced
-- when it is matched suppresses none. NULL: the member's rules do not suppress repeats (or it joined
-- before this migration). Nullable, without a default: adding them rewrites no row.
ALTER TABLE notification_alerts ADD COLUMN fingerprint text, ADD COLUMN fingerprint_notified_at timestamptz;
