"""How a channel says a send failed, and whether trying again can help."""
from __future__ import annotations

import re

# A reason quotes the endpoint's own words (an SMTP reply, an exception's text), kept to this many
# characters in the delivery's record and its dead letter.
MAX_REASON_CHARS = 1000
_UNRECORDABLE = re.compile(r"[\x00\ud800-\udfff]")


def recordable(reason: str) -> str:
    """`reason` as Postgres and the dead letter's JSON can hold it, at most MAX_REASON_CHARS long.

    A relay's reply bytes that are not UTF-8 reach us as lone surrogates (aiosmtplib decodes with
    surrogateescape), and a NUL can come through as it is: Postgres refuses both in text, and one
    such outcome would fail, again and again, the batch of outcomes written with it. Each becomes
    U+FFFD, as an invalid byte does in any UTF-8 decoder.
    """
    if len(reason) > MAX_REASON_CHARS:
        reason = reason[:MAX_REASON_CHARS - 1] + "\u2026"
    return _UNRECORDABLE.sub("\ufffd", reason)


class DeliveryError(Exception):
    """`str(self)` is the reason recorded as the delivery's last error."""


class RetryableDeliveryError(DeliveryError):
    """A timeout, a lost connection, a 5xx, 429, 408, 409 or 425: the same send may succeed later.

    `retry_after` is the endpoint's own request (the Retry-After of a 429 or 503), in seconds, when it made one.
    """

    def __init__(self, reason: str, retry_after: float | None = None) -> None:
        super().__init__(reason)
        self.retry_after = retry_after


class PermanentDeliveryError(DeliveryError):
    """The endpoint refused the notification itself (another 4xx): sending it again cannot help."""
