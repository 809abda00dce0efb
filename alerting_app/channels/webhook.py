"""Webhook channel: the notification as versioned JSON, signed with the endpoint's secret.

Receivers verify `X-Alerting-Signature-Timestamped` (HMAC-SHA256 of `X-Alerting-Timestamp`, a dot
and the raw body), refuse a timestamp older than a few minutes (so a captured request cannot be
replayed later), and drop repeats by `Idempotency-Key`, which is the same for every attempt to
deliver one notification to one endpoint. `X-Alerting-Signature` (the body alone) is still sent for
receivers written before the timestamp. docs/delivery.md documents the payload.
"""
from __future__ import annotations

import hashlib
import hmac
import time

import aiohttp
from pydantic_core import to_json

from alerting_app.channels.http import post
from alerting_app.contracts import NotificationReady

PAYLOAD_VERSION = 1
SIGNATURE_HEADER = "X-Alerting-Signature"
TIMESTAMP_HEADER = "X-Alerting-Timestamp"
TIMESTAMPED_SIGNATURE_HEADER = "X-Alerting-Signature-Timestamped"


def webhook_body(notification: NotificationReady) -> bytes:
    payload = {
        "version": PAYLOAD_VERSION,
        "notification_id": notification.notification_id,
        "client_id": notification.client_id,
        "rule_ids": notification.rule_ids,
        "alerts": notification.alerts,
        "created_at": notification.created_at,
    }
    if notification.group_rule_id is not None:  # a grouped notification (docs/grouping.md)
        payload.update(group_rule_id=notification.group_rule_id, truncated_alerts=notification.truncated_alerts)
    # pydantic's serialiser (Rust), compact like json.dumps(separators=(",", ":")), with the alerts
    # as their models: 2 us per body against 13 us for json.dumps of model_dump()s, paid by every
    # POST. Non-ASCII text goes as UTF-8, not as \u escapes (both are JSON; the signature covers the bytes).
    return to_json(payload)


def signature(secret: str, body: bytes) -> str:
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def timestamped_signature(secret: str, timestamp: str, body: bytes) -> str:
    # The timestamp is inside what is signed, so a receiver that refuses old timestamps refuses a
    # captured request replayed later: changing the timestamp breaks the signature.
    mac = hmac.new(secret.encode(), timestamp.encode() + b".", hashlib.sha256)
    mac.update(body)
    return "sha256=" + mac.hexdigest()


def idempotency_key(notification_id: str, endpoint_id: str) -> str:
    return f"{notification_id}:{endpoint_id}"


async def send_webhook(session: aiohttp.ClientSession, url: str, secret: str, endpoint_id: str,
                       notification: NotificationReady, timeout_s: float) -> None:
    body = webhook_body(notification)
    timestamp = str(int(time.time()))  # each attempt's own: a retry is signed when it is sent
    headers = {
        "Content-Type": "application/json",
        "Idempotency-Key": idempotency_key(notification.notification_id, endpoint_id),
        SIGNATURE_HEADER: signature(secret, body),
        TIMESTAMP_HEADER: timestamp,
        TIMESTAMPED_SIGNATURE_HEADER: timestamped_signature(secret, timestamp, body),
    }
    await post(session, url, body, headers, timeout_s)
