"""kafka_admin.create_topics (at start-up, `alerting-app create-topics`) against a fresh Tansu broker:
the topic names are fixed, so each test starts its own broker to find them missing."""
from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType

from alerting_app.embedded import EmbeddedServices
from alerting_app.kafka_admin import TOPIC_CONFIGS, create_topics, topic_names

PARTITIONS = 4  # not the default, so a topic the broker created on its own would show
BARRIER_TIMEOUT_S = 60  # only so that a broken test ends; never reached when both callers list


@pytest.fixture
def fresh_broker(tmp_path: Path) -> Iterator[str]:
    with EmbeddedServices(tmp_path / "services") as embedded:
        yield embedded.start(postgres=False, redis=False)["KAFKA_BOOTSTRAP_SERVERS"]


async def partition_counts(bootstrap: str, names: list[str]) -> dict[str, int]:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        return {topic["topic"]: len(topic["partitions"]) for topic in await admin.describe_topics(names)}
    finally:
        await admin.close()


async def topic_configs(bootstrap: str, names: list[str]) -> dict[str, dict[str, str]]:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        responses = await admin.describe_configs([ConfigResource(ConfigResourceType.TOPIC, name) for name in names])
    finally:
        await admin.close()
    configs = {}
    for response in responses:
        for resource in response.to_object()["resources"]:
            assert resource["error_code"] == 0, resource
            configs[resource["resource_name"]] = {entry["config_names"]: entry["config_value"]
                                                  for entry in resource["config_entries"]}
    return configs


async def test_two_creations_at_once_both_succeed_each_topic_created_once(fresh_broker, monkeypatch):
    # Two workers (or two `create-topics`) starting together both find the topics missing, and the
    # slower one's creation is answered TOPIC_ALREADY_EXISTS: that is success, not a failed start.
    # The barrier makes the race certain: neither creates before both have listed the topics.
    both_listed = asyncio.Barrier(2)
    real_list_topics = AIOKafkaAdminClient.list_topics

    async def list_topics_then_wait_for_the_other(self):
        present = await real_list_topics(self)
        await asyncio.wait_for(both_listed.wait(), BARRIER_TIMEOUT_S)
        return present

    monkeypatch.setattr(AIOKafkaAdminClient, "list_topics", list_topics_then_wait_for_the_other)

    first, second = await asyncio.gather(create_topics(fresh_broker, PARTITIONS, 1),
                                         create_topics(fresh_broker, PARTITIONS, 1))

    names = topic_names()
    assert sorted(first.created + second.created) == sorted(names)  # each by exactly one of them
    for report in (first, second):
        assert sorted(report.created + report.existing) == sorted(names)
        assert report.mismatched == {}
    monkeypatch.undo()
    assert await partition_counts(fresh_broker, names) == {name: PARTITIONS for name in names}


async def test_the_changelog_topics_are_created_compacted_and_kept_for_ever(fresh_broker):
    # A worker on an empty disk rebuilds its rules and silences from rule.changed and
    # silence.changed: deleted by age, they would lose rules and silences created long ago.
    assert {"rule.changed", "silence.changed"} <= set(TOPIC_CONFIGS)
    names = topic_names()

    report = await create_topics(fresh_broker, PARTITIONS, 1)

    assert sorted(report.created) == sorted(names)
    configs = await topic_configs(fresh_broker, names)
    for name in names:
        if name in TOPIC_CONFIGS:
            assert configs[name].get("cleanup.policy") == "compact", name
            assert configs[name].get("retention.ms") == "-1", name
        else:  # compacting alerts or dead letters would drop all but the last of each key
            assert configs[name].get("cleanup.policy", "delete") == "delete", name
