-- Grouping and repeat suppression (issue 5): per-rule settings carried by rule.changed to every
-- evaluator, which stamps the group rule's values on each alerts.matched (docs/contracts.md).
-- The bounds are contracts.Rule's; the API validates them first and names the field, these checks
-- keep rows written outside the API (bulk loaders, psql) within what the contract accepts.
-- Existing rows take the defaults: no grouping, no suppression, exactly as before.
ALTER TABLE rules
    -- Seconds alerts are collected into one notification; 0 notifies at once.
    ADD COLUMN group_window_s integer NOT NULL DEFAULT 0
        CONSTRAINT rules_group_window_s_range CHECK (group_window_s BETWEEN 0 AND 86400),
    -- Seconds within which an alert with the same fingerprint is suppressed; 0 never suppresses.
    ADD COLUMN repeat_interval_s integer NOT NULL DEFAULT 0
        CONSTRAINT rules_repeat_interval_s_range CHECK (repeat_interval_s BETWEEN 0 AND 604800),
    -- Context keys that join severity, source and name in the repeat fingerprint.
    ADD COLUMN fingerprint_keys text[] NOT NULL DEFAULT '{}'
        CONSTRAINT rules_fingerprint_keys_valid
        CHECK (cardinality(fingerprint_keys) <= 20
               AND array_position(fingerprint_keys, NULL) IS NULL
               AND '' <> ALL (fingerprint_keys));
