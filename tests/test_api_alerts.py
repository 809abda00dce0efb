"""POST /api/v1/alerts publishes alerts to `alerts.new` on the real broker, keyed by alert_id."""
from __future__ import annotations

import json
import uuid

from kafka_probe import read_topic
from test_api_support import API_LOOP, api, broker, tenant  # noqa: F401  (fixtures)

pytestmark = API_LOOP


def an_alert(**fields) -> dict:
    # A source of its own: workers started later by other tests replay alerts.new from the start,
    # and their rules should not match these.
    return {"alert_id": f"alert-{uuid.uuid4()}", "event_ts": 1764000000.5, "severity": "HIGH",
            "source": "api-alert-intake-test", "name": "CheckoutLatency", "context": {"region": "eu-west-1"},
            **fields}


async def published(broker: str, alert_ids: set[str]) -> dict[str, dict]:
    """The messages on alerts.new keyed by these alert_ids (other tests also put garbage there)."""
    keys = {alert_id.encode() for alert_id in alert_ids}
    found = {}
    for key, value in await read_topic(broker, "alerts.new"):
        if key in keys:
            message = json.loads(value)
            assert key == message["alert_id"].encode()
            found[message["alert_id"]] = message
    return found


async def test_one_alert_is_accepted_and_published_to_alerts_new(api, broker):
    alert = an_alert()
    reply = await api.call("POST", "/api/v1/alerts", api.admin_token, alert)
    assert reply.status == 202
    assert reply.body == {"alert_ids": [alert["alert_id"]]}
    assert await published(broker, {alert["alert_id"]}) == {alert["alert_id"]: {**alert, "schema_version": 1}}


async def test_a_list_of_alerts_is_published_whole(api, broker):
    alerts = [an_alert(), an_alert(severity="LOW"), an_alert(name="DiskFull", context={})]
    reply = await api.call("POST", "/api/v1/alerts", api.admin_token, alerts)
    assert reply.status == 202
    assert reply.body["alert_ids"] == [a["alert_id"] for a in alerts]
    assert set(await published(broker, {a["alert_id"] for a in alerts})) == {a["alert_id"] for a in alerts}


async def test_a_list_with_one_invalid_alert_is_refused_and_none_of_it_is_sent(api, broker):
    good, bad = an_alert(), an_alert(severity="SEVERE")
    reply = await api.call("POST", "/api/v1/alerts", api.admin_token, [good, bad])
    assert reply.failing_fields() == {"1.severity"}
    # A later valid alert goes through, so reading the topic does show what was sent.
    later = an_alert()
    assert (await api.call("POST", "/api/v1/alerts", api.admin_token, later)).status == 202
    assert set(await published(broker, {good["alert_id"], bad["alert_id"], later["alert_id"]})) == {later["alert_id"]}


async def test_an_alert_missing_a_field_is_refused_naming_it(api):
    alert = an_alert()
    del alert["source"]
    assert (await api.call("POST", "/api/v1/alerts", api.admin_token, alert)).failing_fields() == {"source"}


async def test_an_empty_list_of_alerts_is_refused(api):
    assert (await api.call("POST", "/api/v1/alerts", api.admin_token, [])).status == 422


async def test_a_list_of_the_most_alerts_is_published_and_one_more_is_refused_whole(api, broker):
    # docs/api.md: a list of 1 to 1,000 (MAX_ALERTS_PER_REQUEST).
    from web.alerts import MAX_ALERTS_PER_REQUEST

    too_many = [an_alert() for _ in range(MAX_ALERTS_PER_REQUEST + 1)]
    assert (await api.call("POST", "/api/v1/alerts", api.admin_token, too_many)).failing_fields() == {"body"}
    most = too_many[1:]
    reply = await api.call("POST", "/api/v1/alerts", api.admin_token, most)
    assert reply.status == 202, reply.body
    assert set(await published(broker, {a["alert_id"] for a in too_many})) == {a["alert_id"] for a in most}


async def test_an_alert_body_that_is_not_json_is_refused(api):
    reply = await api.call("POST", "/api/v1/alerts", api.admin_token, data=b"HIGH payments CheckoutLatency")
    assert reply.failing_fields() == {"body"}


async def test_a_client_key_may_not_post_alerts_and_nothing_is_sent(api, tenant, broker):
    alert = an_alert()
    reply = await api.call("POST", "/api/v1/alerts", tenant.key, alert)
    # A tenant trying its key here was told only "forbidden", as if the key were wrong.
    assert (reply.status, reply.body) == (403, {
        "error": "forbidden",
        "message": "alerts are sent with the admin token (ADMIN_TOKEN) or the ingest token (INGEST_TOKEN), "
                   "not a client key"})
    assert await published(broker, {alert["alert_id"]}) == {}


INGEST_TOKEN = "ingest-" + uuid.uuid4().hex


def with_ingest_token(monkeypatch) -> str:
    from alerting_app.app import settings

    monkeypatch.setattr(settings, "ingest_token", INGEST_TOKEN)
    return INGEST_TOKEN


async def test_an_alert_source_with_the_ingest_token_sends_alerts(api, broker, monkeypatch):
    token = with_ingest_token(monkeypatch)
    alert = an_alert()

    reply = await api.call("POST", "/api/v1/alerts", token, alert)

    assert reply.status == 202
    assert set(await published(broker, {alert["alert_id"]})) == {alert["alert_id"]}


async def test_the_ingest_token_opens_no_other_route(api, tenant, monkeypatch):
    from test_api_auth import UNKNOWN, served_api_routes

    token = with_ingest_token(monkeypatch)
    for method, template in sorted(served_api_routes() - {("POST", "/api/v1/alerts")}):
        path = template.format(client_id=tenant.client_id, rule_id=UNKNOWN, endpoint_id=UNKNOWN,
                               notification_id=UNKNOWN, silence_id=UNKNOWN)
        reply = await api.call(method, path, token, {})
        assert (reply.status, reply.body) == (403, {
            "error": "forbidden",
            "message": "the ingest token (INGEST_TOKEN) may only send alerts (POST /api/v1/alerts)"}), (method, path)


async def test_without_an_ingest_token_set_none_is_accepted(api):
    reply = await api.call("POST", "/api/v1/alerts", INGEST_TOKEN, an_alert())

    assert reply.status == 401


async def test_alerts_sent_while_the_workers_producer_is_stopped_answer_503_to_send_again(api, broker):
    """A worker without agents (`--roles api`) stops its producer before its web server: alerts that
    came in between answered 500, which a client takes for a fault of ours, not a 503 to retry."""
    from alerting_app.app import app

    await api.call("POST", "/api/v1/alerts", api.admin_token, an_alert())  # the producer is running
    await app.producer.stop()
    try:
        async with api.client.post("/api/v1/alerts", json=an_alert(),
                                   headers={"Authorization": f"Bearer {api.admin_token}"}) as response:
            status, text = response.status, await response.text()
    finally:
        app.producer.service_reset()  # started again by the next send, as after a restart
    assert status == 503, text
    assert json.loads(text)["error"] == "broker_unavailable"
    alert = an_alert()
    assert (await api.call("POST", "/api/v1/alerts", api.admin_token, alert)).status == 202
    assert set(await published(broker, {alert["alert_id"]})) == {alert["alert_id"]}
