-- What the closer needs to decide a muted group member's repeats again as the agent decides any
-- repeat (docs/grouping.md, Suppression): a member silenced when its group closes was notified to
-- nobody, so the fingerprint's notification before it is the one its repeats are compared with, each
-- over its own repeat interval. All nullable, without a default: adding them rewrites no row, and a
-- row a release before this one wrote (NULL) is decided as that release decided it.

-- The time of the fingerprint's notification before the member (NULL: none, or the member was
-- recorded by a release before this one), and whether that notification was final as the member
-- joined: made at once, a repeat notified at close, or a member of a group closed with it notified;
-- not a member of a group still open, which a silence may yet mute (NULL: not known to be final).
ALTER TABLE notification_alerts ADD COLUMN fingerprint_previous_at timestamptz,
                                ADD COLUMN fingerprint_previous_final boolean;

-- The repeat interval a SUPPRESSED notification was suppressed within (the shortest of its rules').
-- NULL on every other row, and on one suppressed before this migration.
ALTER TABLE notifications ADD COLUMN repeat_interval_s integer;

-- Whether the notification `last_notified_at` records is final: `notified_in_group` is the group of
-- the member whose joining wrote it (final once that group is closed: a member muted at close has
-- its time taken back), NULL for a notification final when made; `notified_as_of` is the
-- last_notified_at they describe. A release before this one writes last_notified_at alone, so a row
-- where the two times differ is not known to be final.
ALTER TABLE fingerprints ADD COLUMN notified_in_group uuid, ADD COLUMN notified_as_of timestamptz;
