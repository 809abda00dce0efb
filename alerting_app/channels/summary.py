"""What a person reads first about a notification: shared by the Slack and email messages."""
from __future__ import annotations

from datetime import datetime, timezone

from alerting_app.contracts import Alert, NotificationReady, Severity

_RANK = {severity: rank for rank, severity in enumerate(Severity)}


def highest_severity(notification: NotificationReady) -> Severity:
    return max((alert.severity for alert in notification.alerts), key=_RANK.__getitem__)


def describe(alert: Alert) -> str:
    return f"{alert.source}: {alert.name}"


def alert_count(notification: NotificationReady) -> int:
    """How many alerts the notification stands for: those listed and those a full group left out."""
    return len(notification.alerts) + notification.truncated_alerts


def headline(notification: NotificationReady) -> str:
    """`[HIGH] payments: CheckoutLatency`, or for a group `[CRITICAL] 3 alerts: payments: Checkout…, +2 more`."""
    first, count = notification.alerts[0], alert_count(notification)
    severity = highest_severity(notification).value
    if count == 1:
        return f"[{severity}] {describe(first)}"
    return f"[{severity}] {count} alerts: {describe(first)}, +{count - 1} more"


def event_time(alert: Alert) -> str:
    """The alert's time in UTC, or its raw number when that is no date Python can print (e.g.
    milliseconds given as seconds): a message with an odd time beats no message at all."""
    try:
        return datetime.fromtimestamp(alert.event_ts, timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
    except (OverflowError, OSError, ValueError):
        return f"{alert.event_ts!r} (unix seconds, out of range)"
