"""The admin's lists across every client page in (created_at, id) order from an index, not by
reading and sorting the whole table (0.5-0.9 s a page at 1,000,000 rules; migrations/015); a
client's notifications of one alert are read by that alert's indexes, not its whole history."""
from __future__ import annotations

import asyncpg
import pytest


def list_queries():
    from web import clients, endpoints, rules, silences

    return {"clients": (clients.LIST, [None, None, None, 101]),
            "rules": (rules.LIST, [None, None, None, None, 101]),
            "endpoints": (endpoints.LIST, [None, None, None, None, 101]),
            "silences": (silences.LIST, [None, None, None, None, None, 101])}


@pytest.mark.parametrize("table", ["clients", "rules", "endpoints", "silences"])
async def test_the_admins_list_of_every_client_reads_an_index_in_its_order(services, table):
    query, arguments = list_queries()[table]
    conn = await asyncpg.connect(services.database_url)
    try:
        async with conn.transaction():
            # What the planner picks on a large table, whatever this test database holds: a plan
            # that must sort reads every row first.
            await conn.execute("SET LOCAL enable_seqscan = off")
            await conn.execute("SET LOCAL enable_sort = off")
            # The plan for these arguments, as the API's first executions get (custom plans).
            plan = "\n".join(row[0] for row in await conn.fetch(f"EXPLAIN {query}", *arguments))
    finally:
        await conn.close()
    assert f"{table}_created_idx" in plan, plan
    assert "Sort" not in plan, plan


async def test_the_notifications_of_one_alert_are_read_by_the_alerts_indexes_not_the_clients_history(services):
    """GET /api/v1/notifications?alert_id=: the notification of the alert alone (notifications'
    UNIQUE (client_id, alert_id)) and its group's (notification_alerts' primary key), each then read
    by its primary key, for a client with 20,000 notifications: in the plans the API's first
    executions get (custom) and the one a prepared statement may settle on after them (generic)."""
    import uuid

    from web import notifications

    conn = await asyncpg.connect(services.database_url)
    client = uuid.uuid4()
    try:
        await conn.execute("INSERT INTO clients (client_id, name, api_key_hash) VALUES ($1, 'plans of an alert', $2)",
                           client, f"plans-{client}")
        await conn.execute("""
            INSERT INTO notifications (notification_id, client_id, alert_id, alerts, rule_ids, created_at)
            SELECT gen_random_uuid(), $1, 'alone-' || n, '[]', '{}', now() - n * interval '1 second'
            FROM generate_series(1, 20000) n""", client)
        await conn.execute("""
            INSERT INTO notification_alerts (client_id, alert_id, notification_id)
            SELECT $1, 'member-' || n, n.notification_id
            FROM (SELECT notification_id, row_number() OVER () AS n FROM notifications WHERE client_id = $1) n""",
                           client)
        await conn.execute("ANALYZE notifications, notification_alerts")
        await conn.execute(f"PREPARE of_an_alert AS {notifications.LIST_OF_AN_ALERT}")
        plans = {}
        for mode in ("force_custom_plan", "force_generic_plan"):
            await conn.execute(f"SET plan_cache_mode = {mode}")
            for caller, named in ((f"'{client}'", "NULL"), ("NULL", f"'{client}'")):  # a client key; the admin
                plans[mode, caller] = "\n".join(row[0] for row in await conn.fetch(
                    f"EXPLAIN EXECUTE of_an_alert({caller}, {named}, NULL, NULL, NULL, NULL, NULL, 101, 8388608,"
                    f" '{client}', 'member-5000')"))
    finally:
        await conn.execute("DELETE FROM clients WHERE client_id = $1", client)  # its rows go with it (CASCADE)
        await conn.execute("ANALYZE notifications, notification_alerts")
        await conn.close()
    for plan in plans.values():
        for index in ("notifications_once_per_client_alert", "notification_alerts_pkey", "notifications_pkey"):
            assert f"Index Scan using {index}" in plan, plan
        # Neither history is scanned. The clients table may be (the live-client check): with a
        # handful of rows, as on a fresh database, a scan of it is the planner's right choice.
        assert "Seq Scan on notifications" not in plan and "Seq Scan on notification_alerts" not in plan, plan
        assert "notifications_client_idx" not in plan and "notifications_created_idx" not in plan, plan
