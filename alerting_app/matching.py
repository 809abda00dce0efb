"""Which clients' rules match an alert: plain data structures, no Faust.

Rules arrive as `rule.changed` events (upserts and deletes, each with the rule's version).
`RuleIndex` keeps the newest state of every rule and an inverted index keyed by the rule's
(severity, source, name) criteria, wildcards included, so matching one alert costs a fixed
number of dictionary lookups whatever the number of rules.

A rule also carries its grouping settings (issue 5). Matching still works on rule ids only; the
settings of the rules that matched are then read from a small map of the rules that have any,
to pick each client's group rule.
"""
from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterable, Mapping

from alerting_app.contracts import WILDCARD, Alert, AlertMatched, Rule, RuleChanged, Severity, fingerprint_of

Criteria = tuple[str, str, str]
# Given a client and an alert, the silence_id of an active silence of that client matching it.
SilenceLookup = Callable[[str, Alert], str | None]


# A rule as the index holds it: (client_id, severity, source, name, enabled, version,
# group_window_s, repeat_interval_s, fingerprint_keys), the keys a tuple of strings.
#
# A plain tuple of strings, a bool, ints and a tuple of strings, not a pydantic `Rule` (about 1 KB
# and three objects per rule) nor a NamedTuple: CPython's garbage collector stops tracking plain
# tuples of atomic values, so 450,000 held rules cost nothing in each full collection (a NamedTuple
# stays tracked). A rule with fingerprint keys may take one collection more: its tuple is untracked
# once the inner tuple of keys is.
HeldRule = tuple[str, str, str, str, bool, int, int, int, tuple[str, ...]]
# Positions in a HeldRule read on the matching path.
_CLIENT_ID, _GROUP_WINDOW_S, _REPEAT_INTERVAL_S, _FINGERPRINT_KEYS = 0, 6, 7, 8
# (group_window_s, repeat_interval_s, fingerprint_keys) of a rule that neither groups nor suppresses.
_AT_ONCE: tuple[int, int, tuple[str, ...]] = (0, 0, ())


def held_rule(rule: Rule) -> HeldRule:
    severity = rule.severity.value if isinstance(rule.severity, Severity) else rule.severity
    # Interned: 28,800 rules share 100 client ids and a few hundred criteria values. Most rules have
    # no fingerprint keys and share the one empty tuple.
    keys = tuple(sys.intern(key) for key in rule.fingerprint_keys) if rule.fingerprint_keys else ()
    return (sys.intern(rule.client_id), sys.intern(severity), sys.intern(rule.source), sys.intern(rule.name),
            rule.enabled, rule.version, rule.group_window_s, rule.repeat_interval_s, keys)


def criteria_of(held: HeldRule) -> Criteria:
    return (held[1], held[2], held[3])  # (severity, source, name)


class RuleIndex:
    """The newest version of every rule, indexed by criteria for matching.

    `apply` is idempotent and order-independent: an event whose version is not newer than the
    version held for that rule is ignored. A delete leaves a tombstone with its version, so an
    older upsert arriving late cannot bring the rule back. The tombstone is kept with the time of
    the deletion until `forget_deletions` lets it go (tables/changelog_replica.py says when).
    """

    def __init__(self, changes: Iterable[RuleChanged] = ()) -> None:
        self._versions: dict[str, int] = {}
        self._deleted_at: dict[str, float] = {}  # rule_id -> when it was deleted, for each tombstone
        self._rules: dict[str, HeldRule] = {}
        # criteria -> {rule_id: client_id}, enabled rules only: disabled rules never match.
        self._by_criteria: dict[Criteria, dict[str, str]] = {}
        # rule_id -> held rule, for the enabled rules that group or suppress repeats only. Matching
        # looks here rather than in `_rules`: with 28,800 rules a lookup there missed the CPU cache
        # and cost the evaluator a sixth of its matching time; this map is small or empty.
        self._grouping: dict[str, HeldRule] = {}
        for change in changes:
            self.apply(change)

    def apply(self, change: RuleChanged, at: float | None = None) -> bool:
        """Apply the change if it is newer than what is held; True when it changed the index.

        `at`: when the change was made (unix seconds; default now), kept for a delete's tombstone.
        """
        held = self._versions.get(change.rule_id)
        if held is not None and change.version <= held:
            return False
        self._versions[change.rule_id] = change.version
        self._unindex(change.rule_id)
        if change.action == "delete":
            self._deleted_at[change.rule_id] = time.time() if at is None else at
        else:
            self._deleted_at.pop(change.rule_id, None)
            assert change.rule is not None  # guaranteed by the contract
            held = held_rule(change.rule)
            self._rules[change.rule_id] = held
            if change.rule.enabled:
                self._by_criteria.setdefault(criteria_of(held), {})[change.rule_id] = held[_CLIENT_ID]
                if change.rule.group_window_s or change.rule.repeat_interval_s:
                    self._grouping[change.rule_id] = held
        return True

    def rebuild(self, changes: Iterable[RuleChanged]) -> None:
        """Replace the whole index by the one the given changes produce (after table recovery)."""
        self.take_over(RuleIndex(changes))

    def take_over(self, other: RuleIndex) -> None:
        """Hold what `other` holds from now on, in one step: readers of this index never see a mix.

        The replica builds a fresh index while this one serves, then swaps it in; `other` must not
        be changed afterwards (the two share their contents).
        """
        self._versions, self._rules, self._by_criteria = other._versions, other._rules, other._by_criteria
        self._grouping, self._deleted_at = other._grouping, other._deleted_at

    def forget_deletions(self, deleted_before: float) -> list[str]:
        """Drop the tombstones of rules deleted before `deleted_before` (unix seconds); their rule_ids."""
        return forget_deletions(self._versions, self._deleted_at, deleted_before)

    def forget(self, rule_id: str) -> bool:
        """Drop whatever is held of the rule, its tombstone or the rule itself, as if it had never
        been seen; whether anything was. For a null record (a Kafka tombstone) on rule.changed."""
        if self._versions.pop(rule_id, None) is None:
            return False
        self._deleted_at.pop(rule_id, None)
        self._unindex(rule_id)
        return True

    def deleted_at(self, rule_id: str) -> float | None:
        """When the rule was deleted, if a tombstone of it is held."""
        return self._deleted_at.get(rule_id)

    def deleted_versions(self) -> dict[str, int]:
        """rule_id -> version of every tombstone held."""
        return {rule_id: self._versions[rule_id] for rule_id in self._deleted_at}

    def _unindex(self, rule_id: str) -> None:
        self._grouping.pop(rule_id, None)
        old = self._rules.pop(rule_id, None)
        if old is not None:
            criteria = criteria_of(old)
            bucket = self._by_criteria.get(criteria)
            if bucket is not None:
                bucket.pop(rule_id, None)
                if not bucket:
                    del self._by_criteria[criteria]

    def __len__(self) -> int:
        """How many rules are held, enabled or not (deleted ones not counted)."""
        return len(self._rules)

    def held_version(self, rule_id: str) -> int | None:
        """The newest version seen for the rule, a delete included; None if never seen."""
        return self._versions.get(rule_id)

    def enabled_versions(self) -> dict[str, int]:
        """rule_id -> version of every enabled rule: what two workers must agree on.

        Cheaper than `rules()`, which builds a contract object per rule (seconds at 450,000 rules).
        """
        return {rule_id: held[5] for rule_id, held in self._rules.items() if held[4]}

    def rules(self) -> dict[str, Rule]:
        """Every rule currently held (enabled or not), by rule_id, as contract objects."""
        return {
            rule_id: Rule(rule_id=rule_id, client_id=client_id, severity=severity, source=source, name=name,
                          enabled=enabled, version=version, group_window_s=group_window_s,
                          repeat_interval_s=repeat_interval_s, fingerprint_keys=list(fingerprint_keys))
            for rule_id, (client_id, severity, source, name, enabled, version, group_window_s, repeat_interval_s,
                          fingerprint_keys) in self._rules.items()
        }

    @property
    def held_rules(self) -> Mapping[str, HeldRule]:
        """rule_id -> the rule as held (enabled or not), read-only."""
        return self._rules

    @property
    def grouping_rules(self) -> Mapping[str, HeldRule]:
        """rule_id -> the rule as held, for the enabled rules with a group window or a repeat interval."""
        return self._grouping

    def match(self, alert: Alert) -> dict[str, list[str]]:
        """client_id -> sorted rule_ids of that client's enabled rules matching the alert."""
        severity, source, name = alert.severity.value, alert.source, alert.name
        by_client: dict[str, list[str]] = {}
        lookup = self._by_criteria.get
        # Each field either exact or `*`: 7 lookups, most of them finding nothing ((*, *, *) is refused
        # by the contract).
        lookups = ((severity, source, name), (severity, source, WILDCARD), (severity, WILDCARD, name),
                   (severity, WILDCARD, WILDCARD), (WILDCARD, source, name),
                   (WILDCARD, source, WILDCARD), (WILDCARD, WILDCARD, name))
        if source == WILDCARD or name == WILDCARD:
            # An alert whose source or name is literally `*` makes some lookups the same: each bucket
            # is read once, or its rules would be listed twice. (A rule sits in one bucket only, so
            # distinct lookups give distinct rule_ids.) Checked here, off the common path.
            lookups = tuple(dict.fromkeys(lookups))
        for criteria in lookups:
            bucket = lookup(criteria)
            if bucket:
                for rule_id, client_id in bucket.items():
                    rule_ids = by_client.get(client_id)
                    if rule_ids is None:
                        by_client[client_id] = [rule_id]
                    else:
                        rule_ids.append(rule_id)
        for rule_ids in by_client.values():
            rule_ids.sort()
        return by_client


def matched_messages(alert: Alert, index: RuleIndex, silenced_by: SilenceLookup | None = None) -> list[AlertMatched]:
    """One `alerts.matched` message per matching client, listing all of its matching rules.

    Each carries the group window of the client's group rule: of its matching rules the one with
    the shortest group window, so an urgent rule is never delayed by a digest rule; ties go to the
    smallest rule_id. Its repeat setting is `repeat_setting`'s, with the repeat fingerprint when
    there is one (None otherwise: hashing costs, and nothing would compare it), and the silence that
    mutes the alert for that client, if `silenced_by` finds one.
    """
    grouping = index.grouping_rules
    messages = []
    for client_id, rule_ids in sorted(index.match(alert).items()):
        if len(rule_ids) == 1:
            group_rule_id = rule_ids[0]
            held = grouping.get(group_rule_id)
            group_window_s, repeat_interval_s, fingerprint_keys = held[6:] if held is not None else _AT_ONCE
        else:
            # min() keeps the first of equal windows, and rule_ids are sorted: the smallest rule_id.
            group_rule_id = min(rule_ids, key=lambda rule_id: (grouping[rule_id][_GROUP_WINDOW_S]
                                                               if rule_id in grouping else 0))
            held = grouping.get(group_rule_id)
            group_window_s = held[_GROUP_WINDOW_S] if held is not None else 0
            repeat_interval_s, fingerprint_keys = repeat_setting(rule_ids, grouping)
        silence_id = silenced_by(client_id, alert) if silenced_by is not None else None
        if not group_window_s and not repeat_interval_s and silence_id is None:
            # The common case, other fields left at their defaults: every field given is validated,
            # and validating all of them cost the evaluator a tenth of its matching time.
            messages.append(AlertMatched(alert=alert, client_id=client_id, rule_ids=rule_ids,
                                         group_rule_id=group_rule_id))
            continue
        messages.append(AlertMatched(
            alert=alert, client_id=client_id, rule_ids=rule_ids, group_rule_id=group_rule_id,
            group_window_s=group_window_s, repeat_interval_s=repeat_interval_s,
            fingerprint=fingerprint_of(client_id, alert, fingerprint_keys) if repeat_interval_s else None,
            silenced_by=silence_id,
        ))
    return messages


def forget_deletions(versions: dict[str, int], deleted_at: dict[str, float], deleted_before: float) -> list[str]:
    """Drop from `versions` and `deleted_at` the tombstones dated before `deleted_before`; their ids."""
    forgotten = [key for key, at in deleted_at.items() if at < deleted_before]
    for key in forgotten:
        del deleted_at[key], versions[key]
    return forgotten


def repeat_setting(rule_ids: list[str], grouping: Mapping[str, HeldRule]) -> tuple[int, tuple[str, ...]]:
    """(repeat_interval_s, fingerprint_keys) of one client's notification of an alert its rules
    `rule_ids` (sorted) all match.

    The notification goes to the endpoints of every one of them, so a repeat is suppressed only
    when every one suppresses repeats: one rule that asks for every alert gets it, whichever rule_ids
    the rules were given. Then the shortest interval applies, with that rule's fingerprint keys (tie:
    the smallest rule_id): the least suppression any of them asked for.
    """
    chosen = None
    for rule_id in rule_ids:
        held = grouping.get(rule_id)
        if held is None or not held[_REPEAT_INTERVAL_S]:
            return 0, ()
        if chosen is None or held[_REPEAT_INTERVAL_S] < chosen[_REPEAT_INTERVAL_S]:
            chosen = held
    return chosen[_REPEAT_INTERVAL_S], chosen[_FINGERPRINT_KEYS]
