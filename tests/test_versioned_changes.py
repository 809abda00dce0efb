"""rule.changed and silence.changed share one shape: an upsert carries the whole item with the event's
id, client_id and version; a delete carries none. Anything else is refused when decoded."""
from __future__ import annotations

import pytest
from pydantic import ValidationError

from alerting_app.contracts import RuleChanged, SilenceChanged
from test_matching import upsert as rule_upsert
from test_silencing import silence as a_silence

RULE = rule_upsert("r1").rule
SILENCE = a_silence("s1")


@pytest.mark.parametrize("contract, event, reason", [
    (RuleChanged, dict(rule_id="r1", client_id="client-a", version=1, action="upsert"), "an upsert carries the rule"),
    (RuleChanged, dict(rule_id="r1", client_id="client-b", version=1, action="upsert", rule=RULE),
     "rule_id, client_id and version must equal the rule's"),
    (RuleChanged, dict(rule_id="r1", client_id="client-a", version=2, action="upsert", rule=RULE),
     "rule_id, client_id and version must equal the rule's"),
    (RuleChanged, dict(rule_id="r1", client_id="client-a", version=1, action="delete", rule=RULE),
     "a delete carries no rule"),
    (SilenceChanged, dict(silence_id="s1", client_id="client-a", version=1, action="upsert"),
     "an upsert carries the silence"),
    (SilenceChanged, dict(silence_id="s2", client_id="client-a", version=1, action="upsert", silence=SILENCE),
     "silence_id, client_id and version must equal the silence's"),
    (SilenceChanged, dict(silence_id="s1", client_id="client-a", version=1, action="delete", silence=SILENCE),
     "a delete carries no silence"),
    # Above Postgres's integer: every later change the API makes would be ignored as older.
    (RuleChanged, dict(rule_id="r1", client_id="client-a", version=2**31, action="delete"), "version"),
    (SilenceChanged, dict(silence_id="s1", client_id="client-a", version=2**40, action="delete"), "version"),
])
def test_malformed_changes_are_refused(contract, event, reason):
    with pytest.raises(ValidationError, match=reason):
        contract(**event)


def test_well_formed_changes_are_accepted():
    assert RuleChanged.upsert(RULE).rule == RULE
    assert RuleChanged(rule_id="r1", client_id="client-a", version=2, action="delete").rule is None
    assert SilenceChanged.upsert(SILENCE).silence == SILENCE
    assert SilenceChanged(silence_id="s1", client_id="client-a", version=2, action="delete").silence is None
