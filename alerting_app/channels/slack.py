"""Slack channel: a message for a Slack incoming webhook, readable in the channel and in a push.

`text` is what notifications and old clients show; `blocks` (Block Kit) lay out each alert with
its severity, source, name, time and context, and say how many alerts a grouped notification holds.
"""
from __future__ import annotations

import json

import aiohttp

from alerting_app.channels.http import post
from alerting_app.channels.summary import alert_count, event_time, headline
from alerting_app.contracts import Alert, NotificationReady

# Slack allows 50 blocks a message; each shown alert takes two, and four frame the message.
MAX_ALERTS_SHOWN = 20
_HEADER_LIMIT = 150  # characters of a header block
_TEXT_LIMIT = 3000  # characters of a section's text


def escape(text: str) -> str:
    # Slack's mrkdwn treats these three as control characters (links, mentions).
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def _clip(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _alert_blocks(alert: Alert) -> list[dict]:
    fields = [
        f"*Severity*\n{alert.severity.value}",
        f"*Source*\n{escape(alert.source)}",
        f"*Name*\n{escape(alert.name)}",
        f"*When*\n{event_time(alert)}",
    ]
    context = "\n".join(f"• {escape(key)}: `{escape(value)}`" for key, value in sorted(alert.context.items()))
    # verbatim: Slack's default pre-pass links bare URLs and channel names and parses some mentions
    # in mrkdwn text; text from an alert is shown as written.
    return [
        {"type": "section", "fields": [{"type": "mrkdwn", "text": _clip(f, 2000), "verbatim": True} for f in fields]},
        {"type": "section", "text": {"type": "mrkdwn", "text": _clip(context or "_no context_", _TEXT_LIMIT),
                                     "verbatim": True}},
    ]


def slack_message(notification: NotificationReady) -> dict:
    title = headline(notification)
    count = alert_count(notification)
    blocks: list[dict] = [{"type": "header", "text": {"type": "plain_text", "text": _clip(title, _HEADER_LIMIT)}}]
    if count > 1:
        blocks.append({"type": "context", "elements": [
            {"type": "mrkdwn", "text": f"*{count} alerts* grouped in this notification"}]})
    for alert in notification.alerts[:MAX_ALERTS_SHOWN]:
        blocks.extend(_alert_blocks(alert))
    shown = min(len(notification.alerts), MAX_ALERTS_SHOWN)
    if count > shown:
        blocks.append({"type": "context", "elements": [
            {"type": "mrkdwn", "text": f"and {count - shown} more not shown"}]})
    blocks.append({"type": "context", "elements": [
        {"type": "mrkdwn", "text": f"notification `{notification.notification_id}`"}]})
    return {"text": escape(title), "blocks": blocks}


async def send_slack(session: aiohttp.ClientSession, url: str, notification: NotificationReady,
                     timeout_s: float) -> None:
    body = json.dumps(slack_message(notification)).encode()
    await post(session, url, body, {"Content-Type": "application/json"}, timeout_s)
