"""`alerting-app seed`: its options are bounded by what it can generate."""
from __future__ import annotations

import asyncio
import os
import subprocess

import pytest

from alerting_app.seed import MAX_RULES_PER_CLIENT, seed
from alerting_app.up import alerting_app_executable


def test_more_rules_per_client_than_there_are_distinct_criteria_is_refused_at_once():
    # rule_criteria draws distinct (severity, source, name) triples from 10,200 possible: asked for
    # more, the command spun for ever at full CPU without a word.
    result = subprocess.run([alerting_app_executable(), "seed", "--clients", "1", "--rules-per-client", "20000"],
                            env=os.environ, capture_output=True, text=True, timeout=60)

    assert result.returncode == 2
    assert "--rules-per-client" in result.stderr and f"0<=x<={MAX_RULES_PER_CLIENT}" in result.stderr, result.stderr

    with pytest.raises(ValueError, match=f"rules per client must be 0 to {MAX_RULES_PER_CLIENT}"):
        asyncio.run(seed(None, clients=1, rules_per_client=MAX_RULES_PER_CLIENT + 1))


@pytest.mark.parametrize("url, env, reason", [
    ("notaurl", {}, "must be an http(s) URL"),
    ("ftp://hooks.example.com/", {}, "must be an http(s) URL"),
    ("http://127.0.0.1:9000/hook", {"ALLOW_PRIVATE_ENDPOINTS": "false"}, "ALLOW_PRIVATE_ENDPOINTS is off"),
])
def test_a_webhook_url_the_api_would_refuse_is_refused_before_seeding(url, env, reason):
    # It was stored as given in every seeded endpoint, and each delivery to it failed.
    result = subprocess.run([alerting_app_executable(), "seed", "--clients", "1", "--rules-per-client", "1",
                             "--webhook-url", url], env={**os.environ, **env}, capture_output=True, text=True,
                            timeout=60)

    assert result.returncode == 1, result.stdout
    [line] = result.stderr.splitlines()
    assert line.startswith("seed: --webhook-url: ") and reason in line and repr(url) in line, line
    assert "seeded" not in result.stdout


def test_more_rules_in_all_than_it_can_hold_in_memory_is_refused_at_once():
    # Every row is built in memory before it is written: --clients 100000 (28.8 million rules at the
    # default 288 per client) grew until the machine ran out of memory.
    from alerting_app.seed import MAX_RULES

    clients = MAX_RULES // 288 + 1
    result = subprocess.run([alerting_app_executable(), "seed", "--clients", str(clients)],
                            env=os.environ, capture_output=True, text=True, timeout=60)

    assert result.returncode == 1, result.stdout
    assert result.stderr.startswith(f"seed: --clients {clients} x --rules-per-client 288 is "
                                    f"{clients * 288:,} rules, more than {MAX_RULES:,} at once"), result.stderr

    with pytest.raises(ValueError, match=f"more than {MAX_RULES:,} at once"):
        asyncio.run(seed(None, clients=clients, rules_per_client=288))


def test_the_worst_mix_with_fewer_rules_than_severities_is_refused_at_once():
    # README: `worst` makes every client match. Its rules are one per severity, cut to the count:
    # with 3 rules per client, every CRITICAL alert matched nobody.
    result = subprocess.run([alerting_app_executable(), "seed", "--clients", "1", "--rules-per-client", "3",
                             "--mix", "worst"], env=os.environ, capture_output=True, text=True, timeout=60)

    assert result.returncode == 1, result.stdout
    assert result.stderr.startswith("seed: --mix worst needs --rules-per-client 4 or more"), result.stderr
    assert "seeded" not in result.stdout

    with pytest.raises(ValueError, match="the worst mix needs at least 4 rules per client"):
        asyncio.run(seed(None, clients=1, rules_per_client=3, mix="worst"))


async def test_seeding_one_client_with_one_rule_says_one_of_each(empty_database):
    # It said "seeded 1 clients, 1 rules, 0 endpoints".
    from alerting_app.migrate import apply_migrations

    await apply_migrations(empty_database)
    result = subprocess.run([alerting_app_executable(), "seed", "--clients", "1", "--rules-per-client", "1"],
                            env={**os.environ, "DATABASE_URL": empty_database}, capture_output=True, text=True,
                            timeout=120)

    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("seeded 1 client, 1 rule, 0 endpoints in "), result.stdout
