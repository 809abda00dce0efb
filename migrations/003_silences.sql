-- Silences (issue 5): a tenant mutes its matching alerts between starts_at and ends_at. Matched
-- alerts are still recorded (status SILENCED), only not delivered.

CREATE TABLE silences (
    silence_id        uuid PRIMARY KEY,
    client_id         uuid NOT NULL REFERENCES clients ON DELETE CASCADE,
    -- Matchers as for rules: an exact value or '*'.
    severity          text NOT NULL CHECK (severity IN ('LOW', 'MEDIUM', 'HIGH', 'CRITICAL', '*')),
    source            text NOT NULL CHECK (length(source) BETWEEN 1 AND 200),
    name              text NOT NULL CHECK (length(name) BETWEEN 1 AND 200),
    -- {context key: exact value, or '*' for "the key is present"}.
    context_matchers  jsonb NOT NULL DEFAULT '{}' CHECK (jsonb_typeof(context_matchers) = 'object'),
    starts_at         timestamptz NOT NULL,
    -- Equal to starts_at only when a silence was expired before it started: the API refuses a
    -- new silence whose window is empty.
    ends_at           timestamptz NOT NULL,
    comment           text NOT NULL CHECK (length(comment) BETWEEN 1 AND 1000),
    created_by        text NOT NULL CHECK (length(created_by) BETWEEN 1 AND 200),
    version           integer NOT NULL DEFAULT 1 CHECK (version >= 1),
    created_at        timestamptz NOT NULL DEFAULT now(),
    updated_at        timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT silences_window CHECK (ends_at >= starts_at),
    -- A silence that matches everything of the tenant is refused: that is what disabling rules is for.
    CONSTRAINT silences_not_everything
        CHECK (NOT (severity = '*' AND source = '*' AND name = '*' AND context_matchers = '{}'))
);
CREATE INDEX silences_client_idx ON silences (client_id, created_at, silence_id);

-- Silence changes to publish on silence.changed, written in the same transaction as the change;
-- relayed by the same relay as rule_outbox (agents/rule_outbox.py).
CREATE TABLE silence_outbox (
    outbox_id   bigserial PRIMARY KEY,
    silence_id  uuid NOT NULL,
    payload     jsonb NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now()
);
