"""The rules every worker matches against: a local replica of the `rule.changed` changelog.

`rule_index` is what matching reads; `rule_replica` keeps it current from every partition of
`rule.changed`, persisted in a RocksDB store under DATA_DIR (see tables/rule_replica.py for why
this is not a Faust GlobalTable).
"""
from __future__ import annotations

from alerting_app.app import app, rule_changed, settings
from alerting_app.kafka_connection import kafka_connection
from alerting_app.matching import RuleIndex
from tables.changelog_replica import keep_running
from tables.rule_replica import RuleReplica, RuleStore

rule_index = RuleIndex()
rule_replica = RuleReplica(rule_index, forget_deletions_after_s=settings.deleted_rule_retention_days * 86_400)


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
