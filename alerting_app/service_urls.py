"""The checks on the service URLs: DATABASE_URL as asyncpg reads it, REDIS_URL as redis-py does.

settings.py runs them as validators (PostgresUrl, RedisUrl), so a bad URL stops start-up with its
variable named. Each refuses now what its driver would refuse, or read otherwise than meant, only
when it connects (a certificate file that does not load, an option the connection does not take,
a password whose '@' ends the login early): there, every connection attempt failed with an error
naming neither the variable nor the cause, and the worker waited for ever. Each raises ValueError;
load_settings shows its message with the passwords left out.
"""
from __future__ import annotations

import os
import re
import ssl
import urllib.parse
from pathlib import Path

from redis.asyncio.connection import ConnectionPool, SSLConnection, parse_url as parse_redis_url
from redis.exceptions import RedisError


def _url_with_scheme(*schemes: str):
    def check(value: str) -> str:
        if not value.startswith(tuple(f"{s}://" for s in schemes)):
            raise ValueError(f"must start with {' or '.join(s + '://' for s in schemes)}")
        _login_is_encoded(value)
        return value

    return check


def _login_is_encoded(url: str) -> None:
    """Refuse a user or password with '@', '/', '?' or '#' as it is, without showing any of it.

    A second '@' before the host: asyncpg ends the login at the first, so the rest of the password
    would be the host, and the worker would wait for ever for it. A '/', '?' or '#': every parser
    ends the host there, so the login's first part would be read as host:port and an error about
    that "host" would show it. ('@' after the host, in a query value, is fine.)
    """
    parts = urllib.parse.urlsplit(url)
    netloc = parts.netloc
    if netloc.count("@") > 1:
        raise ValueError("the user or password holds '@' as it is: URL-encode it (%40)")
    rest = url.partition("://")[2][len(netloc):]
    looks_like_a_login = ":" in netloc and not netloc.startswith("[") and not all(
        host.rpartition(":")[2].isdigit() for host in netloc.split(","))
    # An '@' in the path, the fragment or a query key is one too, even where the login's start
    # looks like host:port (`user:1234/5678@host`), or an '@' already ended it (`user:a@b#c@host`:
    # the "host" would be `b`): an error about it would show the rest of the password.
    stray_at = "@" in parts.path or "@" in parts.fragment or any(
        "@" in key for key, _ in urllib.parse.parse_qsl(parts.query, keep_blank_values=True))
    if stray_at or ("@" not in netloc and "@" in rest and looks_like_a_login):
        raise ValueError("the user or password holds '/', '?' or '#' as it is: URL-encode them "
                         "(%2F, %3F, %23; and an '@': %40)")


# What asyncpg accepts for these query parameters; any other key becomes a server setting.
_SSLMODES = ("disable", "allow", "prefer", "require", "verify-ca", "verify-full")
# libpq connection options asyncpg's DSN parser does not take: it sends any key it does not know
# to the server as a run-time setting, and the server refuses these.
_LIBPQ_ONLY = frozenset({
    "sslcrldir",
    "connect_timeout", "keepalives", "keepalives_idle", "keepalives_interval", "keepalives_count",
    "tcp_user_timeout", "channel_binding", "gssencmode", "gssdelegation", "requiressl", "sslcompression",
    "sslsni", "sslcertmode", "sslkeylogfile", "hostaddr", "fallback_application_name", "load_balance_hosts",
    "require_auth",
})
_SESSION_ATTRS = ("any", "primary", "standby", "prefer-standby", "read-write", "read-only")
_IPV6_ADDRESS = re.compile(r"^\[[0-9A-Fa-f:.%]+\]$")


def _port_in_range(text: str) -> bool:
    return text.isdigit() and 0 < int(text) < 65536


def _is_host_and_port(text: str) -> bool:
    """host, host:port, [ipv6] or [ipv6]:port (URL-encoded, as in a URL)."""
    if text.startswith("["):
        address, _, rest = text.partition("]")
        return bool(_IPV6_ADDRESS.match(address + "]")) and (not rest or (rest[0] == ":" and _port_in_range(rest[1:])))
    name, colon, port = text.partition(":")
    return bool(name) and (not colon or _port_in_range(port))


def check_postgres_url(value: str) -> str:
    """What asyncpg would refuse only when connecting (or read otherwise than meant), refused now.

    asyncpg's own DSN parser is private; this checks the same parts: hosts and ports (several,
    comma-separated, are allowed), one database name, and the values of the query keys it knows.
    """
    _url_with_scheme("postgresql", "postgres")(value)
    parsed = urllib.parse.urlsplit(value)
    try:
        query = dict(urllib.parse.parse_qsl(parsed.query, strict_parsing=True)) if parsed.query else {}
    except ValueError:
        raise ValueError("its query must be key=value pairs joined by &") from None
    hosts = parsed.netloc.partition("@")[2] if "@" in parsed.netloc else parsed.netloc
    if not hosts and "host" not in query:
        raise ValueError("must name a host: postgresql://user:password@host:5432/database")
    for host in hosts.split(",") if hosts else []:
        if not _is_host_and_port(host):
            raise ValueError(f"{host!r} is not host, host:port or [ipv6]:port (a port is 1-65535)")
    if "port" in query and not all(_port_in_range(port) for port in query["port"].split(",")):
        raise ValueError(f"port={query['port']!r} is not a port (1-65535)")
    # asyncpg reads PGPORT (the port of a host given without one) whenever the URL has no port=
    # option: "abc" failed every connection with "ValueError: invalid literal for int()", and the
    # worker waited for ever.
    if ("port" not in query and os.environ.get("PGPORT")
            and not all(_port_in_range(port.strip()) for port in os.environ["PGPORT"].split(","))):
        raise ValueError(f"PGPORT={os.environ['PGPORT']!r} (the environment's, read when the URL has no port= "
                         "option) is not a port (1-65535)")
    if "/" in parsed.path[1:]:
        raise ValueError(f"{parsed.path[1:]!r} is not one database name")
    if "sslmode" in query and query["sslmode"].replace("_", "-") not in _SSLMODES:
        raise ValueError(f"sslmode={query['sslmode']!r} is not one of {', '.join(_SSLMODES)}")
    libpq_only = sorted(set(query) & _LIBPQ_ONLY)
    if libpq_only:
        raise ValueError(f"{', '.join(libpq_only)}: libpq options asyncpg does not read (it would pass them to the "
                         "server as settings, which refuses them, so no connection could be made); remove them")
    if "target_session_attrs" in query and query["target_session_attrs"] not in _SESSION_ATTRS:
        raise ValueError(f"target_session_attrs={query['target_session_attrs']!r} is not one of "
                         f"{', '.join(_SESSION_ATTRS)}")
    _postgres_tls_files_load(query)
    return value


def _postgres_default_key() -> str | None:
    try:  # as asyncpg finds it: no home (HOME unset, a uid without a passwd entry) is no key
        path = Path.home() / ".postgresql" / "postgresql.key"
    except RuntimeError:
        return None
    return str(path) if path.exists() else None


def _postgres_tls_files_load(query: dict[str, str]) -> None:
    """The certificate files the URL names, loaded as asyncpg loads them when it connects.

    asyncpg reads them at each connection attempt: one missing or not PEM failed every attempt with
    "FileNotFoundError: [Errno 2] No such file or directory", naming neither the file nor the
    variable, and the worker waited for ever. It loads the CA and CRL files only from sslmode=require
    up, and the client certificate from sslmode=allow up (its default is PGSSLMODE, else prefer).
    With a key absent from the URL, asyncpg takes the libpq environment variable (PGSSLMODE,
    PGSSLROOTCERT, PGSSLCRL, PGSSLCERT, PGSSLKEY): a file named there failed the same way, so it is
    loaded too, and the error names that variable.
    """
    # Set empty, PGSSLMODE is read too (and refused: asyncpg stopped every connection on it).
    if not query.get("sslmode") and "PGSSLMODE" in os.environ:
        mode_given: tuple[str, str] | None = ("PGSSLMODE", os.environ["PGSSLMODE"])
        if os.environ["PGSSLMODE"].replace("_", "-") not in _SSLMODES:
            raise ValueError(f"{_named(mode_given)} is not one of {', '.join(_SSLMODES)}")
    else:
        mode_given = _given(query, "sslmode")
    mode = (mode_given[1] if mode_given else "prefer").replace("_", "-")
    if mode == "disable":
        return
    if mode in ("require", "verify-ca", "verify-full"):
        for key in ("sslrootcert", "sslcrl"):
            given = _given(query, key)
            if given:
                try:
                    ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_verify_locations(cafile=given[1])
                except (OSError, ssl.SSLError) as exc:
                    raise ValueError(f"{_named(given)} cannot be loaded: {exc}") from None
    certificate = _given(query, "sslcert")
    if certificate:
        # Without sslkey, asyncpg takes PGSSLKEY, else ~/.postgresql/postgresql.key if there is one,
        # else the key must be in the certificate's file.
        key = _given(query, "sslkey")
        keyfile = key[1] if key else _postgres_default_key()
        password = query.get("sslpassword", "")
        try:
            ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_cert_chain(certificate[1], keyfile=keyfile,
                                                                    password=lambda: password)
        except (OSError, ssl.SSLError) as exc:
            raise ValueError(f"{_named(certificate)} and {_named(key) if key else f'sslkey={keyfile!r}'} cannot be "
                             f"loaded as a certificate and its key: {exc}") from None


def _given(query: dict[str, str], key: str) -> tuple[str, str] | None:
    """(where, value) of a libpq option as asyncpg reads it: the URL's `key`, else the environment's
    PG<KEY>; None when neither gives one."""
    if query.get(key):
        return key, query[key]
    variable = "PG" + key.upper()
    return (variable, os.environ[variable]) if os.environ.get(variable) else None


def _named(given: tuple[str, str]) -> str:
    where, value = given
    return f"{where}={value!r}" + (f" (the environment's, as the URL gives no {where[2:].lower()})"
                                   if where.startswith("PG") else "")


def check_redis_url(value: str) -> str:
    """Parsed as redis-py parses it, plus what it would read silently otherwise than meant."""
    _url_with_scheme("redis", "rediss", "unix")(value)
    parse_redis_url(value)  # its ValueError says what is wrong (a port, an option's value)
    parsed = urllib.parse.urlsplit(value)
    if parsed.scheme == "unix":
        if not parsed.path:
            raise ValueError("must name the socket: unix:///path/to/redis.sock")
    elif not parsed.hostname:
        raise ValueError("must name a host: redis://host:6379/0")
    elif parsed.path not in ("", "/") and not parsed.path[1:].isdigit():
        # redis-py ignores a database that is not a number and uses database 0.
        raise ValueError(f"database {parsed.path[1:]!r} is not a number")
    _redis_connection_can_be_made(value)
    return value


def _redis_connection_can_be_made(url: str) -> None:
    """The connection redis-py would make of the URL, built now (without connecting).

    redis-py passes a query option it has no parser for on to the connection as it is, and builds
    the TLS context at the first connection: an option the connection does not take (an `ssl_*`
    one on redis://, a misspelt one) failed every connection with a TypeError, and a certificate
    file that is missing with "Error 2 connecting to host:port. No such file or directory", as if
    the server were not there; the worker waited for ever.
    """
    pool = ConnectionPool.from_url(url)
    try:
        connection = pool.connection_class(**pool.connection_kwargs)
    except TypeError as exc:
        option = re.search(r"unexpected keyword argument '(\w+)'", str(exc))
        raise ValueError(f"{option[1]!r} is not an option of a {url.partition('://')[0]}:// connection"
                         if option else str(exc)) from None
    except RedisError as exc:  # ssl_cert_reqs not one of none, optional, required
        raise ValueError(str(exc)) from None
    if isinstance(connection, SSLConnection):
        if connection.ssl_context.password is None:
            # Else OpenSSL asks for a key's pass phrase on the terminal, holding the command there.
            connection.ssl_context.password = _redis_key_without_pass_phrase
        try:
            connection.ssl_context.get()
        except (OSError, ssl.SSLError) as exc:
            files = ", ".join(f"{option}={pool.connection_kwargs[option]!r}" for option in _REDIS_TLS_FILES
                              if pool.connection_kwargs.get(option))
            raise ValueError(f"{files or 'its TLS options'} cannot be loaded: {exc}") from None
        except (TypeError, ValueError) as exc:  # ssl_min_version or ssl_ciphers redis-py passes on unread
            raise ValueError(f"its TLS options cannot be used: {exc}") from None


_REDIS_TLS_FILES = ("ssl_ca_certs", "ssl_ca_path", "ssl_certfile", "ssl_keyfile")


def _redis_key_without_pass_phrase() -> str:
    raise OSError("the key is encrypted: give its pass phrase as ssl_password (URL-encoded)")
