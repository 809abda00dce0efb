"""The API's writes under concurrent requests: quotas, duplicates, versions, deletions, rotations
and retries each hold when many requests for the same thing arrive at once (asyncio.gather)."""
from __future__ import annotations

import asyncio
import uuid
from collections import Counter
from datetime import datetime, timedelta, timezone

from alerting_app.contracts import RuleChanged
from kafka_probe import read_topic
from test_api_notifications import store_notification
from test_api_support import API_LOOP, api, broker, tenant  # noqa: F401  (fixtures)

pytestmark = API_LOOP


def _silence(source: str = "payments") -> dict:
    ends_at = datetime.now(timezone.utc) + timedelta(minutes=60)
    return {"source": source, "ends_at": ends_at.isoformat(), "comment": "maintenance", "created_by": "ops"}


async def outbox_events(rule_id: str) -> list[RuleChanged]:
    from alerting_app import db

    pool = await db.pool()
    rows = await pool.fetch("SELECT payload FROM rule_outbox WHERE rule_id = $1 ORDER BY outbox_id", rule_id)
    return [RuleChanged.model_validate(row["payload"]) for row in rows]


async def once_rows(table: str, column: str, value: str, at_least: int, call):
    """`call` once `table` holds `at_least` rows of `value`: a deletion made while creations are
    under way, not before the first of them reached the database."""
    from alerting_app import db

    pool = await db.pool()
    async with asyncio.timeout(30):  # a bound only
        while await pool.fetchval(f"SELECT count(*) FROM {table} WHERE {column} = $1", value) < at_least:
            await asyncio.sleep(0.002)
    return await call


def statuses(replies) -> Counter:
    return Counter(reply.status for reply in replies)


async def test_concurrent_creations_with_one_rule_slot_left_create_exactly_one(api, tenant, monkeypatch):
    from alerting_app.app import settings
    monkeypatch.setattr(settings, "max_rules_per_client", 3)
    await api.new_rule(tenant, source="a")
    await api.new_rule(tenant, source="b")
    replies = await asyncio.gather(*(
        api.call("POST", "/api/v1/rules", tenant.key, {"severity": "HIGH", "source": f"s{n}", "name": "*"})
        for n in range(30)))
    assert statuses(replies) == {201: 1, 409: 29}, [r.body for r in replies if r.status not in (201, 409)]
    assert len((await api.call("GET", "/api/v1/rules", tenant.key)).body["items"]) == 3


async def test_concurrent_identical_rules_create_one_and_refuse_the_rest_as_duplicates(api, tenant):
    replies = await asyncio.gather(*(
        api.call("POST", "/api/v1/rules", tenant.key, {"severity": "HIGH", "source": "dup", "name": "*"})
        for _ in range(30)))
    assert statuses(replies) == {201: 1, 409: 29}, [r.body for r in replies if r.status not in (201, 409)]
    assert all("same severity" in r.body["message"] for r in replies if r.status == 409)


async def test_concurrent_endpoints_with_one_slot_left_on_the_rule_create_exactly_one(api, tenant, monkeypatch):
    from alerting_app.app import settings
    monkeypatch.setattr(settings, "max_endpoints_per_rule", 2)
    rule = await api.new_rule(tenant)
    await api.new_endpoint(tenant, rule["rule_id"])
    replies = await asyncio.gather(*(
        api.call("POST", "/api/v1/endpoints", tenant.key,
                 {"rule_id": rule["rule_id"], "type": "webhook", "value": f"https://hooks.example.com/{n}"})
        for n in range(30)))
    assert statuses(replies) == {201: 1, 409: 29}, [r.body for r in replies if r.status not in (201, 409)]
    listed = await api.call("GET", "/api/v1/endpoints", tenant.key, params={"rule_id": rule["rule_id"]})
    assert len(listed.body["items"]) == 2


async def test_concurrent_silences_with_one_slot_left_create_exactly_one(api, tenant, monkeypatch):
    from alerting_app.app import settings
    monkeypatch.setattr(settings, "max_silences_per_client", 2)
    assert (await api.call("POST", "/api/v1/silences", tenant.key, _silence())).status == 201
    replies = await asyncio.gather(*(api.call("POST", "/api/v1/silences", tenant.key, _silence(f"s{n}"))
                                     for n in range(30)))
    assert statuses(replies) == {201: 1, 409: 29}, [r.body for r in replies if r.status not in (201, 409)]


async def test_concurrent_changes_at_one_version_let_exactly_one_win_and_queue_in_order(api, tenant):
    rule = await api.new_rule(tenant)
    path = f"/api/v1/rules/{rule['rule_id']}"
    puts = [api.call("PUT", path, tenant.key, {"version": 1, "severity": "HIGH", "source": "payments",
                                               "name": f"n{n}", "enabled": True}) for n in range(15)]
    patches = [api.call("PATCH", path, tenant.key, {"version": 1, "name": f"p{n}"}) for n in range(15)]
    replies = await asyncio.gather(*puts, *patches)
    assert statuses(replies) == {200: 1, 409: 29}, [r.body for r in replies if r.status not in (200, 409)]

    # Then a free-for-all: each change reads the version and tries it, until ten have landed.
    async def change(n: int) -> int:
        won = 0
        while won == 0:
            current = await api.call("GET", path, tenant.key)
            reply = await api.call("PATCH", path, tenant.key, {"version": current.body["version"], "name": f"q{n}"})
            assert reply.status in (200, 409), reply.body
            won = reply.status == 200
        return 1
    assert sum(await asyncio.gather(*(change(n) for n in range(10)))) == 10

    stored = (await api.call("GET", path, tenant.key)).body
    events = await outbox_events(rule["rule_id"])
    assert [event.version for event in events] == list(range(1, 13))
    assert stored["version"] == 12 and events[-1].rule.name == stored["name"]


async def test_deleting_a_client_while_its_things_are_created_leaves_no_orphans_and_no_500(api):
    from alerting_app import db

    for _ in range(3):
        doomed = await api.new_tenant(f"doomed-{uuid.uuid4().hex[:8]}")
        rule = await api.new_rule(doomed, source="base")
        creations = [api.call("POST", "/api/v1/rules", doomed.key, {"severity": "HIGH", "source": f"s{n}", "name": "*"})
                     for n in range(30)]
        creations += [api.call("POST", "/api/v1/endpoints", doomed.key,
                               {"rule_id": rule["rule_id"], "type": "webhook", "value": f"https://h.example.com/{n}"})
                      for n in range(15)]
        creations += [api.call("POST", "/api/v1/silences", doomed.key, _silence(f"s{n}")) for n in range(15)]
        creations += [api.call("PATCH", f"/api/v1/rules/{rule['rule_id']}", doomed.key,
                               {"version": 1, "enabled": False}) for n in range(5)]
        deletion = once_rows("rules", "client_id", doomed.client_id, 4,
                             api.call("DELETE", f"/api/v1/clients/{doomed.client_id}", api.admin_token))
        replies = await asyncio.gather(deletion, *creations)
        assert all(r.status < 500 for r in replies), [(r.status, r.body) for r in replies if r.status >= 500]
        assert replies[0].status == 204

        pool = await db.pool()
        for table in ("rules", "endpoints", "silences"):
            assert await pool.fetchval(f"SELECT count(*) FROM {table} WHERE client_id = $1",
                                       doomed.client_id) == 0, table
        created = [r.body["rule_id"] for r in replies if r.status == 201 and "rule_id" in r.body
                   and "endpoint_id" not in r.body] + [rule["rule_id"]]
        for rule_id in created:
            events = await outbox_events(rule_id)
            assert events[-1].action == "delete", rule_id
            assert [e.version for e in events] == sorted({e.version for e in events})
        silences = [r.body["silence_id"] for r in replies if r.status == 201 and "silence_id" in r.body]
        for silence_id in silences:
            last = await pool.fetchval("SELECT payload->>'action' FROM silence_outbox WHERE silence_id = $1"
                                       " ORDER BY outbox_id DESC LIMIT 1", silence_id)
            assert last == "delete", silence_id


async def test_deleting_a_rule_while_endpoints_are_added_leaves_none_behind(api, tenant):
    from alerting_app import db

    for _ in range(3):
        rule = await api.new_rule(tenant, source=f"r{uuid.uuid4().hex[:6]}")
        adds = [api.call("POST", "/api/v1/endpoints", tenant.key,
                         {"rule_id": rule["rule_id"], "type": "webhook", "value": f"https://h.example.com/{n}"})
                for n in range(40)]
        deletion = once_rows("endpoints", "rule_id", rule["rule_id"], 3,
                             api.call("DELETE", f"/api/v1/rules/{rule['rule_id']}", tenant.key))
        replies = await asyncio.gather(deletion, *adds)
        assert all(r.status in (201, 204, 409, 422) for r in replies), [(r.status, r.body) for r in replies]
        assert replies[0].status == 204
        pool = await db.pool()
        assert await pool.fetchval("SELECT count(*) FROM endpoints WHERE rule_id = $1", rule["rule_id"]) == 0


async def test_a_key_replaced_while_it_is_in_use_answers_401_or_success_never_500(api, tenant):
    rules = [api.call("POST", "/api/v1/rules", tenant.key, {"severity": "HIGH", "source": f"k{n}", "name": "*"})
             for n in range(40)]
    rotations = [once_rows("rules", "client_id", tenant.client_id, 3,
                           api.call("POST", f"/api/v1/clients/{tenant.client_id}/key", tenant.key)) for _ in range(5)]
    replies = await asyncio.gather(*rotations, *rules)
    assert all(r.status in (200, 201, 401) for r in replies), [(r.status, r.body) for r in replies]
    keys = [r.body["api_key"] for r in replies if r.status == 200]
    assert keys
    working = [key for key in keys if (await api.call("GET", "/api/v1/rules", key)).status == 200]
    assert len(working) == 1
    assert (await api.call("GET", "/api/v1/rules", tenant.key)).status == 401


async def test_secrets_replaced_concurrently_leave_one_of_those_shown_stored(api, tenant):
    from alerting_app import db

    rule = await api.new_rule(tenant)
    endpoint = await api.new_endpoint(tenant, rule["rule_id"])
    path = f"/api/v1/endpoints/{endpoint['endpoint_id']}"
    replies = await asyncio.gather(*(api.call("POST", path + "/secret", tenant.key) for _ in range(20)),
                                   *(api.call("PATCH", path, tenant.key, {"enabled": n % 2 == 0}) for n in range(10)))
    assert all(r.status == 200 for r in replies), [(r.status, r.body) for r in replies]
    pool = await db.pool()
    stored = await pool.fetchval("SELECT secret FROM endpoints WHERE endpoint_id = $1", endpoint["endpoint_id"])
    assert stored in {r.body["secret"] for r in replies[:20]}


async def test_concurrent_retries_of_a_failed_notification_reopen_it_once(api, tenant):
    rule = await api.new_rule(tenant)
    hook = await api.new_endpoint(tenant, rule["rule_id"])
    notification_id = await store_notification(
        tenant.client_id, rule["rule_id"], "concurrent-retry", "FAILED",
        ((hook["endpoint_id"], "webhook", "FAILED", 8, "HTTP 502"),))
    replies = await asyncio.gather(*(api.call("POST", f"/api/v1/notifications/{notification_id}/retry", tenant.key)
                                     for _ in range(30)))
    assert statuses(replies) == {202: 1, 409: 29}, [(r.status, r.body) for r in replies if r.status not in (202, 409)]


async def test_concurrent_expiries_of_a_silence_queue_versions_in_order_ending_at_the_stored_one(api, tenant):
    from alerting_app import db

    for _ in range(5):
        silence = (await api.call("POST", "/api/v1/silences", tenant.key, _silence())).body
        path = f"/api/v1/silences/{silence['silence_id']}"
        replies = await asyncio.gather(*(api.call("DELETE", path, tenant.key) for _ in range(20)))
        assert statuses(replies) == {204: 20}
        pool = await db.pool()
        versions = [row["v"] for row in await pool.fetch(
            "SELECT (payload->>'version')::int AS v FROM silence_outbox WHERE silence_id = $1 ORDER BY outbox_id",
            silence["silence_id"])]
        stored = (await api.call("GET", path, tenant.key)).body
        assert versions == sorted(set(versions)) and versions[-1] == stored["version"]
        assert stored["state"] == "expired"
        assert versions == [1, 2], "expiring an expired silence changes nothing"


async def test_concurrent_address_changes_store_one_of_those_given(api, tenant):
    rule = await api.new_rule(tenant)
    endpoint = await api.new_endpoint(tenant, rule["rule_id"])
    path = f"/api/v1/endpoints/{endpoint['endpoint_id']}"
    replies = await asyncio.gather(*(api.call("PATCH", path, tenant.key, {"type": "webhook", "value": f"https://h{n}.example.com/x"})
                                     for n in range(20)),
                                   *(api.call("PATCH", path, tenant.key, {"type": "email", "value": f"o{n}@example.com"})
                                     for n in range(10)))
    assert all(r.status == 200 for r in replies), [(r.status, r.body) for r in replies]
    stored = (await api.call("GET", path, tenant.key)).body
    assert (stored["type"], stored["value"]) in {(r.body["type"], r.body["value"]) for r in replies}


async def test_deleting_a_client_while_its_silences_expire_and_rules_change(api):
    from alerting_app import db

    doomed = await api.new_tenant(f"doomed-{uuid.uuid4().hex[:8]}")
    silences = [(await api.call("POST", "/api/v1/silences", doomed.key, _silence(f"s{n}"))).body for n in range(10)]
    rules = [await api.new_rule(doomed, source=f"r{n}") for n in range(10)]
    calls = [api.call("DELETE", f"/api/v1/silences/{s['silence_id']}", doomed.key) for s in silences]
    calls += [api.call("PATCH", f"/api/v1/rules/{r['rule_id']}", doomed.key, {"version": 1, "enabled": False})
              for r in rules]
    calls += [api.call("DELETE", f"/api/v1/rules/{r['rule_id']}", doomed.key) for r in rules[::2]]
    deletion = api.call("DELETE", f"/api/v1/clients/{doomed.client_id}", api.admin_token)
    replies = await asyncio.gather(*calls[:15], deletion, *calls[15:])
    assert all(r.status < 500 for r in replies), [(r.status, r.body) for r in replies if r.status >= 500]
    pool = await db.pool()
    for s in silences:
        rows = await pool.fetch("SELECT payload FROM silence_outbox WHERE silence_id = $1 ORDER BY outbox_id",
                                s["silence_id"])
        versions = [row["payload"]["version"] for row in rows]
        assert versions == sorted(set(versions)) and rows[-1]["payload"]["action"] == "delete", versions
    for r in rules:
        events = await outbox_events(r["rule_id"])
        assert [e.version for e in events] == sorted({e.version for e in events})
        assert events[-1].action == "delete"


async def test_changes_relayed_while_they_are_made_reach_the_topic_in_version_order(api, tenant, broker):
    from agents.rule_outbox import relay_pending
    from alerting_app import db

    rules = [await api.new_rule(tenant, source=f"relayed{n}") for n in range(3)]
    pool = await db.pool()
    stop = asyncio.Event()

    async def relay() -> None:
        while not stop.is_set():
            await relay_pending(pool, batch_size=3)
            await asyncio.sleep(0)

    async def change(rule: dict, n: int) -> None:
        path = f"/api/v1/rules/{rule['rule_id']}"
        for _ in range(4):
            current = await api.call("GET", path, tenant.key)
            if current.status == 404:
                return  # deleted
            reply = await api.call("PATCH", path, tenant.key, {"version": current.body["version"], "name": f"c{n}"})
            assert reply.status in (200, 404, 409), reply.body

    relaying = asyncio.ensure_future(relay())
    await asyncio.gather(*(change(rule, n) for rule in rules for n in range(8)),
                         api.call("DELETE", f"/api/v1/rules/{rules[0]['rule_id']}", tenant.key))
    stop.set()
    await relaying
    while await relay_pending(pool):
        pass
    published = await read_topic(broker, "rule.changed")
    for rule in rules:
        events = [RuleChanged.model_validate_json(value) for key, value in published
                  if key == rule["rule_id"].encode()]
        versions = [event.version for event in events]
        assert versions == list(range(1, len(versions) + 1)), versions
        stored = await api.call("GET", f"/api/v1/rules/{rule['rule_id']}", tenant.key)
        if stored.status == 404:
            assert events[-1].action == "delete"
        else:
            assert events[-1].rule.model_dump(mode="json").items() <= stored.body.items()


async def test_the_same_deletion_sent_many_times_at_once_succeeds_once(api):
    from alerting_app import db

    doomed = await api.new_tenant(f"doomed-{uuid.uuid4().hex[:8]}")
    rule = await api.new_rule(doomed)
    endpoint = await api.new_endpoint(doomed, rule["rule_id"])
    other_rule = await api.new_rule(doomed, source="other")
    endpoint_deletions = [api.call("DELETE", f"/api/v1/endpoints/{endpoint['endpoint_id']}", doomed.key)
                          for _ in range(10)]
    secrets = [api.call("POST", f"/api/v1/endpoints/{endpoint['endpoint_id']}/secret", doomed.key) for _ in range(5)]
    rule_deletions = [api.call("DELETE", f"/api/v1/rules/{other_rule['rule_id']}", doomed.key) for _ in range(10)]
    replies = await asyncio.gather(*endpoint_deletions, *secrets, *rule_deletions)
    assert statuses(replies[:10]) == {204: 1, 404: 9}
    assert set(statuses(replies[10:15])) <= {200, 404}
    assert statuses(replies[15:]) == {204: 1, 404: 9}
    assert [(e.action, e.version) for e in await outbox_events(other_rule["rule_id"])] == [("upsert", 1), ("delete", 2)]

    rotations = [api.call("POST", f"/api/v1/clients/{doomed.client_id}/key", api.admin_token) for _ in range(5)]
    client_deletions = [api.call("DELETE", f"/api/v1/clients/{doomed.client_id}", api.admin_token) for _ in range(10)]
    replies = await asyncio.gather(*rotations[:2], *client_deletions, *rotations[2:])
    assert statuses(replies[2:12]) == {204: 1, 404: 9}
    assert set(statuses(replies)) <= {200, 204, 404}
    assert [(e.action, e.version) for e in await outbox_events(rule["rule_id"])] == [("upsert", 1), ("delete", 2)]
    pool = await db.pool()
    assert await pool.fetchval("SELECT count(*) FROM deleted_rules WHERE client_id = $1", doomed.client_id) == 2


async def test_retries_racing_the_clients_deletion_and_endpoint_changes_answer_no_500(api):
    for _ in range(3):
        doomed = await api.new_tenant(f"doomed-{uuid.uuid4().hex[:8]}")
        rule = await api.new_rule(doomed)
        hooks = [await api.new_endpoint(doomed, rule["rule_id"], value=f"https://h.example.com/{n}") for n in range(3)]
        notifications = [await store_notification(
            doomed.client_id, rule["rule_id"], f"racing-{n}", "FAILED",
            tuple((hook["endpoint_id"], "webhook", "FAILED", 8, "HTTP 502") for hook in hooks)) for n in range(5)]
        calls = [api.call("POST", f"/api/v1/notifications/{n}/retry", doomed.key) for n in notifications * 3]
        calls += [api.call("PATCH", f"/api/v1/endpoints/{hook['endpoint_id']}", doomed.key, {"enabled": False})
                  for hook in hooks]
        calls += [api.call("DELETE", f"/api/v1/endpoints/{hooks[0]['endpoint_id']}", doomed.key)]
        deletion = once_rows("deliveries d JOIN notifications n USING (notification_id)",
                             "d.status = 'PENDING' AND n.client_id", doomed.client_id, 1,
                             api.call("DELETE", f"/api/v1/clients/{doomed.client_id}", api.admin_token))
        replies = await asyncio.gather(deletion, *calls)
        assert all(r.status < 500 for r in replies), [(r.status, r.body) for r in replies if r.status >= 500]
        assert replies[0].status == 204
