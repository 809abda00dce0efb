"""Creation of the pipeline topics and their dead-letter topics, before any worker starts.

They must exist up-front with TOPIC_PARTITIONS partitions: a broker that auto-creates a topic on
first use picks its own partition count, and Faust requires co-partitioned topics (a source and
its table changelog) to have the same count. Existing topics are never altered.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import for_code

from alerting_app.kafka_connection import Broker, client_args
from alerting_app.settings import ConfigurationError

_TOPIC_ALREADY_EXISTS = 36
_INVALID_REPLICATION_FACTOR = 38

# rule.changed is the changelog every worker rebuilds its rules from: keep the newest event of each
# rule for ever (a new worker on an empty disk must still see rules created years ago). The same
# holds for silence.changed, which every worker reads from its beginning at each start.
_CHANGELOG = {"cleanup.policy": "compact", "retention.ms": "-1"}
TOPIC_CONFIGS = {"rule.changed": _CHANGELOG, "silence.changed": _CHANGELOG}


@dataclass
class TopicReport:
    created: list[str] = field(default_factory=list)
    existing: list[str] = field(default_factory=list)
    # name -> the partition count the topic has, for existing topics that differ from the setting
    mismatched: dict[str, int] = field(default_factory=dict)

    def mismatch_message(self, partitions: int) -> str:
        return "; ".join(
            f"topic {name} has {actual} partitions but TOPIC_PARTITIONS={partitions} (left unchanged)"
            for name, actual in self.mismatched.items()
        )


def topic_names() -> list[str]:
    # Imported here: alerting_app.app reads the settings, which callers may still be preparing.
    from alerting_app.app import DEAD_LETTER_TOPICS, PIPELINE_TOPICS

    names = [topic.get_topic_name() for topic in PIPELINE_TOPICS]
    return names + [DEAD_LETTER_TOPICS[name].get_topic_name() for name in names]


async def create_topics(broker: Broker, partitions: int, replication: int) -> TopicReport:
    report = TopicReport()
    admin = AIOKafkaAdminClient(**client_args(broker))
    await admin.start()
    try:
        wanted = topic_names()
        present = set(await admin.list_topics())
        missing = [name for name in wanted if name not in present]
        if missing:
            _check_replication(replication, len((await admin.describe_cluster())["brokers"]))
            new_topics = [NewTopic(name, partitions, replication, topic_configs=TOPIC_CONFIGS.get(name, {}))
                          for name in missing]
            response = await admin.create_topics(new_topics)
            for name, code, message in _topic_errors(response):
                if code == 0:
                    report.created.append(name)
                elif code == _TOPIC_ALREADY_EXISTS:  # created meanwhile by another process
                    present.add(name)
                elif code == _INVALID_REPLICATION_FACTOR:  # brokers gone since they were counted
                    raise ConfigurationError(f"Invalid configuration:\n  TOPIC_REPLICATION_FACTOR: the broker "
                                             f"refused {replication} creating topic {name}: {message}")
                else:
                    raise for_code(code)(f"creating topic {name}: {message}")
        report.existing = [name for name in wanted if name in present]
        report.mismatched = await _mismatched(admin, report.existing, partitions)
    finally:
        await admin.close()
    return report


def _check_replication(replication: int, brokers: int) -> None:
    # Kafka refuses a topic with more replicas than brokers, and the refusal read as a Kafka error
    # that did not name the variable; Tansu, with one broker, created them anyway.
    if replication > brokers:
        raise ConfigurationError(
            f"Invalid configuration:\n  TOPIC_REPLICATION_FACTOR: {replication} is more than the {brokers} "
            f"broker{'s' if brokers != 1 else ''} of the cluster at KAFKA_BOOTSTRAP_SERVERS (no topic was created)")


def changelog_topic_names() -> list[str]:
    """The changelogs of the app's tables (`<APP_ID>-<table>-changelog`), which Faust creates."""
    from alerting_app.app import app

    return [table.changelog_topic.get_topic_name() for table in app.tables.values()]


def faust_topic_names() -> list[str]:
    """The topics Faust itself creates when the worker starts, with TOPIC_REPLICATION_FACTOR: the
    changelogs of the tables this worker keeps and, unless it consumes nothing (`--roles api`),
    `<APP_ID>-__assignor-__leader`, the one-partition topic of its leader election. Call after
    `apply_roles`, which decides both."""
    from alerting_app.app import app

    if app.producer_only:  # no consumer: no leader election, and no table (roles.apply_roles)
        return changelog_topic_names()
    return [*changelog_topic_names(), app._leader_assignor._leader_topic_name]  # no public name


async def check_before_start(broker: Broker, names: list[str], partitions: int, faust_topics: list[str],
                             replication: int) -> str | None:
    """What a worker checks of the topics before it starts, on one admin connection and one listing:
    None when every topic of `names` that exists has `partitions` partitions, else what differs;
    and ConfigurationError, naming TOPIC_REPLICATION_FACTOR, when one of `faust_topics` is missing
    (so the worker would create it) and `replication` is above the cluster's broker count.

    A worker whose TOPIC_PARTITIONS differs from the topics' would create its table changelogs with
    its own count, and write a client's open group to a changelog partition that is not its
    `alerts.matched` partition: the group is then never closed, and nothing says so. Faust creates
    `faust_topics` as the worker starts: Kafka refused them there, and the worker stopped with a
    traceback that did not name the variable. When all exist nothing is created, and the factor
    does not matter: it never changes a topic's replicas.
    """
    admin = AIOKafkaAdminClient(**client_args(broker))
    await admin.start()
    try:
        present = set(await admin.list_topics())
        report = TopicReport(mismatched=await _mismatched(admin, [n for n in names if n in present], partitions))
        if not report.mismatched and any(name not in present for name in faust_topics):
            _check_replication(replication, len((await admin.describe_cluster())["brokers"]))
    finally:
        await admin.close()
    return report.mismatch_message(partitions) or None


async def _mismatched(admin: AIOKafkaAdminClient, existing: list[str], partitions: int) -> dict[str, int]:
    # Only topics known to exist are described: a metadata request for an unknown topic may create it.
    if not existing:
        return {}
    return {topic["topic"]: len(topic["partitions"]) for topic in await admin.describe_topics(existing)
            if len(topic["partitions"]) != partitions}


def _topic_errors(response) -> list[tuple[str, int, str | None]]:
    # The response's field layout differs between protocol versions; its object form does not.
    return [
        (entry["topic"], entry["error_code"], entry.get("error_message"))
        for entry in response.to_object()["topic_errors"]
    ]
