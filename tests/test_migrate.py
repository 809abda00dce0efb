"""Migrations apply each file once, in numeric order, and refuse an applied file that changed."""
from __future__ import annotations

import asyncio
import shutil
from pathlib import Path

import asyncpg
import pytest

from alerting_app.migrate import MigrationError, apply_migrations, default_migrations_dir, naming_the_server

APP_TABLES = {"clients", "rules", "endpoints", "rule_outbox", "notifications", "deliveries"}


async def _fetch(url: str, sql: str) -> list[asyncpg.Record]:
    conn = await asyncpg.connect(url)
    try:
        return await conn.fetch(sql)
    finally:
        await conn.close()


def _copy_of_migrations(tmp_path: Path) -> Path:
    folder = tmp_path / "migrations"
    shutil.copytree(default_migrations_dir(), folder)
    return folder


async def test_fresh_database_gets_every_migration_then_none(empty_database):
    every_file = sorted(path.stem for path in default_migrations_dir().glob("*.sql"))

    first = await apply_migrations(empty_database)
    second = await apply_migrations(empty_database)

    assert first == every_file
    assert second == []
    tables = {row["tablename"] for row in await _fetch(empty_database, "SELECT tablename FROM pg_tables")}
    assert APP_TABLES <= tables
    recorded = await _fetch(empty_database, "SELECT name, checksum, applied_at FROM schema_migrations")
    assert sorted(row["name"] for row in recorded) == every_file
    assert all(len(row["checksum"]) == 64 and row["applied_at"] for row in recorded)


async def test_changed_applied_migration_is_refused(empty_database, tmp_path):
    folder = _copy_of_migrations(tmp_path)
    await apply_migrations(empty_database, folder)
    initial = folder / "001_initial.sql"
    initial.write_text(initial.read_text() + "\nCREATE TABLE sneaked_in (id int);\n")

    with pytest.raises(MigrationError, match="001_initial.sql was changed"):
        await apply_migrations(empty_database, folder)

    tables = {row["tablename"] for row in await _fetch(empty_database, "SELECT tablename FROM pg_tables")}
    assert "sneaked_in" not in tables


async def test_new_migration_is_applied_after_the_existing_ones(empty_database, tmp_path):
    folder = _copy_of_migrations(tmp_path)
    await apply_migrations(empty_database, folder)
    (folder / "999_add_note.sql").write_text("ALTER TABLE clients ADD COLUMN note text;")

    assert await apply_migrations(empty_database, folder) == ["999_add_note"]
    columns = await _fetch(
        empty_database,
        "SELECT 1 FROM information_schema.columns WHERE table_name = 'clients' AND column_name = 'note'",
    )
    assert len(columns) == 1


async def test_files_run_in_numeric_not_alphabetical_order(empty_database, tmp_path):
    folder = tmp_path / "migrations"
    folder.mkdir()
    (folder / "10_second.sql").write_text("INSERT INTO steps VALUES ('10_second');")  # needs 2_first
    (folder / "2_first.sql").write_text("CREATE TABLE steps (name text);")

    assert await apply_migrations(empty_database, folder) == ["2_first", "10_second"]


async def test_failing_migration_leaves_no_trace(empty_database, tmp_path):
    folder = tmp_path / "migrations"
    folder.mkdir()
    (folder / "1_broken.sql").write_text("CREATE TABLE half (id int); SELECT no_such_function();")

    with pytest.raises(MigrationError, match=r"^1_broken\.sql failed, nothing of it applied: UndefinedFunctionError"):
        await apply_migrations(empty_database, folder)

    assert await _fetch(empty_database, "SELECT 1 FROM pg_tables WHERE tablename = 'half'") == []
    assert await _fetch(empty_database, "SELECT 1 FROM schema_migrations") == []


async def test_concurrent_runs_apply_each_file_once(empty_database):
    results = await asyncio.gather(*(apply_migrations(empty_database) for _ in range(3)))

    every_file = sorted(path.stem for path in default_migrations_dir().glob("*.sql"))
    assert sorted(results, key=len) == [[], [], every_file]


def test_badly_named_file_is_refused(tmp_path):
    (tmp_path / "initial.sql").write_text("SELECT 1;")

    with pytest.raises(MigrationError, match="NNN_name.sql"):
        asyncio.run(apply_migrations("postgresql://unused", tmp_path))


def test_a_folder_without_migrations_is_refused_not_reported_up_to_date(tmp_path):
    # `alerting-app migrate` printed "schema is up to date" having applied nothing; the workers
    # then waited for a schema that never came.
    with pytest.raises(MigrationError, match=f"no migration files in {tmp_path}"):
        asyncio.run(apply_migrations("postgresql://unused", tmp_path))



def test_a_migrations_dir_that_is_a_file_is_refused_as_not_a_folder(tmp_path):
    # It was refused as a folder that "does not exist", naming a file that does.
    (tmp_path / "migrations").write_text("")

    with pytest.raises(MigrationError, match=f"migrations folder {tmp_path / 'migrations'} is not a folder"):
        asyncio.run(apply_migrations("postgresql://unused", tmp_path / "migrations"))

@pytest.mark.parametrize(("name", "content", "refusal"), [
    # Each failed with a traceback: the insert into schema_migrations (an integer), or the decoding.
    ("2147483648_big.sql", b"SELECT 1;", "2147483648_big.sql: a version number is at most 2147483647"),
    ("009_latin1.sql", "SELECT 'caf\u00e9';".encode("latin-1"), "009_latin1.sql: not UTF-8 text"),
])
def test_a_file_that_cannot_be_a_migration_is_refused_naming_it(tmp_path, name, content, refusal):
    (tmp_path / name).write_bytes(content)

    with pytest.raises(MigrationError, match=refusal):
        asyncio.run(apply_migrations("postgresql://unused", tmp_path))


async def test_a_postgres_that_never_answers_is_named_when_the_connection_times_out():
    # asyncpg's TimeoutError has no message: `migrate` ended, after a minute, in "migrate failed: ".
    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()  # accepts, and never answers

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    url = f"postgresql://alerting@127.0.0.1:{server.sockets[0].getsockname()[1]}/alerting"
    try:
        with pytest.raises(TimeoutError) as refused:
            with naming_the_server(url):
                await asyncpg.connect(url, timeout=1)
    finally:
        server.close()

    assert str(refused.value) == f"Postgres at {url} (DATABASE_URL): no answer to the connection in time"


async def test_deletions_relayed_before_migration_013_keep_their_time_and_those_waiting_get_none(
        empty_database, tmp_path):
    """A deletion already relayed is forgotten as it would have been (relayed_by: its deleted_at, to
    which retention adds a round), so that no rule store is rebuilt for it; one still in its outbox or
    in a batch in flight is stamped by the round that first finds it relayed (agents/retention.py)."""
    folder = _copy_of_migrations(tmp_path)
    later = sorted(path for path in folder.glob("*.sql") if path.stem >= "013")
    held_back = {path: path.read_text() for path in later}
    for path in later:
        path.unlink()
    await apply_migrations(empty_database, folder)
    conn = await asyncpg.connect(empty_database)
    try:
        relayed, queued, in_flight, silence = [await conn.fetchval("SELECT gen_random_uuid()") for _ in range(4)]
        for rule_id in (relayed, queued, in_flight):
            await conn.execute("INSERT INTO deleted_rules (rule_id, client_id, version, deleted_at)"
                               " VALUES ($1, gen_random_uuid(), 2, now() - interval '3 days')", rule_id)
        await conn.execute("INSERT INTO rule_outbox (rule_id, payload) VALUES ($1, '{}')", queued)
        await conn.execute("INSERT INTO outbox_in_flight (outbox, keys) VALUES ('rule_outbox', ARRAY[$1::uuid])",
                           in_flight)
        await conn.execute("INSERT INTO deleted_silences (silence_id, client_id, version, deleted_at)"
                           " VALUES ($1, gen_random_uuid(), 2, now() - interval '3 days')", silence)
        for path, text in held_back.items():
            path.write_text(text)

        assert "013_deletions_found_relayed" in await apply_migrations(empty_database, folder)

        stamped = {row[0]: row[1] for row in await conn.fetch(
            "SELECT rule_id, relayed_by = deleted_at FROM deleted_rules"
            " UNION ALL SELECT silence_id, relayed_by = deleted_at FROM deleted_silences")}
        assert stamped == {relayed: True, queued: None, in_flight: None, silence: True}
    finally:
        await conn.close()


def test_two_files_of_one_version_number_are_refused_naming_both(tmp_path):
    # Both would run: the second's statements, then its record, refused by schema_migrations' key.
    (tmp_path / "007_add_index.sql").write_text("SELECT 1;")
    (tmp_path / "007_add_column.sql").write_text("SELECT 2;")

    with pytest.raises(MigrationError, match="007_add_column and 007_add_index have the same version number"):
        asyncio.run(apply_migrations("postgresql://unused", tmp_path))
