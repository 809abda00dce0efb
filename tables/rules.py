"""The rules every worker matches against: a local replica of the `rule.changed` changelog.

`rule_index` is what matching reads; `rule_replica` keeps it current from every partition of
`rule.changed`, persisted in a RocksDB store under DATA_DIR (see tables/rule_replica.py for why
this is not a Faust GlobalTable).
"""
from __future__ import annotations

import asyncpg

from alerting_app import db
from alerting_app.app import app, rule_changed, settings
from alerting_app.kafka_connection import kafka_connection
from alerting_app.matching import RuleIndex
from tables.changelog_replica import keep_running
from tables.rule_replica import RuleReplica, RuleStore

_FORGOTTEN_RELAYED_BEFORE = """
SELECT extract(epoch FROM relayed_before)::float8 FROM forgotten_deletions WHERE deletions = 'deleted_rules'
"""


async def forgotten_rule_deletions_relayed_before(pool: asyncpg.Pool) -> float | None:
    """A time (unix seconds) before which every rule delete retention has forgotten was relayed (it
    records it, agents/retention.py); None if it forgot none."""
    return await pool.fetchval(_FORGOTTEN_RELAYED_BEFORE)


async def _forgotten_relayed_before() -> float | None:
    # Waits while Postgres is away, as long as the replica lets it (rule_replica.FORGOTTEN_LOOKUP_TIMEOUT_S):
    # past that the store is rebuilt from the topic, not trusted without it.
    return await db.retry_transient(forgotten_rule_deletions_relayed_before,
                                    "reading when rule deletions were last forgotten")


rule_index = RuleIndex()
rule_replica = RuleReplica(rule_index, forget_deletions_after_s=settings.deleted_rule_retention_days * 86_400,
                           forgotten_relayed_before=_forgotten_relayed_before)


def rule_store_path():
    return settings.data_dir / "rules" / settings.app_id


@app.task
async def replicate_rules() -> None:
    async def run_once() -> None:
        store = RuleStore(rule_store_path())
        try:
            await rule_replica.run(kafka_connection(settings), rule_changed.get_topic_name(), store)
        finally:
            store.close()

    await keep_running("rule replica", run_once, lambda: app.should_stop)
