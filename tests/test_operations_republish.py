"""`alerting-app republish-silences`: after silence.changed was recreated or emptied, every silence
in Postgres, and the deletion of every silence deleted, is queued again for it (as
`republish-rules` does for rules)."""
from __future__ import annotations

import os
import subprocess
import uuid

import asyncpg

from agents.rule_outbox import record_silence_deleted
from alerting_app.db import init_connection
from alerting_app.migrate import apply_migrations
from alerting_app.up import alerting_app_executable


async def test_republish_silences_queues_every_silence_at_its_current_version(empty_database):
    await apply_migrations(empty_database)
    client_id, silence_id, deleted_id = uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
    conn = await asyncpg.connect(empty_database)
    await init_connection(conn)  # the jsonb codec, as the app's pool has it
    try:
        await conn.execute("INSERT INTO clients (client_id, name, api_key_hash) VALUES ($1, 'acme', 'hash')", client_id)
        await conn.execute(
            "INSERT INTO silences (silence_id, client_id, severity, source, name, starts_at, ends_at, comment,"
            " created_by, version) VALUES ($1, $2, 'HIGH', 'payments', '*', now(), now() + interval '1 hour',"
            " 'maintenance', 'ops', 3)", silence_id, client_id)
        async with conn.transaction():  # as deleting its client does (web/silences.py)
            await record_silence_deleted(conn, str(deleted_id), str(uuid.uuid4()), 4)
        await conn.execute("DELETE FROM silence_outbox")  # relayed long ago, to a topic since lost

        result = subprocess.run([alerting_app_executable(), "republish-silences"],
                                env={**os.environ, "DATABASE_URL": empty_database},
                                capture_output=True, text=True, timeout=120)

        assert result.returncode == 0, result.stderr
        assert "queued 2 events" in result.stdout
        rows = await conn.fetch("SELECT silence_id, payload FROM silence_outbox ORDER BY outbox_id")
        assert [row["silence_id"] for row in rows] == [silence_id, deleted_id]
        assert [(row["payload"]["action"], row["payload"]["version"]) for row in rows] == [
            ("upsert", 3), ("delete", 5)]
    finally:
        await conn.close()


async def test_republishing_one_rule_or_one_silence_says_one_event(empty_database):
    # It said "queued 1 events".
    await apply_migrations(empty_database)
    client_id = uuid.uuid4()
    conn = await asyncpg.connect(empty_database)
    try:
        await conn.execute("INSERT INTO clients (client_id, name, api_key_hash) VALUES ($1, 'acme', 'hash')", client_id)
        await conn.execute("INSERT INTO rules (rule_id, client_id, severity, source, name) "
                           "VALUES ($1, $2, 'HIGH', 'payments', '*')", uuid.uuid4(), client_id)
        await conn.execute(
            "INSERT INTO silences (silence_id, client_id, severity, source, name, starts_at, ends_at, comment,"
            " created_by) VALUES ($1, $2, 'HIGH', 'payments', '*', now(), now() + interval '1 hour',"
            " 'maintenance', 'ops')", uuid.uuid4(), client_id)
    finally:
        await conn.close()

    said = {}
    for command in ("republish-rules", "republish-silences"):
        result = subprocess.run([alerting_app_executable(), command],
                                env={**os.environ, "DATABASE_URL": empty_database}, capture_output=True, text=True,
                                timeout=120)
        assert result.returncode == 0, result.stderr
        said[command] = result.stdout.split(" (")[0]

    assert said == {"republish-rules": "queued 1 event", "republish-silences": "queued 1 event"}
