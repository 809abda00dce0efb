"""The rules table: the newest `rule.changed` event of every rule, the source of truth for matching.

Alerts are partitioned by alert_id, so every worker must hold every rule: the table is global
(each worker reads all changelog partitions). It keeps delete tombstones with their version so
that replaying the changelog cannot resurrect a deleted rule. `rule_index` is derived state,
rebuilt from the table after recovery and kept current from every changelog event.
"""
from __future__ import annotations

import logging

from faust.types import EventT

from alerting_app.app import app, settings
from alerting_app.contracts import RuleChanged
from alerting_app.dead_letters import UndecodableMessage, decode
from alerting_app.matching import RuleIndex

log = logging.getLogger(__name__)

rule_index = RuleIndex()


async def _apply_changelog_event(event: EventT) -> None:
    # Called for each changelog record before it reaches the local store, so the event itself is
    # applied rather than read back from the table; `RuleIndex.apply` ignores what it already holds.
    try:
        rule_index.apply(decode(RuleChanged, event.value))
    except UndecodableMessage as exc:
        log.error("rules changelog record %r is not a rule change: %s", event.key, exc)


rules_table = app.GlobalTable(
    "rules",
    key_type=str,
    value_type=bytes,
    # The table is written from the rule.changed agent, so its changelog mirrors that topic.
    partitions=settings.topic_partitions,
    on_changelog_event=_apply_changelog_event,
    help="rule_id -> newest rule.changed event (upsert or delete tombstone), encoded",
)


@rules_table.on_recover
async def rebuild_rule_index() -> None:
    """After recovery the local store holds the whole changelog: derive the index from it."""
    changes = []
    for rule_id, raw in rules_table.items():
        try:
            changes.append(decode(RuleChanged, raw))
        except UndecodableMessage as exc:
            log.error("rules table entry %r is not a rule change: %s", rule_id, exc)
    rule_index.rebuild(changes)
    log.info("rule index rebuilt from the rules table: %d rules", len(rule_index.rules()))


def apply_rule_change(change: RuleChanged) -> bool:
    """Record a change that is newer than the one held, in the table and the index.

    Must run inside the rule.changed stream: the table writes to the changelog partition of the
    event being processed.
    """
    held = rule_index.held_version(change.rule_id)
    if held is not None and change.version <= held:
        return False
    rules_table[change.rule_id] = change.encode()
    return rule_index.apply(change)
