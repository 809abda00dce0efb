"""Strings Postgres cannot hold and numbers JSON cannot carry are refused where they come in.

A NUL character (U+0000) in an alert passed the contract, went through evaluate, and then failed
aggregate's insert (Postgres text and jsonb refuse it), crashing the agent on every redelivery: one
message stopped a partition. An infinite event_ts was re-encoded as null and failed a stage later;
one in milliseconds broke every Slack and email delivery of it. They are now a 422 at the API and a
dead letter with the reason on `alerts.new`.
"""
from __future__ import annotations

import json
import math
import uuid

import pytest
from pydantic import ValidationError

from alerting_app.contracts import MAX_UNIX_S, Alert, Silence
from alerting_app.dead_letters import UndecodableMessage, decode
from test_api_support import API_LOOP, api, tenant  # noqa: F401  (fixtures)

GOOD = {"alert_id": "a-1", "event_ts": 1764000000.5, "severity": "HIGH", "source": "payments",
        "name": "CheckoutLatency", "context": {"region": "eu-west-1"}}


def refused_fields(**changes) -> set[str]:
    with pytest.raises(ValidationError) as refused:
        Alert.model_validate({**GOOD, **changes})
    return {".".join(str(part) for part in error["loc"]) for error in refused.value.errors()}


def test_a_good_alert_is_accepted():
    assert Alert.model_validate(GOOD).event_ts == 1764000000.5


@pytest.mark.parametrize("field", ["alert_id", "source", "name"])
def test_a_nul_character_in_a_text_field_is_refused_naming_it(field):
    assert refused_fields(**{field: "pay\x00ments"}) == {field}


def test_a_nul_character_in_a_context_key_or_value_is_refused():
    assert refused_fields(context={"region": "eu\x00west"}) == {"context.region"}
    assert refused_fields(context={"re\x00gion": "eu"}) == {"context.re\x00gion.[key]"}


@pytest.mark.parametrize("event_ts", [math.inf, -math.inf, math.nan, 1764000000500.0, 0.0])
def test_an_event_ts_that_is_not_finite_unix_seconds_is_refused(event_ts):
    assert refused_fields(event_ts=event_ts) == {"event_ts"}


def test_an_infinite_event_ts_on_alerts_new_is_undecodable_with_the_reason():
    # json.loads and pydantic's parser both read 1e400 as infinity.
    raw = json.dumps({**GOOD, "event_ts": 0}).replace('"event_ts": 0', '"event_ts": 1e400').encode()
    with pytest.raises(UndecodableMessage, match="event_ts"):
        decode(Alert, raw)



def test_the_reason_an_alert_is_undecodable_names_every_field_at_fault():
    raw = json.dumps({**GOOD, "severity": "URGENT", "name": None}).encode()

    with pytest.raises(UndecodableMessage) as refused:
        decode(Alert, raw)

    assert str(refused.value).startswith("severity: Input should be 'LOW', 'MEDIUM', 'HIGH' or 'CRITICAL'; name: ")

@pytest.mark.parametrize("field, value", [("event_ts", True), ("event_ts", "1764000000.5"), ("schema_version", 1.0),
                                          ("schema_version", "1")])
def test_a_number_given_as_a_boolean_string_or_float_is_undecodable_naming_it(field, value):
    # Read loosely, `"event_ts": true` was an alert of 1970, and "1764000000.5" passed as a number.
    with pytest.raises(UndecodableMessage, match=field):
        decode(Alert, json.dumps({**GOOD, field: value}).encode())


@pytest.mark.parametrize("field, value", [("version", "2"), ("version", 2.0), ("enabled", "off"), ("enabled", 1),
                                          ("group_window_s", "60")])
def test_a_rule_change_with_a_loosely_typed_field_is_undecodable_naming_it(field, value):
    from alerting_app.contracts import RuleChanged

    rule = {"rule_id": str(uuid.UUID(int=1)), "client_id": str(uuid.UUID(int=2)), "severity": "HIGH",
            "source": "payments", "name": "*", "version": 2}
    event = {"rule_id": rule["rule_id"], "client_id": rule["client_id"], "version": 2, "action": "upsert",
             "rule": {**rule, field: value}}
    if field == "version":
        event["version"] = value
    with pytest.raises(UndecodableMessage, match=field):
        decode(RuleChanged, json.dumps(event).encode())


def test_a_nul_character_in_a_silence_comment_is_refused():
    fields = dict(silence_id=str(uuid.uuid4()), client_id=str(uuid.uuid4()), severity="*", source="payments", name="*",
                  starts_at=1.0, ends_at=2.0, created_by="ops", version=1)
    assert Silence.model_validate({**fields, "comment": "ok"}).comment == "ok"
    with pytest.raises(ValidationError, match="comment"):
        Silence.model_validate({**fields, "comment": "bad\x00"})


@API_LOOP
async def test_the_api_refuses_an_alert_with_a_nul_character_naming_the_field(api):
    reply = await api.call("POST", "/api/v1/alerts", api.admin_token,
                           {**GOOD, "alert_id": f"a-{uuid.uuid4()}", "context": {"region": "eu\x00"}})
    assert reply.failing_fields() == {"context.region"}


def test_an_event_ts_in_milliseconds_is_refused_saying_it_wants_seconds():
    # The mistake the bound is for: the message said only `Input should be less than 253402300800`,
    # which leaves the sender to work out that its time is in milliseconds.
    with pytest.raises(ValidationError) as refused:
        Alert.model_validate({**GOOD, "event_ts": 1764000000500})
    [error] = refused.value.errors()
    assert error["loc"] == ("event_ts",)
    assert "unix seconds" in error["msg"] and "milliseconds" in error["msg"], error["msg"]
    assert Alert.model_validate({**GOOD, "event_ts": 253402300799.5}).event_ts == 253402300799.5


def test_an_event_ts_of_the_first_second_of_year_10000_is_refused_as_its_message_says():
    # "less than 253402300800": the bound itself is year 10000, which no time shown in a Slack
    # message or an email can represent.
    with pytest.raises(ValidationError) as refused:
        Alert.model_validate({**GOOD, "event_ts": float(MAX_UNIX_S)})
    [error] = refused.value.errors()
    assert error["loc"] == ("event_ts",) and f"less than {MAX_UNIX_S}" in error["msg"], error


@API_LOOP
async def test_the_api_refuses_an_event_ts_in_milliseconds_or_infinite(api):
    reply = await api.call("POST", "/api/v1/alerts", api.admin_token, {**GOOD, "event_ts": 1764000000500})
    assert reply.failing_fields() == {"event_ts"}
    raw = json.dumps({**GOOD, "event_ts": 0}).replace('"event_ts": 0', '"event_ts": 1e400').encode()
    reply = await api.call("POST", "/api/v1/alerts", api.admin_token, data=raw)
    assert reply.failing_fields() == {"event_ts"}


@API_LOOP
async def test_the_api_refuses_nul_characters_in_client_rule_and_endpoint_fields(api, tenant):
    assert (await api.call("POST", "/api/v1/clients", api.admin_token, {"name": "Ac\x00me"})).failing_fields() == {"name"}
    reply = await api.call("POST", "/api/v1/rules", tenant.key, {"severity": "HIGH", "source": "pay\x00", "name": "*"})
    assert reply.failing_fields() == {"source"}
    rule = await api.new_rule(tenant)
    reply = await api.call("POST", "/api/v1/endpoints", tenant.key,
                           {"rule_id": rule["rule_id"], "type": "email", "value": "ops\x00@example.com"})
    assert reply.failing_fields() == {"value"}


@API_LOOP
async def test_the_api_refuses_an_endpoint_rate_limit_below_one_per_thousand_seconds(api, tenant):
    rule = await api.new_rule(tenant)
    body = {"rule_id": rule["rule_id"], "type": "webhook", "value": "https://hooks.example.com/alerts"}
    reply = await api.call("POST", "/api/v1/endpoints", tenant.key, {**body, "rate_limit_per_s": 0.0001})
    assert reply.failing_fields() == {"rate_limit_per_s"}
    reply = await api.call("POST", "/api/v1/endpoints", tenant.key, {**body, "rate_limit_per_s": 0.001})
    assert reply.status == 201, reply.body


@API_LOOP
async def test_the_api_refuses_an_endpoint_rate_limit_above_100000_a_second(api, tenant):
    # docs/delivery.md: 0.001 to 100,000 per second.
    rule = await api.new_rule(tenant)
    body = {"rule_id": rule["rule_id"], "type": "webhook", "value": "https://hooks.example.com/alerts"}
    reply = await api.call("POST", "/api/v1/endpoints", tenant.key, {**body, "rate_limit_per_s": 100_000.5})
    assert reply.failing_fields() == {"rate_limit_per_s"}
    reply = await api.call("POST", "/api/v1/endpoints", tenant.key, {**body, "rate_limit_per_s": 100_000})
    assert reply.status == 201, reply.body


@API_LOOP
async def test_the_api_refuses_nul_characters_in_silence_fields(api, tenant):
    body = {"source": "payments", "ends_at": "2999-01-01T00:00:00Z", "comment": "deploy", "created_by": "ops"}
    for field in ("source", "comment", "created_by"):
        reply = await api.call("POST", "/api/v1/silences", tenant.key, {**body, field: "x\x00y"})
        assert reply.failing_fields() == {field}
