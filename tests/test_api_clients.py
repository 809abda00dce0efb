"""/api/v1/clients: the admin creates tenants; a tenant sees and renames only itself."""
from __future__ import annotations

import asyncio
import contextlib
import uuid
from datetime import datetime, timedelta, timezone

from postgres_waits import until_waiting_on_a_lock
from test_api_support import API_LOOP, api, other_tenant, tenant  # noqa: F401  (fixtures)

pytestmark = API_LOOP


async def test_creating_a_client_returns_its_api_key_once(api):
    created = await api.call("POST", "/api/v1/clients", api.admin_token, {"name": "Acme Payments"})
    assert created.status == 201
    assert created.body["name"] == "Acme Payments"
    assert created.body["api_key"].startswith("alk_")

    read = await api.call("GET", f"/api/v1/clients/{created.body['client_id']}", api.admin_token)
    assert read.status == 200
    assert "api_key" not in read.body
    assert {k: v for k, v in created.body.items() if k != "api_key"} == read.body


async def test_each_client_gets_a_different_key(api, tenant, other_tenant):
    assert tenant.key != other_tenant.key
    assert tenant.client_id != other_tenant.client_id


async def test_a_client_without_a_name_is_refused_with_422_naming_the_field(api):
    reply = await api.call("POST", "/api/v1/clients", api.admin_token, {})
    assert reply.failing_fields() == {"name"}


async def test_unknown_fields_in_a_body_are_refused(api):
    reply = await api.call("POST", "/api/v1/clients", api.admin_token, {"name": "x", "nmae": "typo"})
    assert reply.failing_fields() == {"nmae"}


async def test_a_body_that_is_not_json_is_refused_with_422(api):
    reply = await api.call("POST", "/api/v1/clients", api.admin_token, data=b"{name: 'no quotes'")
    assert reply.failing_fields() == {"body"}


async def test_a_client_key_lists_only_its_own_client(api, tenant, other_tenant):
    reply = await api.call("GET", "/api/v1/clients", tenant.key)
    assert reply.status == 200
    assert [c["client_id"] for c in reply.body["items"]] == [tenant.client_id]
    assert reply.body["next_cursor"] is None


async def test_the_admin_lists_every_client(api, tenant, other_tenant):
    seen = []
    cursor = None
    while True:
        # Pages of 1: the two clients of the test alone fill more than one, so the cursor is followed.
        params = {"limit": "1", **({"cursor": cursor} if cursor else {})}
        reply = await api.call("GET", "/api/v1/clients", api.admin_token, params=params)
        assert reply.status == 200
        assert len(reply.body["items"]) <= 1
        seen += [c["client_id"] for c in reply.body["items"]]
        assert cursor is None or reply.body["next_cursor"] != cursor, "the same page again: paging would never end"
        cursor = reply.body["next_cursor"]
        if cursor is None:
            break
    assert {tenant.client_id, other_tenant.client_id} <= set(seen)
    assert len(seen) == len(set(seen))


async def test_a_client_key_cannot_read_change_or_delete_another_client(api, tenant, other_tenant):
    path = f"/api/v1/clients/{tenant.client_id}"
    assert (await api.call("GET", path, other_tenant.key)).status == 404
    assert (await api.call("PATCH", path, other_tenant.key, {"name": "mine now"})).status == 404
    assert (await api.call("DELETE", path, other_tenant.key)).status == 404
    still = await api.call("GET", path, api.admin_token)
    assert still.status == 200
    assert still.body["name"] != "mine now"


async def test_a_client_can_rename_itself(api, tenant):
    reply = await api.call("PATCH", f"/api/v1/clients/{tenant.client_id}", tenant.key, {"name": "Renamed"})
    assert reply.status == 200
    assert reply.body["name"] == "Renamed"
    assert (await api.call("GET", f"/api/v1/clients/{tenant.client_id}", tenant.key)).body["name"] == "Renamed"


async def test_renaming_to_an_empty_name_is_refused(api, tenant):
    reply = await api.call("PATCH", f"/api/v1/clients/{tenant.client_id}", api.admin_token, {"name": ""})
    assert reply.failing_fields() == {"name"}


async def test_a_deleted_client_is_gone_with_its_rules(api, tenant):
    rule = await api.new_rule(tenant)
    assert (await api.call("DELETE", f"/api/v1/clients/{tenant.client_id}", api.admin_token)).status == 204
    assert (await api.call("GET", f"/api/v1/clients/{tenant.client_id}", api.admin_token)).status == 404
    assert (await api.call("GET", f"/api/v1/rules/{rule['rule_id']}", api.admin_token)).status == 404
    assert (await api.call("DELETE", f"/api/v1/clients/{tenant.client_id}", api.admin_token)).status == 404


async def test_an_id_that_is_not_a_uuid_is_not_found(api):
    reply = await api.call("GET", "/api/v1/clients/not-a-uuid", api.admin_token)
    assert (reply.status, reply.body) == (404, {"error": "not_found",
                                                "message": "no client with this id that this token may see"})


def in_an_hour() -> str:
    return (datetime.now(timezone.utc) + timedelta(hours=1)).isoformat()


async def history(pool, client_id: str) -> tuple[int, int, int]:
    """How many notifications, deliveries and group memberships the client has."""
    return (
        await pool.fetchval("SELECT count(*) FROM notifications WHERE client_id = $1", client_id),
        await pool.fetchval("SELECT count(*) FROM deliveries d JOIN notifications n USING (notification_id)"
                            " WHERE n.client_id = $1", client_id),
        await pool.fetchval("SELECT count(*) FROM notification_alerts WHERE client_id = $1", client_id),
    )


async def insert_history(pool, client_id: str, settled: int) -> None:
    """`settled` notifications the pipeline is done with, each with 2 deliveries and 2 memberships,
    and one still PENDING (its delivery due): the deletion's own cascade takes that one."""
    await pool.execute("""
        WITH made AS (
            INSERT INTO notifications (notification_id, client_id, alert_id, alerts, rule_ids, status, emitted,
                                       created_at)
            SELECT gen_random_uuid(), $1, 'alert-' || n, '[]', '{}', CASE WHEN n = 0 THEN 'PENDING' ELSE 'SENT' END,
                   true, now() - make_interval(secs => n)
            FROM generate_series(0, $2) AS n
            RETURNING notification_id, status
        ), deliveries AS (
            INSERT INTO deliveries (notification_id, endpoint_id, channel, status, attempts)
            SELECT notification_id, gen_random_uuid(), 'webhook', status, 1 FROM made, generate_series(1, 2)
        )
        INSERT INTO notification_alerts (client_id, alert_id, notification_id)
        SELECT $1, 'member-' || m || '-' || notification_id, notification_id FROM made, generate_series(1, 2) AS m
    """, client_id, settled)


async def test_deleting_a_client_answers_at_once_and_the_client_is_gone_to_the_api(api, tenant, other_tenant):
    # Its history went first, in the request: for millions of notifications, longer than any HTTP
    # timeout in front of the API. Now the request touches none of it; one notification is even held
    # locked (as the recorder holds one it settles), which the old deletion's cascade waited for.
    from alerting_app import db

    pool = await db.pool()
    rule = await api.new_rule(tenant)
    await insert_history(pool, tenant.client_id, 35)
    failed = await pool.fetchval("UPDATE notifications SET status = 'FAILED' WHERE notification_id = ("
                                 " SELECT notification_id FROM notifications WHERE client_id = $1 AND status = 'SENT'"
                                 " LIMIT 1) RETURNING notification_id::text", tenant.client_id)
    async with pool.acquire() as recorder, recorder.transaction():
        await recorder.execute("SELECT 1 FROM notifications WHERE notification_id = $1 FOR UPDATE", failed)
        async with asyncio.timeout(30):  # a bound only: waiting for the lock, the request would hang
            reply = await api.call("DELETE", f"/api/v1/clients/{tenant.client_id}", api.admin_token)

    assert reply.status == 204, reply.body
    assert await history(pool, tenant.client_id) == (36, 72, 72)  # retention's, from now on
    path = f"/api/v1/clients/{tenant.client_id}"
    assert (await api.call("GET", path, tenant.key)).status == 401
    assert (await api.call("GET", path, api.admin_token)).status == 404
    assert (await api.call("PATCH", path, api.admin_token, {"name": "back"})).status == 404
    assert (await api.call("POST", f"{path}/key", api.admin_token)).status == 404
    assert (await api.call("DELETE", path, api.admin_token)).status == 404
    listed = await api.call("GET", "/api/v1/clients", api.admin_token, params={"limit": 500})
    assert tenant.client_id not in {c["client_id"] for c in listed.body["items"]}
    assert (await api.call("GET", f"/api/v1/rules/{rule['rule_id']}", api.admin_token)).status == 404
    rule_again = await api.call("POST", "/api/v1/rules", api.admin_token,
                                {"client_id": tenant.client_id, "severity": "HIGH", "source": "payments", "name": "*"})
    assert rule_again.failing_fields() == {"client_id"}
    endpoint = await api.call("POST", "/api/v1/endpoints", api.admin_token,
                              {"rule_id": rule["rule_id"], "type": "webhook", "value": "https://hooks.example.com/a"})
    assert endpoint.failing_fields() == {"rule_id"}
    silence = await api.call("POST", "/api/v1/silences", api.admin_token,
                             {"client_id": tenant.client_id, "source": "payments", "ends_at": in_an_hour(),
                              "comment": "deploying", "created_by": "ops@example.com"})
    assert silence.failing_fields() == {"client_id"}
    assert (await api.call("GET", f"/api/v1/notifications/{failed}", api.admin_token)).status == 404
    assert (await api.call("POST", f"/api/v1/notifications/{failed}/retry", api.admin_token)).status == 404
    notifications = await api.call("GET", "/api/v1/notifications", api.admin_token,
                                   params={"client_id": tenant.client_id})
    assert notifications.body["items"] == []
    assert (await api.call("GET", f"/api/v1/clients/{other_tenant.client_id}", other_tenant.key)).status == 200


async def test_the_history_of_a_deleted_client_goes_a_batch_per_transaction_then_the_client(
        api, tenant, other_tenant):
    # In one transaction, Postgres cascades to each notification's deliveries one at a time: a few
    # hundred thousand outlasted API_DATABASE_TIMEOUT_S, and such a client could never be deleted.
    from agents.retention import finish_client_deletions
    from alerting_app import db

    pool = await db.pool()
    await insert_history(pool, tenant.client_id, 35)
    await insert_history(pool, other_tenant.client_id, 3)
    assert (await api.call("DELETE", f"/api/v1/clients/{tenant.client_id}", api.admin_token)).status == 204
    # Which transaction deleted each of the client's notifications, as Postgres saw it.
    log = f"deleting_transactions_{uuid.uuid4().hex}"
    await pool.execute(f"""
        CREATE TABLE {log} (xid bigint NOT NULL);
        CREATE FUNCTION {log}() RETURNS trigger LANGUAGE plpgsql AS $$
            BEGIN INSERT INTO {log} VALUES (txid_current()); RETURN NULL; END $$;
        CREATE TRIGGER {log} AFTER DELETE ON notifications FOR EACH ROW
            WHEN (OLD.client_id = '{tenant.client_id}') EXECUTE FUNCTION {log}();
    """)
    try:
        await finish_client_deletions(pool, batch_size=10)
        transactions = await pool.fetchval(f"SELECT count(DISTINCT xid) FROM {log}")
        deleted = await pool.fetchval(f"SELECT count(*) FROM {log}")
    finally:
        await pool.execute(f"DROP TRIGGER {log} ON notifications; DROP FUNCTION {log}(); DROP TABLE {log}")

    assert await history(pool, tenant.client_id) == (0, 0, 0)
    assert deleted == 36
    # The PENDING one too (nothing will deliver it: the client's endpoints are gone): 4 batches of 10.
    assert transactions == 4
    assert await pool.fetchval("SELECT count(*) FROM clients WHERE client_id = $1", tenant.client_id) == 0
    assert await history(pool, other_tenant.client_id) == (4, 8, 8)
    assert (await api.call("GET", f"/api/v1/clients/{other_tenant.client_id}", other_tenant.key)).status == 200


async def test_a_client_deletion_stopped_midway_is_finished_by_the_next_round(api, tenant):
    # The worker stops (here: while its last statement waits for a notification the pipeline holds):
    # what its batches deleted stays deleted, the client stays being deleted, and the next round,
    # this worker's or another's, finishes it.
    from agents.retention import finish_client_deletion, finish_client_deletions
    from alerting_app import db

    pool = await db.pool()
    await insert_history(pool, tenant.client_id, 25)
    held = await pool.fetchval("SELECT notification_id FROM notifications WHERE client_id = $1 LIMIT 1",
                               tenant.client_id)
    assert (await api.call("DELETE", f"/api/v1/clients/{tenant.client_id}", api.admin_token)).status == 204
    async with pool.acquire() as recorder, recorder.transaction():
        await recorder.execute("SELECT 1 FROM notifications WHERE notification_id = $1 FOR UPDATE", held)
        finishing = asyncio.ensure_future(finish_client_deletion(pool, uuid.UUID(tenant.client_id), 10))
        await until_waiting_on_a_lock(pool, query_like="DELETE FROM clients%", unless_done=finishing)
        finishing.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await finishing

    assert await history(pool, tenant.client_id) == (1, 2, 2)  # the batches skipped the one held
    assert (await api.call("GET", f"/api/v1/clients/{tenant.client_id}", api.admin_token)).status == 404
    assert (await api.call("GET", f"/api/v1/clients/{tenant.client_id}", tenant.key)).status == 401
    await finish_client_deletions(pool)
    assert await history(pool, tenant.client_id) == (0, 0, 0)
    assert await pool.fetchval("SELECT count(*) FROM clients WHERE client_id = $1", tenant.client_id) == 0


async def test_renaming_to_null_is_refused_as_every_patch_refuses_a_null(api, tenant):
    # docs/api.md: in a PATCH, a field given as null is refused naming it, "may not be null"; a
    # client's PATCH said "Input should be a valid string" instead.
    reply = await api.call("PATCH", f"/api/v1/clients/{tenant.client_id}", tenant.key, {"name": None})

    assert reply.status == 422
    assert reply.body["fields"] == [{"field": "name", "message": "may not be null: leave the "
                                                                "field out to keep its value"}]
