-- The members of a group that a silence muted when the group closed and that its notification does
-- not list (docs/grouping.md): notified to nobody, they are otherwise found nowhere, as a group with
-- unmuted members is notified PENDING without them. `silenced_alerts` lists up to GROUP_MAX_ALERTS of
-- them, `[{"alert_id": ..., "silence_id": ...}]` in the order they joined (the silence: the smallest
-- silence_id in force that matched it, as a silenced match's detail names one);
-- `truncated_silenced_alerts` counts the rest. Written once, by the closer, with the group's
-- notification; NULL on a notification not of a group, and on a group closed by a release before
-- this one (not known). Nullable, without a default: adding them rewrites no row, and an older
-- worker's insert, which names neither, still works during a rolling deployment.
ALTER TABLE notifications ADD COLUMN silenced_alerts jsonb;
ALTER TABLE notifications ADD COLUMN truncated_silenced_alerts integer;
