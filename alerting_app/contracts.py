"""Message contracts of every topic, defined once; docs/contracts.md documents them with examples.

Messages are JSON. Pydantic validates them on the way in (a message that fails goes to the
topic's dead-letter topic with the reason) and serialises them on the way out.
"""
from __future__ import annotations

import time
from enum import Enum
from typing import Literal
from uuid import uuid4

from pydantic import BaseModel, ConfigDict, Field, model_validator

WILDCARD = "*"

Text = Field(min_length=1, max_length=200)


class Severity(str, Enum):
    LOW = "LOW"
    MEDIUM = "MEDIUM"
    HIGH = "HIGH"
    CRITICAL = "CRITICAL"


class Contract(BaseModel):
    # Unknown fields are ignored so producers can add fields ahead of consumers; known ones are strict.
    model_config = ConfigDict(extra="ignore", frozen=True)

    def encode(self) -> bytes:
        return self.model_dump_json().encode()


class Alert(Contract):
    """`alerts.new`, key `alert_id`."""

    alert_id: str = Text
    schema_version: Literal[1] = 1
    event_ts: float = Field(gt=0, description="unix seconds")
    severity: Severity
    source: str = Text
    name: str = Text
    context: dict[str, str] = Field(default_factory=dict)


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


class Rule(RuleCriteria):
    rule_id: str
    client_id: str
    enabled: bool = True
    version: int = Field(ge=1)


class RuleChanged(Contract):
    """`rule.changed`, key `rule_id`: the whole rule (upsert) or a deletion marker, with its version.

    Each event stands on its own, so applying it is idempotent and an older version than the one
    held is ignored; replaying the topic rebuilds the same rule set.
    """

    rule_id: str
    client_id: str
    version: int = Field(ge=1)
    action: Literal["upsert", "delete"]
    rule: Rule | None = None
    changed_at: float = Field(default_factory=time.time)

    @classmethod
    def upsert(cls, rule: Rule) -> "RuleChanged":
        return cls(rule_id=rule.rule_id, client_id=rule.client_id, version=rule.version, action="upsert", rule=rule)

    @model_validator(mode="after")
    def _rule_matches_action(self) -> "RuleChanged":
        if self.action == "upsert":
            if self.rule is None:
                raise ValueError("an upsert carries the rule")
            if (self.rule.rule_id, self.rule.client_id, self.rule.version) != (
                self.rule_id,
                self.client_id,
                self.version,
            ):
                raise ValueError("rule_id, client_id and version must equal the rule's")
        elif self.rule is not None:
            raise ValueError("a delete carries no rule")
        return self


class AlertMatched(Contract):
    """`alerts.matched`, key `client_id`: one message per matching client, listing all its rules."""

    alert: Alert
    client_id: str
    rule_ids: list[str] = Field(min_length=1)
    matched_at: float = Field(default_factory=time.time)


class NotificationReady(Contract):
    """`notifications.ready`, key `client_id`."""

    notification_id: str = Field(default_factory=lambda: str(uuid4()))
    client_id: str
    alerts: list[Alert] = Field(min_length=1)
    rule_ids: list[str] = Field(min_length=1)
    created_at: float = Field(default_factory=time.time)


class DeadLetter(Contract):
    """`<topic>.dlq`: what could not be processed, why, and the original bytes."""

    topic: str
    partition: int | None = None
    offset: int | None = None
    key: str | None = None
    reason: str
    payload: str = Field(description="the original value, decoded as UTF-8 with replacement")
    failed_at: float = Field(default_factory=time.time)
