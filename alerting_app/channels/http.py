"""One HTTP POST for the HTTP channels (webhook, Slack), its outcome as a delivery error, and the
session those POSTs share."""
from __future__ import annotations

import contextlib
import logging
import time
from datetime import timezone
from email.utils import parsedate_to_datetime
from typing import Any

import aiohttp
from aiohttp.abc import AbstractResolver
from yarl import URL

from alerting_app.channels.addresses import (PublicAddressResolver, RefusedAddress, host_resolver,
                                             is_address_literal, refusal_told, refuse_non_public_literal)
from alerting_app.channels.errors import DeliveryError, PermanentDeliveryError, RetryableDeliveryError

log = logging.getLogger(__name__)

# Enough of an answer to keep the connection reusable; a receiver's body is never used.
_MAX_ANSWER_BYTES = 64 * 1024


def endpoint_session(*, concurrency: int, allow_private: bool) -> aiohttp.ClientSession:
    """The session every HTTP delivery of a worker shares (one connection pool).

    Unless `allow_private` (ALLOW_PRIVATE_ENDPOINTS), it connects to public addresses only, checked
    as it connects: the endpoint's URL was checked at creation, but its name may resolve elsewhere
    now (alerting_app/channels/addresses.py). Either way its host lookups are c-ares queries
    (`host_resolver`), which the send's timeout ends holding no thread.
    """
    if allow_private:
        return aiohttp.ClientSession(connector=_EndpointConnector(concurrency, host_resolver()))
    return aiohttp.ClientSession(connector=_EndpointConnector(concurrency, PublicAddressResolver()),
                                 middlewares=(refuse_non_public_literal,))


class _EndpointConnector(aiohttp.TCPConnector):
    """A connector that closes the resolver it is given when it closes, as it would one it made.

    aiohttp closes only a resolver of its own making; ours, left open, kept its c-ares channel (and
    the channel's queries still waiting on a silent name server) after the session, one per
    endpoint test.
    """

    def __init__(self, concurrency: int, resolver: AbstractResolver) -> None:
        super().__init__(limit=concurrency, resolver=resolver)
        self._given_resolver = resolver
        # Public addresses only: a DNS error is then told as a refusal is (`refused`).
        self.public_only = isinstance(resolver, PublicAddressResolver)

    async def close(self, *args: Any, **kwargs: Any) -> None:
        try:
            await super().close(*args, **kwargs)
        finally:
            await self._given_resolver.close()


async def post(session: aiohttp.ClientSession, url: str, body: bytes, headers: dict[str, str],
               timeout_s: float) -> None:
    """POST `body`; return on 2xx, else raise a retryable or permanent `DeliveryError`."""
    try:
        # Redirects are not followed: the endpoint's URL was checked at creation, where it
        # redirects to was not.
        async with session.post(url, data=body, headers=headers, allow_redirects=False,
                                timeout=aiohttp.ClientTimeout(total=timeout_s)) as response:
            status, retry_after = response.status, response.headers.get("Retry-After")
            # The answer is its status. A body that stalls or breaks after it changes nothing: a
            # 2xx stays delivered, not sent again. The connection is then dropped, not reused.
            with contextlib.suppress(aiohttp.ClientError, TimeoutError):
                await response.content.read(_MAX_ANSWER_BYTES)
    except RefusedAddress as exc:
        raise refused(url, exc) from None
    except TimeoutError:
        raise RetryableDeliveryError(f"timed out after {timeout_s:g}s") from None
    except aiohttp.ClientConnectorDNSError as exc:
        if isinstance(session.connector, _EndpointConnector) and session.connector.public_only:
            raise refused(url, exc) from None
        raise RetryableDeliveryError(f"{type(exc).__name__}: {error_text(exc, url)}") from None
    except aiohttp.ClientError as exc:
        raise RetryableDeliveryError(f"{type(exc).__name__}: {error_text(exc, url)}") from None
    raise_for_status(status, retry_after)


def refused(url: str, exc: RefusedAddress | aiohttp.ClientConnectorDNSError) -> DeliveryError:
    """The delivery error of a host refused as not public (RefusedAddress) or not found by DNS.

    An address written in the URL is refused for good, saying what kind of address it is: the tenant
    wrote it. A name is told as the API tells it (`refusal_told`), one answer whether it does not
    resolve or resolves into our network, and retried either way: told "a private address" for good
    against "Domain name not found" retried, a tenant could learn which of our internal names exist
    by turning a public name of its own into a CNAME of one. A name that does not resolve must be
    retried (a DNS outage, a record not yet published), so one pointing inward is too: each retry
    only looks the name up again, and connects nowhere unless the name has turned public. The
    operator's log has which it was.
    """
    host = URL(url).host or ""
    if isinstance(exc, RefusedAddress) and is_address_literal(host):
        return PermanentDeliveryError(f"{exc}; {_PUBLIC_ONLY}")
    detail = str(exc) if isinstance(exc, RefusedAddress) else f"{type(exc).__name__}: {error_text(exc, url)}"
    log.warning("endpoint host refused (the tenant reads only that it does not resolve to public addresses "
                "only, retried): %s", detail)
    return RetryableDeliveryError(f"{refusal_told(host, exc)}; {_PUBLIC_ONLY}")


_PUBLIC_ONLY = "endpoints must be public addresses (ALLOW_PRIVATE_ENDPOINTS is off)"


def error_text(exc: aiohttp.ClientError, url: str) -> str:
    """The error without the URL's path and query: a Slack webhook's path is its credential, and a
    delivery's reason is shown by the API and sent to the dead-letter topic."""
    if isinstance(exc, aiohttp.ClientResponseError):
        return f"{exc.status}, message={exc.message!r}"  # its str() ends with url='...'
    return str(exc).replace(url, str(URL(url).origin()))


# 4xx answers that say "not now" rather than "not this": 408 the receiver gave up waiting for the
# request (RFC 9110 15.5.9, it may be repeated); 409 the answer the Idempotency-Key draft
# (draft-ietf-httpapi-idempotency-key-header, 2.7) gives a retry while the first request with the
# key is still being processed, as after our timeout; 425 Too Early (RFC 8470, retry later).
_RETRYABLE_4XX = frozenset({408, 409, 425})


def raise_for_status(status: int, retry_after: str | None = None) -> None:
    if 200 <= status < 300:
        return
    if status in (429, 503):
        # Both may say how long to wait (RFC 9110 10.2.3): a receiver down for maintenance, say.
        raise RetryableDeliveryError(f"HTTP {status}", retry_after_seconds(retry_after))
    if 500 <= status < 600 or status in _RETRYABLE_4XX:
        raise RetryableDeliveryError(f"HTTP {status}")
    if 300 <= status < 400:
        raise PermanentDeliveryError(f"HTTP {status} (redirects are not followed)")
    raise PermanentDeliveryError(f"HTTP {status}")


def retry_after_seconds(value: str | None, now: float | None = None) -> float | None:
    """Retry-After as seconds from now: delta-seconds or an HTTP date (RFC 9110); None if unusable.

    Whatever the header holds, this returns: it is the receiver's text. Delta-seconds are ASCII
    digits only ("²" is a digit to str.isdigit, not to float); a huge number may come back as
    infinity, which the retry's wait caps (DELIVERY_BACKOFF_MAX_S).
    """
    if not value:
        return None
    value = value.strip()
    if value.isascii() and value.isdigit():
        return float(value)
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    if when.tzinfo is None:
        # asctime dates and "-0000" parse without a zone; HTTP dates are UTC (RFC 9110 5.6.7),
        # whatever the worker's local time zone.
        when = when.replace(tzinfo=timezone.utc)
    try:
        when = when.timestamp()
    except (ValueError, OverflowError):
        return None
    return max(0.0, when - (time.time() if now is None else now))
