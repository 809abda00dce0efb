"""Seed data for demos and benchmarks: many clients, many rules, and alerts that match them.

The rule mix decides the fan-out (how many clients an alert reaches):
- `realistic`: mostly exact rules over a pool of sources and names, with some wildcards, so that a
  random alert from `alert_stream` matches a handful of the 100 default clients (about 1-10);
- `worst`: every client has one rule per severity with `source=*, name=*` beside its others, so
  every alert matches every client.

Rows are written with COPY, and each rule's RuleChanged event goes into the outbox in the same
transaction, so the seeded rules reach the workers exactly as API-made rules do.
"""
from __future__ import annotations

import hashlib
import json
import random
import secrets
import time
from dataclasses import dataclass
from typing import Iterator
from uuid import uuid4

import asyncpg

from alerting_app.contracts import WILDCARD, Alert, Rule, RuleChanged, Severity

SEVERITIES = [s.value for s in Severity]
SOURCES = [f"svc-{n:02d}" for n in range(50)]
NAMES = [f"metric-{n:02d}" for n in range(40)]
MIXES = ("realistic", "worst")
# Distinct criteria rule_criteria can draw for one client: 4 x 50 x 40 exact, 4 x 50 with name `*`,
# 50 x 40 with severity `*`, 10,200 in all. Asked for more, it drew for ever; near that many, it
# waits on the rarest ones for minutes. 10,000 (MAX_RULES_PER_CLIENT's default) takes about a second.
MAX_RULES_PER_CLIENT = 10_000
# Every row is built in memory before one COPY, about 2 KB per rule with its outbox event: asked for
# 100,000 clients (28.8 million rules at the default 288), the command grew until the machine ran
# out of memory. 1,000,000 rules (bench/fast_start.py seeds 450,000) take about 2 GB.
MAX_RULES = 1_000_000
MAX_CLIENTS = 100_000


@dataclass(frozen=True)
class SeedReport:
    clients: int
    rules: int
    endpoints: int
    seconds: float


def rule_criteria(rng: random.Random, count: int, mix: str) -> list[tuple[str, str, str]]:
    """`count` distinct (severity, source, name) triples for one client."""
    chosen: list[tuple[str, str, str]] = []
    if mix == "worst":
        chosen = [(severity, WILDCARD, WILDCARD) for severity in SEVERITIES][:count]
    seen = set(chosen)
    while len(chosen) < count:
        roll = rng.random()
        severity = rng.choice(SEVERITIES)
        source = rng.choice(SOURCES)
        name = rng.choice(NAMES)
        if roll < 0.02:
            name = WILDCARD  # a few broad rules: everything of a severity from one source
        elif roll < 0.03:
            severity = WILDCARD
        triple = (severity, source, name)
        if triple not in seen:
            seen.add(triple)
            chosen.append(triple)
    return chosen


async def seed(pool: asyncpg.Pool, *, clients: int, rules_per_client: int, mix: str = "realistic",
               webhook_url: str | None = None, random_seed: int = 42) -> SeedReport:
    if mix not in MIXES:
        raise ValueError(f"mix must be one of {', '.join(MIXES)}")
    if not 0 <= rules_per_client <= MAX_RULES_PER_CLIENT:
        raise ValueError(f"rules per client must be 0 to {MAX_RULES_PER_CLIENT}")
    if not 0 <= clients <= MAX_CLIENTS:
        raise ValueError(f"clients must be 0 to {MAX_CLIENTS:,}")
    if mix == "worst" and 0 < rules_per_client < len(SEVERITIES):
        # One rule per severity is what makes every alert match every client (a rule cannot be `*`
        # three times); with fewer, the other severities' alerts matched nobody.
        raise ValueError(f"the worst mix needs at least {len(SEVERITIES)} rules per client, one per severity "
                         f"(got {rules_per_client})")
    if clients * rules_per_client > MAX_RULES:
        raise ValueError(f"{clients:,} clients x {rules_per_client:,} rules per client is "
                         f"{clients * rules_per_client:,} rules, more than {MAX_RULES:,} at once")
    started = time.perf_counter()
    rng = random.Random(random_seed)
    client_rows, rule_rows, endpoint_rows, outbox_rows = [], [], [], []
    for n in range(clients):
        client_id = uuid4()
        api_key_hash = hashlib.sha256(secrets.token_bytes(16)).hexdigest()  # nobody holds these keys
        client_rows.append((client_id, f"seed-client-{n:05d}", api_key_hash))
        for severity, source, name in rule_criteria(rng, rules_per_client, mix):
            rule_id = uuid4()
            rule_rows.append((rule_id, client_id, severity, source, name, True, 1))
            event = RuleChanged.upsert(Rule(rule_id=str(rule_id), client_id=str(client_id), severity=severity,
                                            source=source, name=name, enabled=True, version=1))
            outbox_rows.append((rule_id, json.loads(event.model_dump_json())))
            if webhook_url:
                endpoint_rows.append((uuid4(), rule_id, client_id, "webhook", webhook_url, True))
    async with pool.acquire() as conn, conn.transaction():
        await conn.copy_records_to_table("clients", records=client_rows,
                                         columns=["client_id", "name", "api_key_hash"])
        await conn.copy_records_to_table("rules", records=rule_rows,
                                         columns=["rule_id", "client_id", "severity", "source", "name",
                                                  "enabled", "version"])
        if endpoint_rows:
            await conn.copy_records_to_table("endpoints", records=endpoint_rows,
                                             columns=["endpoint_id", "rule_id", "client_id", "type", "value",
                                                      "enabled"])
        await conn.executemany("INSERT INTO rule_outbox (rule_id, payload) VALUES ($1, $2)", outbox_rows)
    # Planner statistics now, not at autovacuum's next round: without them the deliver stage's
    # endpoint lookup by rule was planned for a table of unknown size (a bitmap AND with the
    # client's 288 endpoints for every rule).
    async with pool.acquire() as conn:
        await conn.execute("ANALYZE clients, rules, endpoints")
    return SeedReport(len(client_rows), len(rule_rows), len(endpoint_rows), time.perf_counter() - started)


def alert_stream(count: int, *, random_seed: int = 7, prefix: str | None = None) -> Iterator[Alert]:
    """Random alerts over the same severities, sources and names the seeded rules use."""
    rng = random.Random(random_seed)
    prefix = prefix or f"gen-{uuid4().hex[:8]}"
    for n in range(count):
        yield Alert(alert_id=f"{prefix}-{n}", event_ts=time.time(), severity=rng.choice(SEVERITIES),
                    source=rng.choice(SOURCES), name=rng.choice(NAMES), context={"seq": str(n)})
