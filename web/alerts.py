"""POST /api/v1/alerts: alerts from monitored systems over HTTP, published to `alerts.new`.

The admin token, or INGEST_TOKEN (which may do nothing else): alerts describe monitored systems,
not any one tenant.
"""
from __future__ import annotations

import asyncio
from typing import Annotated

from aiokafka.errors import KafkaError
from faust.exceptions import NotReady, ProducerSendError
from faust.web import Request, Response
from pydantic import Field, TypeAdapter

from alerting_app.app import alerts_new, app
from alerting_app.contracts import Alert
from web.auth import ApiView
from web.errors import BrokerUnavailable, Forbidden
from web.schemas import AlertsAccepted
from web.validation import parse_json, validate_as

MAX_ALERTS_PER_REQUEST = 1000

_one = TypeAdapter(Alert)
# A list is validated as a whole before anything is sent; its errors name the index (`2.severity`).
_many = TypeAdapter(Annotated[list[Alert], Field(min_length=1, max_length=MAX_ALERTS_PER_REQUEST)])


# How long a request waits for the broker's acknowledgements. The producer's own request timeout
# is Faust's default, 20 minutes: with a broker that is down or hung, the request would outlast any
# client's timeout, which then gets no 503 to retry on, while the worker holds the open requests.
ACK_TIMEOUT_S = 30.0


async def publish_alerts(alerts: list[Alert]) -> None:
    """Send every alert keyed by alert_id and wait until the broker acknowledged all of them, or
    raise TimeoutError after ACK_TIMEOUT_S (the sends go on: an alert may still be published)."""
    async with asyncio.timeout(ACK_TIMEOUT_S):
        acks = [await alerts_new.send(key=alert.alert_id.encode(), value=alert.encode()) for alert in alerts]
        # Shielded: giving up waiting must not cancel the producer's own futures for the messages.
        await asyncio.gather(*(asyncio.shield(ack) for ack in acks))


@app.page("/api/v1/alerts")
class AlertsView(ApiView):
    body_methods = frozenset({"POST"})
    accepts_alert_sources = True

    async def post(self, request: Request) -> Response:
        caller = self.caller(request)
        if not caller.alert_source and not caller.is_admin:
            # Alerts are not a tenant's: every client's rules match them.
            raise Forbidden("alerts are sent with the admin token (ADMIN_TOKEN) or the ingest token (INGEST_TOKEN), "
                            "not a client key")
        data = parse_json(await self.read_request_content(request))
        alerts = validate_as(data, _many) if isinstance(data, list) else [validate_as(data, _one)]
        try:
            await publish_alerts(alerts)
        except (KafkaError, ProducerSendError) as exc:  # Faust wraps aiokafka's errors raised by a send
            raise BrokerUnavailable(message=str(exc)) from None
        except NotReady:
            # The producer stopped, the web server not yet: a worker without agents (`--roles api`)
            # stops them in that order. Another worker, or this one restarted, takes them.
            raise BrokerUnavailable(message="this worker is not sending to the broker now (it is stopping); "
                                            "send the alerts again") from None
        except TimeoutError:
            raise BrokerUnavailable(
                message=f"the broker did not acknowledge every alert within {ACK_TIMEOUT_S:g} s") from None
        accepted = AlertsAccepted(alert_ids=[alert.alert_id for alert in alerts])
        return self.json(accepted.model_dump(mode="json"), status=202)
