"""Which clients' rules match an alert: plain data structures, no Faust.

Rules arrive as `rule.changed` events (upserts and deletes, each with the rule's version).
`RuleIndex` keeps the newest state of every rule and an inverted index keyed by the rule's
(severity, source, name) criteria, wildcards included, so matching one alert costs a fixed
number of dictionary lookups whatever the number of rules.
"""
from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from itertools import product

from alerting_app.contracts import WILDCARD, Alert, AlertMatched, Rule, RuleChanged, Severity

Criteria = tuple[str, str, str]


def _criteria_of(rule: Rule) -> Criteria:
    severity = rule.severity.value if isinstance(rule.severity, Severity) else rule.severity
    return (severity, rule.source, rule.name)


class RuleIndex:
    """The newest version of every rule, indexed by criteria for matching.

    `apply` is idempotent and order-independent: an event whose version is not newer than the
    version held for that rule is ignored. A delete leaves a tombstone with its version, so an
    older upsert arriving late cannot bring the rule back.
    """

    def __init__(self, changes: Iterable[RuleChanged] = ()) -> None:
        self._versions: dict[str, int] = {}
        self._rules: dict[str, Rule] = {}
        # criteria -> {rule_id: client_id}, enabled rules only: disabled rules never match.
        self._by_criteria: dict[Criteria, dict[str, str]] = defaultdict(dict)
        for change in changes:
            self.apply(change)

    def apply(self, change: RuleChanged) -> bool:
        """Apply the change if it is newer than what is held; True when it changed the index."""
        held = self._versions.get(change.rule_id)
        if held is not None and change.version <= held:
            return False
        self._versions[change.rule_id] = change.version
        self._unindex(change.rule_id)
        if change.action == "upsert":
            assert change.rule is not None  # guaranteed by the contract
            self._rules[change.rule_id] = change.rule
            if change.rule.enabled:
                self._by_criteria[_criteria_of(change.rule)][change.rule_id] = change.rule.client_id
        return True

    def rebuild(self, changes: Iterable[RuleChanged]) -> None:
        """Replace the whole index by the one the given changes produce (after table recovery)."""
        fresh = RuleIndex(changes)
        self._versions, self._rules, self._by_criteria = fresh._versions, fresh._rules, fresh._by_criteria

    def _unindex(self, rule_id: str) -> None:
        old = self._rules.pop(rule_id, None)
        if old is not None:
            criteria = _criteria_of(old)
            bucket = self._by_criteria.get(criteria)
            if bucket is not None:
                bucket.pop(rule_id, None)
                if not bucket:
                    del self._by_criteria[criteria]

    def held_version(self, rule_id: str) -> int | None:
        """The newest version seen for the rule, a delete included; None if never seen."""
        return self._versions.get(rule_id)

    def rules(self) -> dict[str, Rule]:
        """Every rule currently held (enabled or not), by rule_id."""
        return dict(self._rules)

    def match(self, alert: Alert) -> dict[str, list[str]]:
        """client_id -> sorted rule_ids of that client's enabled rules matching the alert."""
        by_client: dict[str, list[str]] = defaultdict(list)
        # Each field either exact or `*`: 8 lookups (the all-`*` one never holds a rule).
        for criteria in product((alert.severity.value, WILDCARD), (alert.source, WILDCARD),
                                (alert.name, WILDCARD)):
            for rule_id, client_id in self._by_criteria.get(criteria, {}).items():
                by_client[client_id].append(rule_id)
        return {client_id: sorted(rule_ids) for client_id, rule_ids in by_client.items()}


def matched_messages(alert: Alert, index: RuleIndex) -> list[AlertMatched]:
    """One `alerts.matched` message per matching client, listing all of its matching rules."""
    return [
        AlertMatched(alert=alert, client_id=client_id, rule_ids=rule_ids)
        for client_id, rule_ids in sorted(index.match(alert).items())
    ]
