"""The admin's lists across every client page in (created_at, id) order from an index, not by
reading and sorting the whole table (0.5-0.9 s a page at 1,000,000 rules; migrations/015)."""
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
