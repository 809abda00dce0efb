"""Which silence mutes an alert (SilenceIndex), as plain functions: no Faust, no broker."""
from __future__ import annotations

import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from alerting_app.contracts import WILDCARD, Alert, Silence, SilenceChanged, SilenceMatchers
from alerting_app import silencing
from alerting_app.silencing import PRUNE_AFTER_EXPIRY_S, SilenceIndex

T0 = 1_700_000_000.0


def silence(silence_id: str = "s1", client_id: str = "client-a", version: int = 1, *, severity: str = WILDCARD,
            source: str = "payments", name: str = WILDCARD, context: dict[str, str] | None = None,
            starts_at: float = T0, ends_at: float = T0 + 3600) -> Silence:
    return Silence(silence_id=silence_id, client_id=client_id, version=version, severity=severity, source=source,
                   name=name, context_matchers=context or {}, starts_at=starts_at, ends_at=ends_at,
                   comment="maintenance", created_by="ops@example.com")


def upsert(*args, **kwargs) -> SilenceChanged:
    return SilenceChanged.upsert(silence(*args, **kwargs))


def delete(silence_id: str = "s1", client_id: str = "client-a", version: int = 2) -> SilenceChanged:
    return SilenceChanged(silence_id=silence_id, client_id=client_id, version=version, action="delete")


def alert(severity: str = "HIGH", source: str = "payments", name: str = "CheckoutLatency",
          context: dict[str, str] | None = None) -> Alert:
    return Alert(alert_id="alert-1", event_ts=T0, severity=severity, source=source, name=name,
                 context=context or {})


def test_an_active_silence_mutes_matching_alerts_of_its_client_only():
    index = SilenceIndex([upsert()])

    assert index.silencing("client-a", alert(), at=T0 + 1) == "s1"
    assert index.silencing("client-b", alert(), at=T0 + 1) is None
    assert index.silencing("client-a", alert(source="search"), at=T0 + 1) is None


def test_a_silence_is_active_from_starts_at_until_just_before_ends_at():
    index = SilenceIndex([upsert(starts_at=T0, ends_at=T0 + 10)])

    assert index.silencing("client-a", alert(), at=T0 - 0.001) is None
    assert index.silencing("client-a", alert(), at=T0) == "s1"
    assert index.silencing("client-a", alert(), at=T0 + 9.999) == "s1"
    assert index.silencing("client-a", alert(), at=T0 + 10) is None


def test_without_a_time_the_silence_is_checked_now():
    import time

    now = time.time()
    index = SilenceIndex([upsert("past", starts_at=now - 20, ends_at=now - 10),
                          upsert("current", starts_at=now - 10, ends_at=now + 3600)])

    assert index.silencing("client-a", alert()) == "current"


def test_context_matchers_need_the_value_or_with_star_just_the_key():
    index = SilenceIndex([upsert("exact", source=WILDCARD, context={"region": "eu-west-1"}),
                          upsert("present", source=WILDCARD, context={"canary": WILDCARD})])

    assert index.silencing("client-a", alert(context={"region": "eu-west-1"}), at=T0) == "exact"
    assert index.silencing("client-a", alert(context={"region": "us-east-1"}), at=T0) is None
    assert index.silencing("client-a", alert(context={"canary": ""}), at=T0) == "present"
    assert index.silencing("client-a", alert(), at=T0) is None


def test_a_context_matcher_can_name_any_value_an_alert_can_carry():
    long_value = "https://grafana.example.com/d/" + "x" * 1970  # 2,000 characters, the most an alert carries
    index = SilenceIndex([upsert("long", source=WILDCARD, context={"url": long_value}),
                          upsert("empty", source=WILDCARD, context={"canary": ""})])

    assert index.silencing("client-a", alert(context={"url": long_value}), at=T0) == "long"
    assert index.silencing("client-a", alert(context={"canary": ""}), at=T0) == "empty"
    assert index.silencing("client-a", alert(context={"canary": "yes"}), at=T0) is None


def test_of_several_matching_silences_the_smallest_id_is_named():
    index = SilenceIndex([upsert("s2"), upsert("s1", severity="HIGH")])

    assert index.silencing("client-a", alert(), at=T0) == "s1"


def test_a_stale_version_is_ignored_and_a_delete_is_final():
    index = SilenceIndex()

    assert index.apply(upsert(version=2, source="search"))
    assert not index.apply(upsert(version=1, source="payments"))
    assert index.silencing("client-a", alert(source="search"), at=T0) == "s1"
    assert index.apply(delete(version=3))
    assert not index.apply(upsert(version=2, source="search"))
    assert index.silencing("client-a", alert(source="search"), at=T0) is None
    assert len(index) == 0 and index.versions() == {}



def test_a_silence_upserted_after_its_delete_is_no_tombstone_any_more():
    # Were the delete's date kept, forgetting old deletions would forget the live silence's version,
    # and a late older upsert would then replace it.
    index = SilenceIndex([upsert(version=1, source="search")])
    index.apply(delete(version=2), at=1_000.0)
    index.apply(upsert(version=3), at=2_000.0)

    assert index.deleted_versions() == {}
    assert index.forget_deletions(3_000.0) == []
    assert not index.apply(upsert(version=1, source="search"))
    assert index.silencing("client-a", alert(), at=T0) == "s1"
    assert index.versions() == {"s1": 3}

def test_an_event_of_the_version_held_is_ignored():
    # Only a newer version changes a silence: one event of the same version with other content (a
    # replay beside a newer producer's, a hand-written one) must not win by arriving last.
    index = SilenceIndex([upsert(version=3, source="search")])

    assert not index.apply(upsert(version=3, source="payments"))
    assert index.silencing("client-a", alert(source="search"), at=T0) == "s1"
    assert index.silencing("client-a", alert(source="payments"), at=T0) is None
    assert index.apply(delete(version=4))
    assert not index.apply(upsert(version=4))
    assert index.silencing("client-a", alert(), at=T0) is None


def test_an_expiry_is_an_upsert_with_an_earlier_end():
    index = SilenceIndex([upsert(ends_at=T0 + 3600)])

    index.apply(upsert(version=2, ends_at=T0 + 5))

    assert index.silencing("client-a", alert(), at=T0 + 4) == "s1"
    assert index.silencing("client-a", alert(), at=T0 + 5) is None
    assert index.versions() == {"s1": 2}


def test_a_long_expired_silence_is_no_longer_scanned_but_still_held_and_can_come_back():
    now = time.time()
    expired = silence(starts_at=now - PRUNE_AFTER_EXPIRY_S - 20, ends_at=now - PRUNE_AFTER_EXPIRY_S - 10)
    index = SilenceIndex([SilenceChanged.upsert(expired)])

    assert index.silencing("client-a", alert()) is None
    assert index._by_client == {}  # no longer scanned
    assert index.versions() == {"s1": 1}  # still held: workers compare it
    assert index.apply(upsert(version=2, starts_at=now - 20, ends_at=now + 60))
    assert index.silencing("client-a", alert()) == "s1"


def test_a_silence_seen_expired_by_a_clock_stepped_ahead_mutes_again_once_the_clock_is_back(monkeypatch):
    index = SilenceIndex([upsert(starts_at=T0, ends_at=T0 + 3600)])
    clock = [T0 + 3600 + 300]  # an NTP step puts the clock 5 minutes past the silence's end
    monkeypatch.setattr(silencing.time, "time", lambda: clock[0])

    assert index.silencing("client-a", alert()) is None, "past its end by the clock: it does not mute"
    clock[0] = T0 + 1800  # the clock is stepped back
    assert index.silencing("client-a", alert()) == "s1"

    clock[0] = T0 + 3600 + PRUNE_AFTER_EXPIRY_S
    assert index.silencing("client-a", alert()) is None
    assert index._by_client == {}, "long past its end: no longer scanned"


def test_a_silence_seen_just_past_its_end_mutes_again_after_a_small_step_back_of_the_clock(monkeypatch):
    # Only a silence PRUNE_AFTER_EXPIRY_S past its end leaves the scan: a step back smaller than that
    # (NTP's), which does not have every silence scanned again, must still find one in force.
    index = SilenceIndex([upsert(starts_at=T0, ends_at=T0 + 3600)])
    clock = [T0 + 3600 + 60]  # a minute past its end
    monkeypatch.setattr(silencing.time, "time", lambda: clock[0])
    assert index.silencing("client-a", alert()) is None

    clock[0] = T0 + 3600 - 60  # stepped back two minutes: inside the silence again
    assert index.silencing("client-a", alert()) == "s1"


def test_a_silence_dropped_from_the_scan_by_a_clock_far_ahead_mutes_again_once_the_clock_is_back(monkeypatch):
    index = SilenceIndex([upsert(starts_at=T0, ends_at=T0 + 3600)])
    clock = [T0 + 3600 + PRUNE_AFTER_EXPIRY_S + 60]  # a step of more than PRUNE_AFTER_EXPIRY_S past its end
    monkeypatch.setattr(silencing.time, "time", lambda: clock[0])
    assert index.silencing("client-a", alert()) is None
    assert index._by_client == {}, "dropped from the scan at that clock"

    clock[0] = T0 + 1800  # the clock is stepped back, inside the silence
    assert index.silencing("client-a", alert()) == "s1"
    assert index.silencing("client-b", alert()) is None  # another client's silence does not apply

    clock[0] = T0 + 3600 + PRUNE_AFTER_EXPIRY_S
    assert index.silencing("client-a", alert()) is None
    assert index._by_client == {}


def test_a_silence_that_would_mute_everything_is_refused_by_the_contract():
    with pytest.raises(ValidationError, match="must not be"):
        SilenceMatchers(severity=WILDCARD, source=WILDCARD, name=WILDCARD)
    assert SilenceMatchers(severity=WILDCARD, source=WILDCARD, name=WILDCARD, context_matchers={"env": "*"})


def test_a_silence_ending_before_it_starts_is_refused_by_the_contract():
    with pytest.raises(ValidationError, match="ends_at"):
        silence(starts_at=T0, ends_at=T0 - 1)


# --- against a brute-force matcher ------------------------------------------------------------------

SEVERITIES = ["LOW", "MEDIUM", "HIGH", "CRITICAL"]
VALUES = ["a", "b"]
KEYS = ["k1", "k2"]


def brute_force(changes: list[SilenceChanged], client_id: str, alert: Alert, at: float) -> set[str]:
    """The newest event of each silence, applied by hand; which active ones match the alert."""
    newest: dict[str, SilenceChanged] = {}
    for change in changes:
        if change.silence_id not in newest or change.version > newest[change.silence_id].version:
            newest[change.silence_id] = change
    found = set()
    for change in newest.values():
        s = change.silence
        if change.action != "upsert" or s.client_id != client_id or not s.starts_at <= at < s.ends_at:
            continue
        if s.severity not in (WILDCARD, alert.severity.value) or s.source not in (WILDCARD, alert.source):
            continue
        if s.name not in (WILDCARD, alert.name):
            continue
        if all(key in alert.context and value in (WILDCARD, alert.context[key])
               for key, value in s.context_matchers.items()):
            found.add(s.silence_id)
    return found


@st.composite
def changes(draw) -> SilenceChanged:
    silence_id = draw(st.sampled_from(["s1", "s2", "s3", "s4"]))
    client_id = draw(st.sampled_from(["client-a", "client-b"]))
    version = draw(st.integers(1, 4))
    if draw(st.integers(0, 4)) == 0:
        return SilenceChanged(silence_id=silence_id, client_id=client_id, version=version, action="delete")
    context = draw(st.dictionaries(st.sampled_from(KEYS), st.sampled_from(VALUES + [WILDCARD]), max_size=2))
    severity = draw(st.sampled_from(SEVERITIES + [WILDCARD]))
    source = draw(st.sampled_from(VALUES + [WILDCARD]))
    name = draw(st.sampled_from(VALUES + [WILDCARD]))
    if severity == source == name == WILDCARD and not context:
        name = "a"
    starts_at = T0 + draw(st.integers(0, 10))
    return upsert(silence_id, client_id, version, severity=severity, source=source, name=name, context=context,
                  starts_at=starts_at, ends_at=starts_at + draw(st.integers(1, 10)))


alerts = st.builds(alert, severity=st.sampled_from(SEVERITIES), source=st.sampled_from(VALUES),
                   name=st.sampled_from(VALUES),
                   context=st.dictionaries(st.sampled_from(KEYS), st.sampled_from(VALUES), max_size=2))


@settings(max_examples=300, deadline=None)
@given(st.lists(changes(), max_size=12), st.data())
def test_the_index_agrees_with_brute_force_in_any_order(events, data):
    # Distinct (silence_id, version) pairs: two different events with one version cannot both be newest.
    unique = list({(e.silence_id, e.version): e for e in events}.values())
    ordered = data.draw(st.permutations(unique))
    index = SilenceIndex(ordered)
    for _ in range(5):
        probe = data.draw(alerts)
        client_id = data.draw(st.sampled_from(["client-a", "client-b"]))
        at = T0 + data.draw(st.integers(0, 21))
        want = brute_force(unique, client_id, probe, at)
        assert index.silencing(client_id, probe, at=at) == (min(want) if want else None)
