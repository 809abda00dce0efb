"""Can this process reach the services it depends on? Cheap probes, each bounded by a timeout.

Used twice: by `alerting-app worker` before it hands over to Faust (which exits at once when the
broker is absent; see alerting_app/startup_wait.py), and by `/readyz` on a running worker.
A probe never raises: whatever goes wrong, the answer is a `DependencyState` saying what.
"""
from __future__ import annotations

import asyncio
import functools
import ssl
from collections.abc import Awaitable, Iterable
from dataclasses import dataclass

import asyncpg
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.conn import create_conn
from aiokafka.errors import (AuthenticationFailedError, KafkaConnectionError, KafkaError, SaslAuthenticationFailed,
                             UnsupportedSaslMechanismError)
from redis.asyncio import Redis
from redis.exceptions import AuthenticationError, ResponseError

from alerting_app.bearer import bearer, is_token
from alerting_app.kafka_connection import Broker, MskIamToken, client_args
from alerting_app.migrate import MigrationError, default_migrations_dir, read_migrations

PROBE_TIMEOUT_S = 2.0


class Misconfigured(Exception):
    """What a probe found that no wait fixes: the setting's name and what is wrong with it."""


@dataclass(frozen=True)
class DependencyState:
    name: str
    ok: bool
    detail: str
    misconfigured: bool = False  # waiting would not change it: a start-up error naming the setting
    # The detail anyone who reaches WEB_PORT may read (the probes need no token, and a load balancer
    # may route /readyz from anywhere): without an exception's text, which names our hosts, their
    # addresses and ports. None: the detail names none of them.
    public_detail: str | None = None

    def as_json(self, full: bool = True) -> dict:
        """`full`: the whole detail, for the admin (`shows_full_detail`); else the public one."""
        return {"ok": self.ok, "detail": self.detail if full or self.public_detail is None else self.public_detail}


_ASK_THE_ADMIN = "send ADMIN_TOKEN as a Bearer token for the detail"


def shows_full_detail(authorization: str | None, admin_token: str | None) -> bool:
    """Whether a probe's answer may hold the services' full details: asked with ADMIN_TOKEN."""
    token = bearer(authorization)
    return token is not None and is_token(token, admin_token)


async def probe(name: str, check: Awaitable[str | None], timeout: float = PROBE_TIMEOUT_S) -> DependencyState:
    """Run `check`; it returns None when all is well, or says what is missing."""
    try:
        async with asyncio.timeout(timeout):  # not wait_for: see agents/rule_outbox.py
            missing = await check
    except TimeoutError:
        return DependencyState(name, False, f"no answer within {timeout:g}s")
    except Misconfigured as exc:
        variables = str(exc).split(":", 1)[0]
        return DependencyState(name, False, str(exc), misconfigured=True,
                               public_detail=f"{variables}: misconfigured ({_ASK_THE_ADMIN})")
    except Exception as exc:  # any failure means "not reachable"; the detail says which
        return DependencyState(name, False, _described(exc),
                               public_detail=f"{type(exc).__name__} ({_ASK_THE_ADMIN})")
    return DependencyState(name, missing is None, missing or "ok")


def _described(exc: Exception) -> str:
    text, kind = str(exc), type(exc).__name__
    # aiokafka's messages already start with the class name.
    return text if text.startswith(kind) else f"{kind}: {text}".rstrip(": ")


async def broker_topics_missing(broker: Broker, topics: Iterable[str] = (),
                                timeout: float = PROBE_TIMEOUT_S) -> str | None:
    """None when the broker answers a metadata request and every topic in `topics` exists."""
    admin = AIOKafkaAdminClient(**{**client_args(broker), "request_timeout_ms": int(timeout * 1000)})
    try:
        try:
            await admin.start()
        except KafkaConnectionError:
            await _why_no_connection(broker, timeout)
            raise
        # list_topics, not a metadata request naming topics: that would auto-create them.
        present = set(await admin.list_topics())
    finally:
        await admin.close()
    missing = sorted(set(topics) - present)
    if missing:
        return f"topics missing: {', '.join(missing)} (run `alerting-app create-topics`)"
    return None


async def _why_no_connection(broker: Broker, timeout: float) -> None:
    """aiokafka says "Unable to bootstrap" whatever went wrong at each address (its own log, which
    the start-up wait silences, had the reason): a login the broker refused and a certificate not
    trusted read as a broker not there yet, and a worker waited for ever, alive and never ready.
    Asked again one address at a time: Misconfigured for what no wait changes, naming the variable;
    else a KafkaConnectionError with the first address's reason; None when one connects now."""
    args = {key: value for key, value in client_args(broker).items() if key != "bootstrap_servers"}
    args["request_timeout_ms"] = int(timeout * 1000)
    reasons = []
    for address in client_args(broker)["bootstrap_servers"].split(","):
        host, _, port = address.strip().rpartition(":")
        try:
            connection = await create_conn(host.strip("[]"), int(port), **args)
        except (SaslAuthenticationFailed, AuthenticationFailedError) as exc:
            if isinstance(args.get("sasl_oauth_token_provider"), MskIamToken):
                # IAM grants take effect a while after they are made (a first deployment): waited for.
                raise KafkaConnectionError(f"{address} refused the IAM login (the task role's kafka-cluster "
                                           f"permissions): {exc}") from None
            raise Misconfigured(f"KAFKA_SASL_USERNAME, KAFKA_SASL_PASSWORD: the broker refused the login "
                                f"({address}): {exc}") from None
        except UnsupportedSaslMechanismError:
            raise Misconfigured(f"KAFKA_SASL_MECHANISM: the broker does not take {args['sasl_mechanism']} "
                                f"({address})") from None
        except ssl.SSLCertVerificationError as exc:
            if exc.verify_code in (62, 64):  # X509_V_ERR_HOSTNAME_MISMATCH, X509_V_ERR_IP_ADDRESS_MISMATCH
                raise Misconfigured(f"KAFKA_BOOTSTRAP_SERVERS: {host} is not a name the broker's certificate "
                                    f"holds ({address}): {exc.verify_message}") from None
            raise Misconfigured(f"KAFKA_SSL_CAFILE: the broker's certificate is not trusted ({address}): "
                                f"{exc.verify_message}") from None
        except (OSError, TimeoutError, KafkaError) as exc:
            reasons.append(f"{address}: {_described(exc)}")
            continue
        connection.close()
        return
    raise KafkaConnectionError(f"no connection to the broker: {'; '.join(reasons)}")


async def postgres_ready(url: str, timeout: float = PROBE_TIMEOUT_S) -> str | None:
    """A fresh connection (before the app's pool exists) answers, and the schema is migrated."""
    conn = await _postgres_connection(url, timeout)
    try:
        return await schema_behind(conn)
    finally:
        await conn.close()


async def postgres_answers(url: str, timeout: float = PROBE_TIMEOUT_S) -> None:
    """The server of `url` takes a login to its database (the schema may not be migrated yet)."""
    await (await _postgres_connection(url, timeout)).close()


async def _postgres_connection(url: str, timeout: float) -> asyncpg.Connection:
    try:
        return await asyncpg.connect(url, timeout=timeout)
    except asyncpg.ClientConfigurationError as exc:
        # Refused before connecting, from the URL and this machine's files (sslmode=verify-full with
        # no root certificate where asyncpg looks by default): the same at every attempt.
        raise Misconfigured(f"DATABASE_URL: {exc}") from None
    except (asyncpg.InvalidAuthorizationSpecificationError, asyncpg.InvalidCatalogNameError) as exc:
        # The server answered and refused the login: a wrong password (28P01), no such role or no
        # pg_hba.conf line admitting it (28000), no such database (3D000). It answers the same until
        # someone changes the URL or the server; a worker that waited was alive but never ready,
        # its reason only in its log. (The server's message names the user or database, never the
        # password.)
        raise Misconfigured(f"DATABASE_URL: the server refused the login: {exc}") from None


async def pool_ready(pool: Awaitable[asyncpg.Pool]) -> str | None:
    """The app's pool, what the agents and the API use, answers, and the schema is migrated."""
    return await schema_behind(await pool)


async def schema_behind(db: asyncpg.Connection | asyncpg.Pool) -> str | None:
    """None when the newest migration applied is at least the newest this release ships.

    A worker on an older schema would start and then fail its batches on missing tables or
    columns. A newer one is fine: migrations are additive, so a rolled-back release runs on it.
    """
    needed = shipped_schema_version()
    try:
        applied = await db.fetchval("SELECT max(version) FROM schema_migrations")
    except asyncpg.UndefinedTableError:
        applied = None
    if applied is None or applied < needed:
        return (f"schema at migration {applied if applied is not None else 'none'}, this release needs "
                f"{needed} (run `alerting-app migrate`)")
    return None


@functools.cache
def shipped_schema_version() -> int:
    """The version of the newest migration file of this release (MIGRATIONS_DIR)."""
    migrations = read_migrations(default_migrations_dir())
    if not migrations:
        raise MigrationError(f"no migration files in {default_migrations_dir()} (set MIGRATIONS_DIR)")
    return migrations[-1].version


async def redis_answers(client: Redis) -> None:
    try:
        await client.ping()
    except AuthenticationError as exc:
        # A wrong password or user (WRONGPASS), or none given to a server that wants one (NOAUTH):
        # refused the same at every attempt. redis-py's message never holds the password.
        raise Misconfigured(f"REDIS_URL: the server refused the login: {exc}") from None
    except ResponseError as exc:
        # The database of REDIS_URL is selected on connect; a server with fewer databases refuses
        # it, and keeps refusing until it is restarted with another `databases` setting.
        if "DB index is out of range" not in str(exc):
            raise
        database = client.connection_pool.connection_kwargs.get("db", 0)
        raise Misconfigured(f"REDIS_URL: database {database} does not exist on that server (its `databases` "
                            "setting says how many it has, numbered from 0; 16 by default)") from None


def redis_probe_client(url: str, timeout: float = PROBE_TIMEOUT_S) -> Redis:
    # Its own client with socket timeouts, so that a probe never waits on the app's connections.
    return Redis.from_url(url, socket_connect_timeout=timeout, socket_timeout=timeout)
