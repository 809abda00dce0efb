-- Every rule and silence deleted, with the version of its delete event. `republish-rules` and
-- `republish-silences` queue these deletions along with what exists: a topic filled again from
-- Postgres (a new cluster, a recreated topic) must carry the deletion of a rule that a worker's
-- replica still holds, or whose upsert reached that topic while its deletion did not (two copies
-- relaying during a blue/green switch, docs/operations.md). Kept as long as the topics keep their
-- deletion markers: for ever. No foreign key: the client may be gone with its rules.
CREATE TABLE deleted_rules (
    rule_id     uuid PRIMARY KEY,
    client_id   uuid NOT NULL,
    version     integer NOT NULL CHECK (version >= 1),
    deleted_at  timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE deleted_silences (
    silence_id  uuid PRIMARY KEY,
    client_id   uuid NOT NULL,
    version     integer NOT NULL CHECK (version >= 1),
    deleted_at  timestamptz NOT NULL DEFAULT now()
);
