"""How a channel says a send failed, and whether trying again can help."""
from __future__ import annotations


class DeliveryError(Exception):
    """`str(self)` is the reason recorded as the delivery's last error."""


class RetryableDeliveryError(DeliveryError):
    """A timeout, a lost connection, a 5xx or 429: the same send may succeed later.

    `retry_after` is the endpoint's own request (429's Retry-After), in seconds, when it made one.
    """

    def __init__(self, reason: str, retry_after: float | None = None) -> None:
        super().__init__(reason)
        self.retry_after = retry_after


class PermanentDeliveryError(DeliveryError):
    """The endpoint refused the notification itself (a 4xx): sending it again cannot help."""
