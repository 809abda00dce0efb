"""POST /api/v1/alerts: alerts from monitored systems over HTTP, published to `alerts.new`.

The admin token, or INGEST_TOKEN (which may do nothing else): alerts describe monitored systems,
not any one tenant.
"""
from __future__ import annotations

import asyncio
from typing import Annotated

from aiokafka.errors import KafkaError
from faust.web import Request, Response
from pydantic import Field, TypeAdapter

from alerting_app.app import alerts_new, app
from alerting_app.contracts import Alert
from web.auth import ApiView
from web.errors import BrokerUnavailable
from web.schemas import AlertsAccepted
from web.validation import parse_json, validate_as

MAX_ALERTS_PER_REQUEST = 1000

_one = TypeAdapter(Alert)
# A list is validated as a whole before anything is sent; its errors name the index (`2.severity`).
_many = TypeAdapter(Annotated[list[Alert], Field(min_length=1, max_length=MAX_ALERTS_PER_REQUEST)])


async def publish_alerts(alerts: list[Alert]) -> None:
    """Send every alert keyed by alert_id and wait until the broker acknowledged all of them."""
    acks = [await alerts_new.send(key=alert.alert_id.encode(), value=alert.encode()) for alert in alerts]
    await asyncio.gather(*acks)


@app.page("/api/v1/alerts")
class AlertsView(ApiView):
    accepts_alert_sources = True

    async def post(self, request: Request) -> Response:
        caller = self.caller(request)
        if not caller.alert_source:
            caller.require_admin()
        data = parse_json(await self.read_request_content(request))
        alerts = validate_as(data, _many) if isinstance(data, list) else [validate_as(data, _one)]
        try:
            await publish_alerts(alerts)
        except KafkaError as exc:
            raise BrokerUnavailable(message=str(exc)) from None
        accepted = AlertsAccepted(alert_ids=[alert.alert_id for alert in alerts])
        return self.json(accepted.model_dump(mode="json"), status=202)
