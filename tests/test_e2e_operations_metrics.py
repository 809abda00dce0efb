"""/metrics of a real worker moves as alerts go through the pipeline; LOG_FORMAT=json logs JSON."""
from __future__ import annotations

import json
import secrets
from collections import Counter

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from kafka_probe import retire_rules_left_on_topic
from test_e2e_pipeline import Platform, WebhookReceiver, alert, create_tenant_with_webhook

pytestmark = pytest.mark.e2e


async def scrape(http: aiohttp.ClientSession, url: str) -> dict[tuple[str, frozenset], float]:
    async with http.get(url + "/metrics") as response:
        assert response.status == 200
        assert response.headers["Content-Type"].startswith("text/plain; version=0.0.4")
        text = await response.text()
    return {(sample.name, frozenset(sample.labels.items())): sample.value
            for family in text_string_to_metric_families(text) for sample in family.samples}


def moved(before: dict, after: dict, name: str, **labels: str) -> float:
    key = (name, frozenset(labels.items()))
    return after.get(key, 0.0) - before.get(key, 0.0)


async def test_metrics_move_as_alerts_flow_through_the_pipeline(services, clean_db, start_worker):
    await retire_rules_left_on_topic(services.kafka_bootstrap_servers)
    group = f"ops-metrics-{secrets.token_hex(4)}"
    worker = start_worker(APP_ID=group, LOG_FORMAT="json")
    async with aiohttp.ClientSession() as http, WebhookReceiver() as receiver:
        platform = Platform(http, worker.url, services.kafka_bootstrap_servers, group, services.admin_token,
                            services.database_url)
        # A new group starts at the oldest alert: earlier tests' alerts must be behind it before the
        # tenant's rule exists, or they would match it.
        await platform.settle()
        await create_tenant_with_webhook(platform, services.admin_token, receiver.url)
        await platform.settle()
        before = await scrape(http, worker.url)

        await platform.produce_alerts(alert("metrics-1"), alert("metrics-2"), alert("metrics-low", severity="LOW"),
                                      b"not an alert", keys=["metrics-1", "metrics-2", "metrics-low", "garbage"])
        await platform.settle()
        after = await scrape(http, worker.url)

    assert receiver.alert_ids() == Counter({"metrics-1": 1, "metrics-2": 1})
    assert moved(before, after, "alerting_alerts_consumed_total") == 4
    assert moved(before, after, "alerting_alerts_matched_total") == 2
    assert moved(before, after, "alerting_dead_letters_total", topic="alerts.new", from_history="false") == 1
    assert moved(before, after, "alerting_notifications_emitted_total") == 2
    assert moved(before, after, "alerting_deliveries_total", channel="webhook", status="SENT") == 2
    for stage in ("evaluate_batch", "aggregate_batch"):  # batches, so one or more per stage
        assert moved(before, after, "alerting_stage_duration_seconds_count", stage=stage) >= 1
        assert moved(before, after, "alerting_stage_duration_seconds_sum", stage=stage) > 0
    assert after[("alerting_rules_held", frozenset())] == 1
    # Every message fetched and processed: nothing left behind on the worker's partitions.
    lag = {dict(labels)["topic"]: value for (name, labels), value in after.items()
           if name == "alerting_consumer_lag_messages"}
    # Only the topics the stages consume: not the groups table's changelog, whose partitions the
    # worker holds but never commits, so that its "lag" would grow with every table write.
    assert set(lag) == {"alerts.new", "alerts.matched", "notifications.ready"}
    assert lag["alerts.new"] == lag["alerts.matched"] == lag["notifications.ready"] == 0
    assert after[("process_resident_memory_bytes", frozenset())] > 0

    lines = worker.log().splitlines()
    entries = [json.loads(line) for line in lines]  # every line is one JSON object
    assert any(entry["message"] == "[^Worker]: Ready" for entry in entries)
    assert {"ts", "level", "logger", "message", "pid"} <= set(entries[0])
