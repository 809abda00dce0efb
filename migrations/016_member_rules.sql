-- The rules a group member matched (docs/grouping.md). A group's notification goes to the endpoints
-- of its rule_ids; a member silenced when its group closes is notified to nobody, so its rules are
-- left out of them unless a member no silence muted matched them too. NULL: the member joined
-- before this migration, and counts as matching every rule of its group. Nullable, without a
-- default: adding it rewrites no row.
ALTER TABLE notification_alerts ADD COLUMN rule_ids uuid[];
