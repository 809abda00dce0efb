"""POST /api/v1/endpoints/{endpoint_id}/test: send the endpoint a test notification now, and say how it went.

A tenant checks an endpoint (its URL and secret, a Slack webhook, a mail address) before an alert
depends on it. The test goes by the endpoint's channel as a delivery does, signed with its secret,
through the same checks of the address (ALLOW_PRIVATE_ENDPOINTS), and the answer says whether the
endpoint took it, or the reason it did not, as a delivery's `last_error` would. It is sent once: not
recorded, not retried, not dead-lettered. A disabled endpoint can be tested, so that it can be
checked before it is enabled.

Every test takes a token of the endpoint's own rate limit (and, for email, of the all-email one),
as a delivery does, and of two buckets of tests of their own: one test per endpoint per
TEST_INTERVAL_S, and one per client per TEST_CLIENT_INTERVAL_S, whatever endpoint. The endpoint's
rate limit is the tenant's to set, and a tenant may hold MAX_RULES_PER_CLIENT rules of
MAX_ENDPOINTS_PER_RULE endpoints each: without the client's bucket a key testing its endpoints in
turn made the platform send as fast as the API answered, and took every token of the all-email
limit (60 email endpoints, 12 tests a second against 10 by default) that every tenant's email waits
for. Without a token the answer is 429, with Retry-After, and nothing is sent.
"""
from __future__ import annotations

import asyncio
import logging
import math
import time
from uuid import uuid4

from faust.web import Request, Response
from redis.exceptions import RedisError

from alerting_app import db, redis_client
from alerting_app.app import app, settings
from alerting_app.channels.errors import DeliveryError, RetryableDeliveryError, recordable
from alerting_app.channels.http import endpoint_session
from alerting_app.contracts import Alert, NotificationReady
from alerting_app.delivery.attempts import send_to
from alerting_app.delivery.jobs import Endpoint
from alerting_app.delivery.rate_limits import RateLimits, email_bucket, endpoint_bucket
from alerting_app.http_errors import DATABASE_RETRY_AFTER_S
from alerting_app.redis_pipelining import PipelinedRedis
from web.auth import ApiView
from web.errors import NotFound
from web.validation import path_id

log = logging.getLogger(__name__)

# One test per endpoint per this many seconds, whatever its rate limit.
TEST_INTERVAL_S = 5.0
# One test per client per this many seconds, whichever of its endpoints.
TEST_CLIENT_INTERVAL_S = 1.0
# Tests a worker sends at once: every tenant's (each waits up to WEBHOOK_TIMEOUT_S for a hanging
# endpoint), and the email ones, which all go to the one SMTP relay, no more than the relay's send
# slots a worker's deliveries take (DELIVERY_ENDPOINT_CONCURRENCY). Past them a test answers 429.
TESTS_IN_FLIGHT_MAX = 64
_in_flight: dict[str, int] = {"all": 0, "email": 0}

ENDPOINT = """
    SELECT endpoint_id::text, rule_id::text, client_id::text, type, value, secret, rate_limit_per_s, enabled
    FROM endpoints WHERE endpoint_id = $1 AND ($2::uuid IS NULL OR client_id = $2)
"""


def trial_bucket(app_id: str, endpoint_id: str) -> str:
    return f"{app_id}:endpoint-test:{endpoint_id}"


def client_trial_bucket(app_id: str, client_id: str) -> str:
    return f"{app_id}:client-endpoint-tests:{client_id}"


def trial_notification(client_id: str, rule_id: str, endpoint_id: str) -> NotificationReady:
    """A notification that says what it is in every channel's text: a test, of this endpoint."""
    now = time.time()
    alert = Alert(alert_id=f"test-{uuid4()}", event_ts=now, severity="LOW", source="alerting-app",
                  name="Test notification", context={"test": "true", "endpoint_id": endpoint_id})
    return NotificationReady(client_id=client_id, rule_ids=[rule_id], alerts=[alert], created_at=now)


class _Throttled(Exception):
    def __init__(self, retry_after_s: float, what: str) -> None:
        super().__init__(what)
        self.retry_after_s = retry_after_s


async def _take_tokens(redis: PipelinedRedis, endpoint: Endpoint, client_id: str) -> None:
    """The tokens a test spends, or _Throttled naming the first bucket that has none now, and how
    long until it has one.

    The tests' own buckets are one token deep, whatever ENDPOINT_RATE_BURST_S (which sizes the
    endpoints' buckets): at 10 s it let two tests of an endpoint through at once, at 3,600 s 720.
    A test refused spends no token: neither the endpoint's, which its deliveries need, nor the
    tests' own."""
    limits = RateLimits(redis, settings.endpoint_rate_burst_s)
    # Burst: round(rate × burst_s) = 1 for a bucket of one per TEST_INTERVAL_S (TEST_CLIENT_INTERVAL_S).
    one_deep, one_deep_per_client = RateLimits(redis, TEST_INTERVAL_S), RateLimits(redis, TEST_CLIENT_INTERVAL_S)
    rate = endpoint.rate_per_s(settings.endpoint_rate_limit_per_s)
    buckets = [(one_deep, trial_bucket(settings.app_id, endpoint.endpoint_id), 1 / TEST_INTERVAL_S,
                f"one test per {TEST_INTERVAL_S:g} s per endpoint"),
               (one_deep_per_client, client_trial_bucket(settings.app_id, client_id), 1 / TEST_CLIENT_INTERVAL_S,
                f"one test per {TEST_CLIENT_INTERVAL_S:g} s per client"),
               (limits, endpoint_bucket(settings.app_id, endpoint.endpoint_id), rate, "the endpoint's rate limit")]
    if endpoint.channel == "email":
        buckets.append((limits, email_bucket(settings.app_id), settings.email_rate_limit_per_s,
                        "the rate limit of all email (EMAIL_RATE_LIMIT_PER_S)"))
    # Looked at first, all in one round trip, and taken only when each has one: taken one by one,
    # a test refused by a later bucket (the client's, the endpoint's rate, the all-email limit) had
    # spent the earlier ones' tokens, and its retry after Retry-After was refused again, by the 5 s
    # test interval. (Two tests racing between the look and the take can still spend a token for
    # nothing; the library takes one bucket per call.)
    waits = await asyncio.gather(*(bucket_limits.wait_s(bucket, rate_per_s)
                                   for bucket_limits, bucket, rate_per_s, _ in buckets))
    if any(waits):
        # Until every bucket has its token: not a whole interval of its rate (1,000 s at 0.001/s).
        wait_s, what = max((wait_s, what) for wait_s, (_, _, _, what) in zip(waits, buckets))
        raise _Throttled(wait_s, what)
    for bucket_limits, bucket, rate_per_s, what in buckets:
        wait_s = await bucket_limits.take_or_wait_s(bucket, rate_per_s)
        if wait_s:
            raise _Throttled(wait_s, what)


def _no_room_for(channel: str) -> str | None:
    """Why a test by `channel` cannot be sent now by this worker (TESTS_IN_FLIGHT_MAX), or None."""
    if _in_flight["all"] >= TESTS_IN_FLIGHT_MAX:
        return f"this worker is already sending {TESTS_IN_FLIGHT_MAX} tests"
    if channel == "email" and _in_flight["email"] >= settings.delivery_endpoint_concurrency:
        return f"this worker is already sending {settings.delivery_endpoint_concurrency} tests to the SMTP relay"
    return None


@app.page("/api/v1/endpoints/{endpoint_id}/test")
class EndpointTestView(ApiView):
    async def post(self, request: Request, endpoint_id: str) -> Response:
        pool = await db.api_pool()
        row = await pool.fetchrow(ENDPOINT, path_id(endpoint_id, "endpoint"), self.caller(request).client_id)
        if row is None:
            raise NotFound("endpoint")
        endpoint = Endpoint(row["endpoint_id"], row["type"], row["value"], row["secret"], row["rate_limit_per_s"],
                            row["enabled"])
        busy = _no_room_for(endpoint.channel)
        if busy is not None:
            return self.error(429, "rate_limited", message=f"no test now: {busy}; try again in 1 s",
                              headers={"Retry-After": "1"})
        # Held from the look at the room on, before any await: taken once the tokens were (a Redis
        # round trip later), tests arriving together all found the room free and were all sent.
        kinds = ("all", "email") if endpoint.channel == "email" else ("all",)
        for kind in kinds:
            _in_flight[kind] += 1
        try:
            redis = PipelinedRedis(redis_client.redis())
            try:
                await _take_tokens(redis, endpoint, row["client_id"])
            except _Throttled as throttled:
                wait_s = max(1, math.ceil(throttled.retry_after_s))
                return self.error(429, "rate_limited", message=f"no test now: {throttled}; try again in {wait_s} s",
                                  headers={"Retry-After": str(wait_s)})
            except RedisError as exc:
                log.warning("endpoint test: the rate-limit tokens could not be taken: %s", exc)
                return self.error(503, "redis_unavailable",
                                  message="the rate limits cannot be checked now; nothing was sent",
                                  headers={"Retry-After": str(DATABASE_RETRY_AFTER_S)})  # as database_unavailable
            notification = trial_notification(row["client_id"], row["rule_id"], endpoint.endpoint_id)
            error, retryable = None, None
            # Its host is a c-ares query, as a delivery's (channels/addresses.py host_resolver): a tenant
            # testing endpoints under a name server that answers late or never holds no thread.
            try:
                async with endpoint_session(concurrency=1, allow_private=settings.allow_private_endpoints) as session:
                    await send_to(endpoint, notification, session, settings)
            except DeliveryError as exc:
                error, retryable = recordable(str(exc)), isinstance(exc, RetryableDeliveryError)
            except Exception as exc:  # ours, not the endpoint's: as a delivery, its type and message
                log.exception("endpoint test %s: the send raised %s", endpoint.endpoint_id, type(exc).__name__)
                error, retryable = recordable(f"{type(exc).__name__}: {exc}"), False
        finally:
            for kind in kinds:
                _in_flight[kind] -= 1
        return self.json({"endpoint_id": endpoint.endpoint_id, "notification_id": notification.notification_id,
                          "channel": endpoint.channel, "delivered": error is None, "error": error,
                          "retryable": retryable})
