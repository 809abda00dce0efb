-- The aggregate stage's durable state for issue 5: grouped notifications, their members, and the
-- fingerprints repeat suppression compares with (docs/grouping.md).

-- A grouped notification lists at most GROUP_MAX_ALERTS alerts and counts the rest here; its
-- group_rule_id is the rule whose window collected it (NULL: notified at once). IF NOT EXISTS:
-- the API's migration may add the same columns.
ALTER TABLE notifications
    ADD COLUMN IF NOT EXISTS truncated_alerts integer NOT NULL DEFAULT 0 CHECK (truncated_alerts >= 0),
    ADD COLUMN IF NOT EXISTS group_rule_id uuid;

-- Every alert that joined a group, with the group's notification (fixed when the group opened).
-- With notifications' own UNIQUE (client_id, alert_id) this keeps each alert notified to a client
-- at most once, grouped or not. A member whose notification row does not exist yet belongs to a
-- group still open; only once that row exists is the membership final.
CREATE TABLE notification_alerts (
    client_id        uuid NOT NULL REFERENCES clients ON DELETE CASCADE,
    alert_id         text NOT NULL,
    notification_id  uuid NOT NULL,
    joined_at        timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (client_id, alert_id)
);
CREATE INDEX notification_alerts_notification_idx ON notification_alerts (notification_id);

-- When an alert with this fingerprint was last notified to the client (at once, or by joining a
-- group). Written in the same transaction as that notification or membership, so a crash cannot
-- suppress an alert on behalf of one never notified.
CREATE TABLE fingerprints (
    client_id         uuid NOT NULL REFERENCES clients ON DELETE CASCADE,
    fingerprint       text NOT NULL,
    last_notified_at  timestamptz NOT NULL,
    PRIMARY KEY (client_id, fingerprint)
);
