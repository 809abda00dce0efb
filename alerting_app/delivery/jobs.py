"""What a worker needs to deliver one notification to one endpoint."""
from __future__ import annotations

import time
from dataclasses import dataclass, field

from alerting_app.contracts import NotificationReady


@dataclass(frozen=True)
class Endpoint:
    endpoint_id: str
    channel: str  # webhook | slack | email
    value: str  # URL or email address
    secret: str
    rate_limit_per_s: float | None  # None: ENDPOINT_RATE_LIMIT_PER_S
    enabled: bool = True

    def rate_per_s(self, default_per_s: float) -> float:
        """Its rate limit: its own, else `default_per_s` (ENDPOINT_RATE_LIMIT_PER_S); 0 is unlimited."""
        return self.rate_limit_per_s if self.rate_limit_per_s is not None else default_per_s


@dataclass(frozen=True)
class DeliveryJob:
    notification: NotificationReady
    endpoint_id: str
    endpoint: Endpoint | None  # None: the endpoint was deleted since the delivery was opened
    attempts: int  # attempts already recorded, by this or an earlier worker
    # Taken up again: a row an earlier holder had (the sweep), or one a redelivered message found.
    # That holder may have sent it and died before recording it: its sent mark is looked for
    # first, before the wait for slots and tokens, which may outlast the mark (attempts.deliver).
    resumed: bool = False
    # When its endpoint was read (time.monotonic()): a rate read since, by another delivery of the
    # endpoint, is newer than this job's (rate_limits.take_in_turn).
    read_at: float = field(default_factory=time.monotonic)

    @property
    def key(self) -> tuple[str, str]:
        return self.notification.notification_id, self.endpoint_id
