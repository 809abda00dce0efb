-- Clients (tenants), their rules and endpoints, the notifications we emit and their deliveries.
-- Applied by `alerting-app migrate`, which records each file in schema_migrations.

CREATE TABLE clients (
    client_id     uuid PRIMARY KEY,
    name          text NOT NULL CHECK (length(name) BETWEEN 1 AND 200),
    -- sha256 of the client's API key; the key itself is shown once, at creation.
    api_key_hash  text NOT NULL UNIQUE,
    created_at    timestamptz NOT NULL DEFAULT now(),
    updated_at    timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE rules (
    rule_id     uuid PRIMARY KEY,
    client_id   uuid NOT NULL REFERENCES clients ON DELETE CASCADE,
    severity    text NOT NULL CHECK (severity IN ('LOW', 'MEDIUM', 'HIGH', 'CRITICAL', '*')),
    source      text NOT NULL CHECK (length(source) BETWEEN 1 AND 200),
    name        text NOT NULL CHECK (length(name) BETWEEN 1 AND 200),
    enabled     boolean NOT NULL DEFAULT true,
    version     integer NOT NULL DEFAULT 1 CHECK (version >= 1),
    created_at  timestamptz NOT NULL DEFAULT now(),
    updated_at  timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT rules_not_all_wildcards CHECK (NOT (severity = '*' AND source = '*' AND name = '*')),
    CONSTRAINT rules_unique_criteria UNIQUE (client_id, severity, source, name)
);
CREATE INDEX rules_client_idx ON rules (client_id, created_at, rule_id);

CREATE TABLE endpoints (
    endpoint_id  uuid PRIMARY KEY,
    rule_id      uuid NOT NULL REFERENCES rules ON DELETE CASCADE,
    client_id    uuid NOT NULL REFERENCES clients ON DELETE CASCADE,
    type         text NOT NULL CHECK (type IN ('webhook', 'slack', 'email')),
    value        text NOT NULL CHECK (length(value) BETWEEN 1 AND 2000),
    enabled      boolean NOT NULL DEFAULT true,
    created_at   timestamptz NOT NULL DEFAULT now(),
    updated_at   timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX endpoints_rule_idx ON endpoints (rule_id);
CREATE INDEX endpoints_client_idx ON endpoints (client_id, created_at, endpoint_id);

-- Rule changes to publish on rule.changed, written in the same transaction as the change, so a
-- change the API accepted reaches the workers even if the broker was down at that moment.
CREATE TABLE rule_outbox (
    outbox_id   bigserial PRIMARY KEY,
    rule_id     uuid NOT NULL,
    payload     jsonb NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE notifications (
    notification_id  uuid PRIMARY KEY,
    client_id        uuid NOT NULL REFERENCES clients ON DELETE CASCADE,
    alert_id         text NOT NULL,
    alerts           jsonb NOT NULL,
    rule_ids         uuid[] NOT NULL,
    status           text NOT NULL DEFAULT 'PENDING'
                     CHECK (status IN ('PENDING', 'SENT', 'FAILED', 'SUPPRESSED', 'SILENCED')),
    detail           text,
    -- Set once notifications.ready has been acknowledged by the broker; until then a redelivered
    -- alerts.matched message re-emits it (the deliver stage is idempotent per endpoint).
    emitted          boolean NOT NULL DEFAULT false,
    created_at       timestamptz NOT NULL DEFAULT now(),
    updated_at       timestamptz NOT NULL DEFAULT now(),
    -- The durable deduplication boundary: one notification per client and alert.
    CONSTRAINT notifications_once_per_client_alert UNIQUE (client_id, alert_id)
);
CREATE INDEX notifications_client_idx ON notifications (client_id, created_at DESC, notification_id);
CREATE INDEX notifications_status_idx ON notifications (status, created_at DESC);

CREATE TABLE deliveries (
    notification_id   uuid NOT NULL REFERENCES notifications ON DELETE CASCADE,
    endpoint_id       uuid NOT NULL,
    channel           text NOT NULL,
    status            text NOT NULL CHECK (status IN ('PENDING', 'SENT', 'FAILED', 'UNSUPPORTED')),
    attempts          integer NOT NULL DEFAULT 0,
    last_error        text,
    first_attempt_at  timestamptz,
    last_attempt_at   timestamptz,
    PRIMARY KEY (notification_id, endpoint_id)
);
