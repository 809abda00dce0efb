-- Delivery that tenants can trust (issue 4): signed webhooks, per-endpoint rate limits, and
-- durable delivery state that any worker can resume.

-- The HMAC key of an endpoint's X-Alerting-Signature. Stored in clear because signing needs it;
-- the API shows it once, at creation. The default (two v4 UUIDs, 244 random bits from Postgres's
-- strong random source) also fills existing rows and rows inserted by bulk loaders.
ALTER TABLE endpoints
    ADD COLUMN secret text NOT NULL
        DEFAULT (replace(gen_random_uuid()::text, '-', '') || replace(gen_random_uuid()::text, '-', '')),
    -- NULL: ENDPOINT_RATE_LIMIT_PER_S applies.
    ADD COLUMN rate_limit_per_s double precision CHECK (rate_limit_per_s > 0);

-- A delivery row is written PENDING before its notifications.ready message is acknowledged, so
-- the row, not the Kafka offset, is what keeps a delivery alive across restarts. A worker works on
-- a row only while it holds its lease; an expired lease lets any worker resume it.
ALTER TABLE deliveries
    ADD COLUMN created_at timestamptz NOT NULL DEFAULT now(),
    ADD COLUMN next_attempt_at timestamptz NOT NULL DEFAULT now(),
    ADD COLUMN leased_by text,
    ADD COLUMN lease_until timestamptz;

CREATE INDEX deliveries_due_idx ON deliveries (next_attempt_at) WHERE status = 'PENDING';
CREATE INDEX deliveries_lease_idx ON deliveries (leased_by) WHERE status = 'PENDING';
