"""Matching semantics of RuleIndex, as plain functions: no Faust, no broker."""
from __future__ import annotations

import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from alerting_app.contracts import WILDCARD, Alert, Rule, RuleChanged, Severity
from alerting_app.matching import RuleIndex, matched_messages


def upsert(rule_id: str, client_id: str = "client-a", version: int = 1, *, severity: str = "HIGH",
           source: str = "payments", name: str = "CheckoutLatency", enabled: bool = True) -> RuleChanged:
    rule = Rule(rule_id=rule_id, client_id=client_id, version=version, severity=severity, source=source,
                name=name, enabled=enabled)
    return RuleChanged(rule_id=rule_id, client_id=client_id, version=version, action="upsert", rule=rule)


def delete(rule_id: str, client_id: str = "client-a", version: int = 2) -> RuleChanged:
    return RuleChanged(rule_id=rule_id, client_id=client_id, version=version, action="delete")


def alert(severity: str = "HIGH", source: str = "payments", name: str = "CheckoutLatency",
          alert_id: str = "alert-1") -> Alert:
    return Alert(alert_id=alert_id, event_ts=1_700_000_000.0, severity=severity, source=source, name=name)


def test_rule_with_exact_values_matches_only_that_alert():
    index = RuleIndex([upsert("r1")])

    assert index.match(alert()) == {"client-a": ["r1"]}
    assert index.match(alert(severity="LOW")) == {}
    assert index.match(alert(source="search")) == {}
    assert index.match(alert(name="CheckoutErrors")) == {}


@pytest.mark.parametrize("wildcard_field", ["severity", "source", "name"])
def test_wildcard_field_matches_any_value_of_that_field_only(wildcard_field):
    index = RuleIndex([upsert("r1", **{wildcard_field: WILDCARD})])
    other_value = {"severity": "LOW", "source": "search", "name": "DiskFull"}

    assert index.match(alert(**{wildcard_field: other_value[wildcard_field]})) == {"client-a": ["r1"]}
    for field in {"severity", "source", "name"} - {wildcard_field}:
        assert index.match(alert(**{field: other_value[field]})) == {}


def test_rule_with_two_wildcards_matches_on_the_remaining_field():
    index = RuleIndex([upsert("r1", severity=WILDCARD, name=WILDCARD)])

    assert index.match(alert(severity="LOW", name="Anything")) == {"client-a": ["r1"]}
    assert index.match(alert(source="search")) == {}


def test_disabled_rule_never_matches():
    index = RuleIndex([upsert("r1", enabled=False), upsert("r2", severity=WILDCARD, enabled=False)])

    assert index.match(alert()) == {}


def test_disabling_then_enabling_a_rule_follows_the_newest_version():
    index = RuleIndex([upsert("r1", version=1), upsert("r1", version=2, enabled=False)])
    assert index.match(alert()) == {}

    index.apply(upsert("r1", version=3, enabled=True))
    assert index.match(alert()) == {"client-a": ["r1"]}


def test_changing_criteria_removes_the_old_ones():
    index = RuleIndex([upsert("r1", version=1, source="payments"), upsert("r1", version=2, source="search")])

    assert index.match(alert(source="payments")) == {}
    assert index.match(alert(source="search")) == {"client-a": ["r1"]}


def test_one_message_per_client_listing_all_its_matching_rules_sorted():
    index = RuleIndex([
        upsert("r3", "client-a"),
        upsert("r1", "client-a", name=WILDCARD),
        upsert("r2", "client-b", severity=WILDCARD),
        upsert("r4", "client-b", source="search"),  # does not match
    ])

    messages = matched_messages(alert(), index)

    assert [(m.client_id, m.rule_ids) for m in messages] == [("client-a", ["r1", "r3"]), ("client-b", ["r2"])]
    assert all(m.alert == alert() for m in messages)


def test_alert_matching_no_rule_produces_no_message():
    assert matched_messages(alert(), RuleIndex([upsert("r1", source="search")])) == []


def test_stale_version_is_ignored():
    index = RuleIndex([upsert("r1", version=3, source="search")])

    assert index.apply(upsert("r1", version=2, source="payments")) is False
    assert index.apply(upsert("r1", version=3, source="payments")) is False
    assert index.match(alert(source="search")) == {"client-a": ["r1"]}
    assert index.match(alert(source="payments")) == {}


def test_applying_the_same_event_twice_changes_nothing_the_second_time():
    index = RuleIndex()
    event = upsert("r1")

    assert index.apply(event) is True
    assert index.apply(event) is False
    assert index.rules() == {"r1": event.rule}


def test_delete_tombstone_blocks_a_late_older_upsert():
    index = RuleIndex([upsert("r1", version=1), delete("r1", version=2)])

    assert index.apply(upsert("r1", version=1)) is False
    assert index.match(alert()) == {}
    assert index.rules() == {}
    assert index.held_version("r1") == 2


def test_upsert_newer_than_the_delete_brings_the_rule_back():
    index = RuleIndex([upsert("r1", version=1), delete("r1", version=2)])

    assert index.apply(upsert("r1", version=3)) is True
    assert index.match(alert()) == {"client-a": ["r1"]}


def test_replaying_the_same_events_in_any_order_builds_the_same_index():
    events = [
        upsert("r1", version=1),
        upsert("r1", version=2, enabled=False),
        upsert("r1", version=3, name=WILDCARD),
        upsert("r2", "client-b", version=1), delete("r2", "client-b", version=2),
        upsert("r3", "client-b", version=1, source=WILDCARD, name=WILDCARD),
    ]
    reference = RuleIndex(events)

    for order in itertools.permutations(events):
        replayed = RuleIndex(order)
        assert replayed.rules() == reference.rules()
        assert {rule_id: replayed.held_version(rule_id) for rule_id in ("r1", "r2", "r3")} == {
            "r1": 3, "r2": 2, "r3": 1}
        assert replayed.match(alert(name="Other")) == {"client-a": ["r1"], "client-b": ["r3"]}


def test_rebuild_replaces_everything_held():
    index = RuleIndex([upsert("r1"), upsert("r2", "client-b")])

    index.rebuild([upsert("r3", "client-c")])

    assert index.match(alert()) == {"client-c": ["r3"]}
    assert index.held_version("r1") is None


# --- property test against a brute-force matcher -------------------------------------------------

SEVERITIES = [s.value for s in Severity]
SOURCES = ["payments", "search", "auth"]
NAMES = ["CheckoutLatency", "Errors", "DiskFull"]
RULE_IDS = [f"r{i}" for i in range(8)]


def client_of(rule_id: str) -> str:
    # A rule belongs to one client for its whole life.
    return f"client-{int(rule_id[1:]) % 3}"


criteria = st.tuples(
    st.sampled_from(SEVERITIES + [WILDCARD]),
    st.sampled_from(SOURCES + [WILDCARD]),
    st.sampled_from(NAMES + [WILDCARD]),
).filter(lambda c: c != (WILDCARD, WILDCARD, WILDCARD))


@st.composite
def rule_change(draw) -> RuleChanged:
    rule_id = draw(st.sampled_from(RULE_IDS))
    version = draw(st.integers(min_value=1, max_value=30))
    if draw(st.integers(min_value=0, max_value=4)) == 0:
        return delete(rule_id, client_of(rule_id), version)
    severity, source, name = draw(criteria)
    return upsert(rule_id, client_of(rule_id), version, severity=severity, source=source, name=name,
                  enabled=draw(st.booleans()))


# Versions are unique per rule, as the API guarantees, so the newest event of each rule is well defined.
rule_changes = st.lists(rule_change(), max_size=40, unique_by=lambda e: (e.rule_id, e.version))
alerts = st.builds(alert, severity=st.sampled_from(SEVERITIES), source=st.sampled_from(SOURCES + ["other"]),
                   name=st.sampled_from(NAMES + ["other"]))


def brute_force_match(changes: list[RuleChanged], an_alert: Alert) -> dict[str, list[str]]:
    newest: dict[str, RuleChanged] = {}
    for change in changes:
        if change.rule_id not in newest or change.version > newest[change.rule_id].version:
            newest[change.rule_id] = change
    result: dict[str, list[str]] = {}
    for change in newest.values():
        rule = change.rule
        if change.action != "upsert" or not rule.enabled:
            continue
        wanted_and_got = [(rule.severity, an_alert.severity), (rule.source, an_alert.source),
                          (rule.name, an_alert.name)]
        if all(want in (WILDCARD, got) for want, got in wanted_and_got):
            result.setdefault(rule.client_id, []).append(rule.rule_id)
    return {client_id: sorted(rule_ids) for client_id, rule_ids in result.items()}


@settings(max_examples=300, deadline=None)
@given(changes=rule_changes, probes=st.lists(alerts, min_size=1, max_size=10), data=st.data())
def test_index_matches_like_brute_force_whatever_the_order_of_changes(changes, probes, data):
    shuffled = data.draw(st.permutations(changes))
    index = RuleIndex(changes)
    replayed = RuleIndex(shuffled)

    for probe in probes:
        expected = brute_force_match(changes, probe)
        assert index.match(probe) == expected
        assert replayed.match(probe) == expected
        assert [(m.client_id, m.rule_ids) for m in matched_messages(probe, index)] == sorted(expected.items())


def newest_version_of_each_rule(changes: list[RuleChanged]) -> dict[str, int]:
    newest: dict[str, int] = {}
    for change in changes:
        newest[change.rule_id] = max(change.version, newest.get(change.rule_id, 0))
    return newest


@settings(max_examples=300, deadline=None)
@given(changes=rule_changes, probes=st.lists(alerts, min_size=1, max_size=10), data=st.data())
def test_replaying_every_change_with_duplicates_in_any_order_builds_the_same_index(changes, probes, data):
    live = RuleIndex(changes)
    # The whole topic read again, each event twice (a relay that re-sent its batch), in any order.
    replay = data.draw(st.permutations(changes + changes))
    replayed = RuleIndex(replay)

    assert not any(live.apply(change) for change in replay), "a replayed event is never newer than the held one"
    newest = newest_version_of_each_rule(changes)
    for index in (live, replayed):
        # Deleted rules keep their version (a tombstone): compare every rule ever seen.
        assert {rule_id: index.held_version(rule_id) for rule_id in RULE_IDS} == {
            rule_id: newest.get(rule_id) for rule_id in RULE_IDS}
    assert replayed.rules() == live.rules()
    for probe in probes:
        assert replayed.match(probe) == live.match(probe) == brute_force_match(changes, probe)
