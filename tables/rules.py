"""The rules every worker matches against: a local replica of the `rule.changed` changelog.

`rule_index` is what matching reads; `rule_replica` keeps it current from every partition of
`rule.changed`, persisted in a RocksDB store under DATA_DIR (see tables/rule_replica.py for why
this is not a Faust GlobalTable).
"""
from __future__ import annotations

import asyncio
import logging

from alerting_app.app import app, rule_changed, settings
from alerting_app.matching import RuleIndex
from tables.rule_replica import RuleReplica, RuleStore

log = logging.getLogger(__name__)

rule_index = RuleIndex()
rule_replica = RuleReplica(rule_index)


def rule_store_path():
    return settings.data_dir / "rules" / settings.app_id


@app.task
async def replicate_rules() -> None:
    delay = 1.0
    while not app.should_stop:
        store = RuleStore(rule_store_path())
        try:
            await rule_replica.run(settings.kafka_bootstrap_servers, rule_changed.get_topic_name(), store)
        except asyncio.CancelledError:
            raise
        except Exception:
            # The replica must not die quietly: matching would go on with rules that no longer change.
            log.exception("rule replica failed; restarting in %.0fs", delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 30.0)
        finally:
            store.close()
