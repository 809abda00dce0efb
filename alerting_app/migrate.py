"""Schema migrations: `migrations/NNN_name.sql`, applied once each, in numeric order.

Each file runs in its own transaction together with its row in `schema_migrations`, so a file is
either applied and recorded or not at all. A Postgres advisory lock serialises concurrent runs (two
workers starting at once). An applied file must never change: its checksum is compared on every
run and a difference stops the run, because the database would no longer match the files.
"""
from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import asyncpg

from alerting_app.healthcheck import setting
from alerting_app.settings import without_passwords

# Any fixed 64-bit number works; every process must use the same one.
_ADVISORY_LOCK_KEY = 0x616C6572745F6D67  # "alert_mg"
_FILE_NAME = re.compile(r"^(?P<version>\d+)_(?P<name>\w[\w\-]*)\.sql$")
_MAX_VERSION = 2**31 - 1  # schema_migrations.version is an integer

_CREATE_TABLE = """
CREATE TABLE IF NOT EXISTS schema_migrations (
    version     integer PRIMARY KEY,
    name        text NOT NULL,
    checksum    text NOT NULL,
    applied_at  timestamptz NOT NULL DEFAULT now()
)
"""


class MigrationError(RuntimeError):
    """The migration files or the recorded history are not in a state we can apply."""


@dataclass(frozen=True)
class Migration:
    version: int
    name: str  # the file name without `.sql`, e.g. `001_initial`
    sql: str
    checksum: str


def default_migrations_dir() -> Path:
    """MIGRATIONS_DIR, else `migrations/` beside the package (the repository, installed editable).

    In any case, as every setting (`migrations_dir` is MIGRATIONS_DIR): read in upper case only, a
    worker told `migrations_dir=...` looked in the default folder.
    """
    try:
        configured = setting(os.environ, "MIGRATIONS_DIR")
    except ValueError as exc:  # two spellings, two folders
        raise MigrationError(str(exc).removeprefix("MIGRATIONS_DIR: ")) from None  # said by whoever shows it
    return Path(configured) if configured else Path(__file__).resolve().parent.parent / "migrations"


def read_migrations(directory: Path) -> list[Migration]:
    if directory.exists() and not directory.is_dir():  # it said "does not exist" of a file that does
        raise MigrationError(f"migrations folder {directory} is not a folder (set MIGRATIONS_DIR)")
    if not directory.is_dir():
        raise MigrationError(f"migrations folder {directory} does not exist (set MIGRATIONS_DIR)")
    migrations = []
    for path in directory.glob("*.sql"):
        match = _FILE_NAME.match(path.name)
        if match is None:
            raise MigrationError(f"{path.name}: migration files are named NNN_name.sql")
        # Refused here, naming the file: a version over schema_migrations' integer failed its insert,
        # and text that is not UTF-8 its decoding, each with a traceback (the worker's start too).
        if int(match["version"]) > _MAX_VERSION:
            raise MigrationError(f"{path.name}: a version number is at most {_MAX_VERSION}")
        raw = path.read_bytes()
        checksum = hashlib.sha256(raw).hexdigest()
        try:
            sql = raw.decode()
        except UnicodeDecodeError as exc:
            raise MigrationError(f"{path.name}: not UTF-8 text ({exc})") from None
        migrations.append(Migration(int(match["version"]), path.stem, sql, checksum))
    migrations.sort(key=lambda m: m.version)
    for earlier, later in zip(migrations, migrations[1:]):
        if earlier.version == later.version:
            raise MigrationError(f"{earlier.name} and {later.name} have the same version number")
    return migrations


@contextmanager
def naming_the_server(database_url: str) -> Iterator[None]:
    """A connection that failed says to which server. asyncpg said "Connect call failed ('127.0.0.1',
    5432)", or, timed out, nothing at all: a command ended, after a minute, in "migrate failed: "."""
    try:
        yield
    except OSError as exc:  # TimeoutError included
        reason = str(exc) or "no answer to the connection in time"
        raise type(exc)(f"Postgres at {without_passwords(database_url)} (DATABASE_URL): {reason}") from None


async def apply_migrations(database_url: str, migrations_dir: Path | None = None) -> list[str]:
    """Apply the migrations not applied yet; return their names (empty when up to date)."""
    directory = migrations_dir or default_migrations_dir()
    migrations = read_migrations(directory)
    if not migrations:
        # A folder mounted over the image's, or a wrong MIGRATIONS_DIR: "up to date" would be false,
        # and the workers would wait for a schema that never comes.
        raise MigrationError(f"no migration files in {directory} (set MIGRATIONS_DIR)")
    with naming_the_server(database_url):
        conn = await asyncpg.connect(database_url)
    try:
        # Session-level lock, released when the connection closes, even if we fail half-way.
        await conn.execute("SELECT pg_advisory_lock($1)", _ADVISORY_LOCK_KEY)
        await conn.execute(_CREATE_TABLE)
        rows = await conn.fetch("SELECT version, name, checksum FROM schema_migrations")
        recorded = {row["version"]: row for row in rows}
        _check_unchanged(migrations, recorded)
        applied = []
        for migration in migrations:
            if migration.version in recorded:
                continue
            async with conn.transaction():
                try:
                    await conn.execute(migration.sql)
                except asyncpg.PostgresError as exc:
                    # Postgres's message alone ("relation "a" already exists") does not say which file.
                    raise MigrationError(f"{migration.name}.sql failed, nothing of it applied: "
                                         f"{type(exc).__name__}: {exc}") from exc
                await conn.execute(
                    "INSERT INTO schema_migrations (version, name, checksum) VALUES ($1, $2, $3)",
                    migration.version, migration.name, migration.checksum,
                )
            applied.append(migration.name)
        return applied
    finally:
        await conn.close()


def _check_unchanged(migrations: list[Migration], recorded: dict[int, asyncpg.Record]) -> None:
    for migration in migrations:
        row = recorded.get(migration.version)
        if row is not None and row["checksum"] != migration.checksum:
            raise MigrationError(
                f"{migration.name}.sql was changed after it was applied as {row['name']} "
                f"(checksum {row['checksum'][:12]}… recorded, {migration.checksum[:12]}… now); "
                "add a new migration instead of editing an applied one"
            )
