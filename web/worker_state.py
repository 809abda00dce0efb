"""What this worker holds: its rules and how it would match an alert (admin only).

Every worker must hold every rule. These views let an operator, and the multi-worker tests, ask
one worker directly instead of inferring it from deliveries.
"""
from __future__ import annotations

import hashlib

from faust.web import Request, Response
from pydantic import TypeAdapter

from alerting_app.app import app
from alerting_app.contracts import Alert
from tables.rules import rule_index
from web.auth import ApiView
from web.validation import parse_json, validate_as

_alert = TypeAdapter(Alert)


def rules_digest(versions: dict[str, int]) -> str:
    """A short fingerprint of (rule_id, version) pairs, equal on two workers holding the same rules."""
    text = "\n".join(f"{rule_id}:{version}" for rule_id, version in sorted(versions.items()))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


@app.page("/api/v1/worker/rules")
class WorkerRulesView(ApiView):
    async def get(self, request: Request) -> Response:
        self.caller(request).require_admin("reading a worker's rules")
        enabled = rule_index.enabled_versions()
        return self.json({"enabled_rules": len(enabled), "digest": rules_digest(enabled), "versions": enabled,
                          "deleted_versions": rule_index.deleted_versions()})


@app.page("/api/v1/worker/match")
class WorkerMatchView(ApiView):
    body_methods = frozenset({"POST"})

    async def post(self, request: Request) -> Response:
        self.caller(request).require_admin("matching an alert on a worker")
        alert = validate_as(parse_json(await self.read_request_content(request)), _alert)
        return self.json({"matches": rule_index.match(alert)})
