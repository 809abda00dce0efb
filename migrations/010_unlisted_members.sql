-- The alert of a group member its group's listing had no room for (past GROUP_MAX_ALERTS or the
-- listing's byte budget; docs/grouping.md), so that the closer can check it against the silences in
-- force and list it in a place a silenced alert freed. NULL for a listed member: its alert is in the
-- group table. At most MAX_LISTED_BYTES as the table encodes it (tables/groups.py): a larger alert
-- is kept without its context. Nullable, without a default: adding it rewrites no row.
ALTER TABLE notification_alerts ADD COLUMN unlisted_alert jsonb;
