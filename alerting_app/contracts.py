"""Message contracts of every topic, defined once; docs/contracts.md documents them with examples.

Messages are JSON. Pydantic validates them on the way in (a message that fails goes to the
topic's dead-letter topic with the reason) and serialises them on the way out.
"""
from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Iterable, Mapping
from enum import Enum
from typing import Annotated, Literal
from uuid import uuid4

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, model_validator
from pydantic_core import PydanticCustomError

WILDCARD = "*"

# Postgres's text and jsonb cannot hold the NUL character (U+0000): a string carrying one would be
# accepted here and refused by a later stage's insert, where it stops the partition it sits on. So
# every string that may reach Postgres refuses it at the door (a 422, or a dead letter with the reason).
NO_NUL = r"^[^\x00]*$"
Text = Field(min_length=1, max_length=200, pattern=NO_NUL)
# Grouping and repeat suppression (issue 5): seconds, 0 meaning "off".
GroupWindow = Field(default=0, ge=0, le=86_400, description="seconds alerts are collected into one "
                                                            "notification; 0 notifies at once")
MAX_REPEAT_INTERVAL_S = 604_800  # a week
RepeatInterval = Field(default=0, ge=0, le=MAX_REPEAT_INTERVAL_S,
                       description="seconds within which the same fingerprint is suppressed; 0 never suppresses")
ContextKey = Annotated[str, Text]
Comment = Field(min_length=1, max_length=1000, pattern=NO_NUL)
# Bounded so that one alert cannot outgrow a message: alerts travel in notifications and group tables.
ContextValue = Annotated[str, Field(max_length=2000, pattern=NO_NUL)]
MAX_CONTEXT_ENTRIES = 64
# 9999-12-31T23:59:59Z, the last second Python's datetime (and so every time shown in a Slack message
# or an email) can represent. Milliseconds since the epoch, a common mistake, lie beyond it.
MAX_UNIX_S = 253_402_300_800


def _before_year_10000(value: float) -> float:
    # Not Field(lt=...): its message, `Input should be less than 253402300800`, left the sender to work
    # out that its time was in milliseconds, the one mistake that reaches the bound.
    if value >= MAX_UNIX_S:
        raise PydanticCustomError(
            "unix_seconds", "Input should be unix seconds before year 10000 (less than {limit}): "
            "a time in milliseconds is a thousand times too large", {"limit": MAX_UNIX_S})
    return value


UnixSeconds = Annotated[StrictFloat, Field(gt=0), AfterValidator(_before_year_10000)]


class Severity(str, Enum):
    LOW = "LOW"
    MEDIUM = "MEDIUM"
    HIGH = "HIGH"
    CRITICAL = "CRITICAL"


class Contract(BaseModel):
    # Unknown fields are ignored so producers can add fields ahead of consumers; known ones are strict:
    # numbers and booleans must be JSON numbers and booleans (`"event_ts": true` or `"version": "2"`
    # are refused, not read as 1.0 and 2), an integer field takes no 2.0.
    # No float is infinite or NaN: JSON has no such numbers, so they could not be passed on
    # (json.loads reads 1e400 as infinity; re-encoded it becomes null and fails one stage later).
    model_config = ConfigDict(extra="ignore", frozen=True, allow_inf_nan=False)

    def encode(self) -> bytes:
        return self.model_dump_json().encode()


class Alert(Contract):
    """`alerts.new`, key `alert_id`."""

    alert_id: str = Text
    schema_version: StrictInt = Field(default=1, ge=1, le=1, description="1, the only version so far")
    event_ts: UnixSeconds = Field(description="unix seconds (not milliseconds)")
    severity: Severity
    source: str = Text
    name: str = Text
    context: dict[ContextKey, ContextValue] = Field(default_factory=dict, max_length=MAX_CONTEXT_ENTRIES)

    @classmethod
    def from_stored(cls, data: dict) -> "Alert":
        """An alert as a notification row holds it, rebuilt without validating it again.

        It was validated when it came in. A row stored under an earlier, looser contract (an
        event_ts in milliseconds, say) must still load: the sweep, the closer and re-emits rebuild
        many rows at once, and one such row would otherwise stop them for everyone.
        """
        return cls.model_construct(**{**data, "severity": Severity(data["severity"])})


class RuleCriteria(Contract):
    """What a rule matches: each field an exact value or `*`; at least one is not `*`."""

    severity: Severity | Literal["*"]
    source: str = Text
    name: str = Text

    @model_validator(mode="after")
    def _not_all_wildcards(self) -> "RuleCriteria":
        if self.severity == WILDCARD and self.source == WILDCARD and self.name == WILDCARD:
            raise ValueError("at least one of severity, source, name must not be '*'")
        return self



# A rule's or silence's version: Postgres's `integer` column bounds what the API can ever write. An
# event above it (only a hand-written one can be) would outrank every later change the API makes.
Version = Annotated[StrictInt, Field(ge=1, le=2**31 - 1)]


class Rule(RuleCriteria):
    rule_id: str
    client_id: str
    enabled: StrictBool = True
    version: Version
    group_window_s: StrictInt = GroupWindow
    repeat_interval_s: StrictInt = RepeatInterval
    fingerprint_keys: list[ContextKey] = Field(default_factory=list, max_length=20,
                                               description="context keys that join severity, source and name "
                                                           "in the repeat-suppression fingerprint")


def fingerprint_of(client_id: str, alert: Alert, context_keys: Iterable[str]) -> str:
    """What repeat suppression compares: client, severity, source, name and the chosen context values.

    A missing context key and an empty value differ (null vs ""), and key order does not matter.
    """
    parts = [client_id, alert.severity.value, alert.source, alert.name,
             [[key, alert.context.get(key)] for key in sorted(set(context_keys))]]
    return hashlib.sha256(json.dumps(parts, separators=(",", ":")).encode()).hexdigest()


def context_digest(text: str) -> str:
    """Hex SHA-256 of a context key or value (UTF-8), as an alert kept without its context keeps them."""
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()


def context_digests(context: Mapping[str, str]) -> dict[str, str]:
    """What an alert kept without its context (tables/groups.py `without_context`) keeps of it for the
    silences: each key's digest -> its value's. A silence decides on it as on the context itself
    (`SilenceMatchers.matches`): a key is present, a value equal, exactly when their digests are.
    Its size is bounded whatever the context (64 entries of 2 x 64 hex characters), where the
    context itself, or only its keys, may take far more than a group's listing holds (an emoji key
    of 200 characters is 2.4 KB as the group table encodes it), and a matcher's value may be as
    long as any context value, so no cut of the values could tell every matcher apart."""
    return {context_digest(key): context_digest(value) for key, value in context.items()}


def check_versioned_change(action: str, noun: str, item: object | None, event_ids: tuple, item_ids: tuple | None) -> None:
    """What `rule.changed` and `silence.changed` events share: an upsert carries the whole item, with
    the event's id, client_id and version; a delete carries none."""
    if action == "upsert":
        if item is None:
            raise ValueError(f"an upsert carries the {noun}")
        if item_ids != event_ids:
            raise ValueError(f"{noun}_id, client_id and version must equal the {noun}'s")
    elif item is not None:
        raise ValueError(f"a delete carries no {noun}")


class RuleChanged(Contract):
    """`rule.changed`, key `rule_id`: the whole rule (upsert) or a deletion marker, with its version.

    Each event stands on its own, so applying it is idempotent and an older version than the one
    held is ignored; replaying the topic rebuilds the same rule set.
    """

    rule_id: str
    client_id: str
    version: Version
    action: Literal["upsert", "delete"]
    rule: Rule | None = None
    changed_at: StrictFloat = Field(default_factory=time.time)

    @classmethod
    def upsert(cls, rule: Rule) -> "RuleChanged":
        return cls(rule_id=rule.rule_id, client_id=rule.client_id, version=rule.version, action="upsert", rule=rule)

    @model_validator(mode="after")
    def _rule_matches_action(self) -> "RuleChanged":
        rule = self.rule
        check_versioned_change(self.action, "rule", rule, (self.rule_id, self.client_id, self.version),
                               rule and (rule.rule_id, rule.client_id, rule.version))
        return self


class SilenceMatchers(Contract):
    """What a silence mutes: severity, source, name (each exact or `*`) and context values.

    A context matcher's value is compared exactly; `*` means "the key is present, any value".
    A silence must narrow something: all three `*` with no context matcher would mute every alert
    of the tenant, which is what disabling its rules is for.
    """

    severity: Severity | Literal["*"]
    source: str = Text
    name: str = Text
    # Values as an alert's context values may be (empty, up to 2,000 characters): a silence can name
    # any value an alert can carry.
    context_matchers: dict[ContextKey, ContextValue] = Field(default_factory=dict, max_length=20)

    @model_validator(mode="after")
    def _not_everything(self) -> "SilenceMatchers":
        if (self.severity == WILDCARD and self.source == WILDCARD and self.name == WILDCARD
                and not self.context_matchers):
            raise ValueError("at least one of severity, source, name must not be '*', or a context matcher given")
        return self

    def matches(self, alert: Alert, context_digests: Mapping[str, str] | None = None) -> bool:
        """Whether the silence mutes the alert. `context_digests`: of an alert kept without its
        context (`context_digests()`), what a context matcher is decided on for a key its context
        lacks, exactly as on the value it lost."""
        if self.severity != WILDCARD and self.severity != alert.severity:
            return False
        if self.source != WILDCARD and self.source != alert.source:
            return False
        if self.name != WILDCARD and self.name != alert.name:
            return False
        for key, wanted in self.context_matchers.items():
            value = alert.context.get(key)
            if value is not None:
                if wanted != WILDCARD and value != wanted:
                    return False
                continue
            kept = context_digests.get(context_digest(key)) if context_digests else None
            if kept is None or (wanted != WILDCARD and kept != context_digest(wanted)):
                return False
        return True


class Silence(SilenceMatchers):
    """A tenant's silence: its matching alerts are recorded SILENCED, not delivered, while active."""

    silence_id: str
    client_id: str
    starts_at: StrictFloat = Field(gt=0, description="unix seconds")
    # Equal to starts_at only for a silence expired before it started (its window is empty).
    ends_at: StrictFloat = Field(gt=0, description="unix seconds; active while starts_at <= now < ends_at")
    comment: str = Comment
    created_by: str = Text
    version: Version

    @model_validator(mode="after")
    def _ends_after_start(self) -> "Silence":
        if self.ends_at < self.starts_at:
            raise ValueError("ends_at must not be before starts_at")
        return self

    def is_active(self, at: float) -> bool:
        return self.starts_at <= at < self.ends_at


class SilenceChanged(Contract):
    """`silence.changed`, key `silence_id`: the whole silence (upsert) or a deletion marker, with its version.

    Like RuleChanged: each event stands on its own, an older version than the one held is ignored.
    Expiring a silence is an upsert (its ends_at moves to the expiry time); a delete is sent only
    when the silence itself is gone (its client was deleted, or retention deleted it once ended).
    """

    silence_id: str
    client_id: str
    version: Version
    action: Literal["upsert", "delete"]
    silence: Silence | None = None
    changed_at: StrictFloat = Field(default_factory=time.time)

    @classmethod
    def upsert(cls, silence: Silence) -> "SilenceChanged":
        return cls(silence_id=silence.silence_id, client_id=silence.client_id, version=silence.version,
                   action="upsert", silence=silence)

    @model_validator(mode="after")
    def _silence_matches_action(self) -> "SilenceChanged":
        silence = self.silence
        check_versioned_change(self.action, "silence", silence, (self.silence_id, self.client_id, self.version),
                               silence and (silence.silence_id, silence.client_id, silence.version))
        return self


class AlertMatched(Contract):
    """`alerts.matched`, key `client_id`: one message per matching client, listing all its rules."""

    alert: Alert
    client_id: str
    rule_ids: list[str] = Field(min_length=1)
    matched_at: StrictFloat = Field(default_factory=time.time)
    # Of the matching rule with the shortest group window (tie: smallest rule_id): the alert joins
    # that rule's group, so an urgent rule is never delayed by a digest rule.
    group_rule_id: str | None = None
    group_window_s: StrictInt = GroupWindow
    repeat_interval_s: StrictInt = RepeatInterval
    # contracts.fingerprint_of: hex SHA-256 (bounded, so a bad message is a dead letter, not a key
    # Postgres refuses to index).
    fingerprint: str | None = Field(default=None, pattern="^[0-9a-f]{64}$")
    # An active silence of this client that matches the alert (set by the evaluator).
    silenced_by: str | None = None


class NotificationReady(Contract):
    """`notifications.ready`, key `client_id`."""

    notification_id: str = Field(default_factory=lambda: str(uuid4()))
    client_id: str
    alerts: list[Alert] = Field(min_length=1)
    rule_ids: list[str] = Field(min_length=1)
    created_at: StrictFloat = Field(default_factory=time.time)
    # A grouped notification lists at most a configured number of alerts and counts the rest here.
    truncated_alerts: StrictInt = Field(default=0, ge=0)
    group_rule_id: str | None = None


class DeadLetter(Contract):
    """`<topic>.dlq`: what could not be processed, why, and the original bytes."""

    topic: str
    partition: StrictInt | None = None
    offset: StrictInt | None = None
    key: str | None = None
    reason: str
    payload: str = Field(description="the original value, decoded as UTF-8 with replacement")
    failed_at: StrictFloat = Field(default_factory=time.time)
    # The record was already on its topic when this worker began reading it: silence.changed is
    # read again by every worker at every start (rule.changed by a worker without a rule store), so
    # the same letter may have been sent before, by this worker or another. Counted apart, so a
    # start is no new alarm.
    from_history: StrictBool = False
