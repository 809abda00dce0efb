-- What a close muted (docs/grouping.md, Suppression): a group member a silence muted when its group
-- closed was notified to nobody, and so may be one that a member of its fingerprint muted at another
-- close (groups of different windows) counted as a later notification. The closer finds a
-- fingerprint's members by the first index, and those whose repeats are still to decide by the
-- second (few: a member is marked so while a member of a group still open stands after it, and stays
-- so, harmlessly, until its fingerprint is next muted at a close or retention deletes it).

-- NULL: not known to be muted at close (notified, still open, or closed by a release before this
-- one), which counts as reaching the client; false: muted, the repeats it suppressed not decided
-- again yet (a later member of a group still open may yet reach the client); true: muted, its
-- repeats decided again, or never to be (a later notification reached the client). Nullable,
-- without a default: adding it rewrites no row.
ALTER TABLE notification_alerts ADD COLUMN muted_repeats_decided boolean;

CREATE INDEX notification_alerts_fingerprint_idx ON notification_alerts (client_id, fingerprint, fingerprint_notified_at)
    WHERE fingerprint IS NOT NULL;
CREATE INDEX notification_alerts_undecided_idx ON notification_alerts (client_id, fingerprint)
    WHERE muted_repeats_decided = false;
