"""Request and response bodies of the API v1, and the query parameters of its lists.

Request bodies refuse unknown fields, so a misspelt field is a 422 rather than silently ignored.
Rule criteria reuse the message contract's types, so the API accepts exactly what `rule.changed`
can carry.
"""
from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, ClassVar, Literal
from uuid import UUID

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationInfo, field_validator

from alerting_app.contracts import NO_NUL, WILDCARD, Rule, Severity, Text, Version
from web.pagination import PageQuery
from web.validation import StorableDatetime

Name = Text  # as the contracts' text fields: 1-200 characters, no NUL (Postgres cannot store it)
# Criteria fields as in contracts.RuleCriteria: an exact value or "*", 1..200 characters. One
# Literal rather than `Severity | Literal["*"]`, so that an error names just the field.
SeverityCriterion = Literal[tuple(s.value for s in Severity) + (WILDCARD,)]  # type: ignore[valid-type]
TextCriterion = Text


def as_in_rule(field: str) -> Any:
    """The type of contracts.Rule's `field` with the contract's bounds, defined there once.

    Annotated rather than the contract's Field object so that PATCH can wrap it in `| None`.
    """
    info = Rule.model_fields[field]
    return Annotated[info.annotation, *info.metadata]


# Grouping and repeat suppression (issue 5); docs/contracts.md says what they do.
GroupWindowSeconds = as_in_rule("group_window_s")
RepeatIntervalSeconds = as_in_rule("repeat_interval_s")
FingerprintKeys = as_in_rule("fingerprint_keys")

EndpointType = Literal["webhook", "slack", "email"]
NotificationStatus = Literal["PENDING", "SENT", "FAILED", "SUPPRESSED", "SILENCED"]


class RequestBody(BaseModel):
    # Strict, as the contracts are (docs/contracts.md): "enabled": "off" or 0, "version": "2",
    # 300.0 for a number of seconds are refused naming the field, not read as what they might mean.
    # NaN and Infinity (which JSON has not, and Python's reader takes, as 1e400) are refused as not
    # finite: against a bound, NaN was refused as "less than or equal to 100000", which it is not over.
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)


class PatchBody(RequestBody):
    """PATCH: only the given fields change. A field given as null is refused, unless null means
    something for it (NULLABLE): silently ignored, it would look accepted."""

    NULLABLE: ClassVar[frozenset[str]] = frozenset()

    # Before the type's own check, so a field that cannot be null at all (a client's name) is refused
    # with the same words as one whose type allows null for "not given".
    @field_validator("*", mode="before")
    @classmethod
    def _null_only_where_it_means_something(cls, value: Any, info: ValidationInfo) -> Any:
        if value is None and info.field_name not in cls.NULLABLE:
            raise ValueError("may not be null: leave the field out to keep its value")
        return value


# --- clients -------------------------------------------------------------------------------------

class ClientCreate(RequestBody):
    name: str = Name


class ClientPatch(PatchBody):
    name: str = Name  # the only thing a client's PATCH changes, so required


class ClientOut(BaseModel):
    client_id: UUID
    name: str
    created_at: datetime
    updated_at: datetime


class ClientCreated(ClientOut):
    api_key: str = Field(description="shown only in this response; store it, it cannot be read again")


# --- rules ---------------------------------------------------------------------------------------

class RuleCreate(RequestBody):
    client_id: UUID | None = Field(default=None, description="required with the admin token")
    severity: SeverityCriterion
    source: str = TextCriterion
    name: str = TextCriterion
    enabled: bool = True
    group_window_s: GroupWindowSeconds = 0
    repeat_interval_s: RepeatIntervalSeconds = 0
    fingerprint_keys: FingerprintKeys = Field(default_factory=list)


def _version_not_null(value: Any) -> Any:
    if value is None:
        raise ValueError("may not be null: give the version last read, or leave it out and send If-Match "
                         "with the ETag last read")
    return value


# The version a change was made to, as the caller last read it. Optional in the body: an If-Match
# naming the ETag read says the same, and a client using HTTP preconditions should not have to send
# both; web/rules.py refuses a change that gives neither. Null is refused, not taken for "not
# given", in PUT as in PATCH: a client sending null meant something, and it is not "any version".
ExpectedVersion = Annotated[Version | None, BeforeValidator(_version_not_null)]


class RuleReplace(RequestBody):
    """PUT: the whole rule, with the version the caller last read (or If-Match with the ETag read);
    omitted grouping settings are off."""

    version: ExpectedVersion = None
    severity: SeverityCriterion
    source: str = TextCriterion
    name: str = TextCriterion
    enabled: bool
    group_window_s: GroupWindowSeconds = 0
    repeat_interval_s: RepeatIntervalSeconds = 0
    fingerprint_keys: FingerprintKeys = Field(default_factory=list)


class RulePatch(PatchBody):
    """PATCH: only the given fields change; `version` is the one the caller last read (or If-Match
    with the ETag read)."""

    # Not that null means something for the version: ExpectedVersion refuses it itself, saying what
    # to send instead. A PATCH's "leave the field out to keep its value" is, for it, another refusal.
    NULLABLE: ClassVar[frozenset[str]] = frozenset({"version"})

    version: ExpectedVersion = None
    severity: SeverityCriterion | None = None
    source: Annotated[str, Text] | None = None
    name: Annotated[str, Text] | None = None
    enabled: bool | None = None
    group_window_s: GroupWindowSeconds | None = None
    repeat_interval_s: RepeatIntervalSeconds | None = None
    fingerprint_keys: FingerprintKeys | None = None


class RuleOut(BaseModel):
    rule_id: UUID
    client_id: UUID
    severity: str
    source: str
    name: str
    enabled: bool
    version: int
    group_window_s: int
    repeat_interval_s: int
    fingerprint_keys: list[str]
    created_at: datetime
    updated_at: datetime


class RuleQuery(PageQuery):
    client_id: UUID | None = None


# --- endpoints -----------------------------------------------------------------------------------

# At least one delivery per 1,000 s: a smaller rate would hold a delivery longer than any retry
# schedule, and the token bucket counts whole deliveries per whole seconds (rate_limits.py).
MIN_RATE_LIMIT_PER_S = 0.001
RateLimit = Field(default=None, ge=MIN_RATE_LIMIT_PER_S, le=100_000,
                  description="deliveries per second to this endpoint, shared by all workers, at least 0.001; "
                              "null: the ENDPOINT_RATE_LIMIT_PER_S default")


# endpoints.value's CHECK (migrations/001); web/endpoints.py checks the stored, normalised form too.
MAX_ENDPOINT_VALUE_CHARS = 2000


class EndpointCreate(RequestBody):
    rule_id: UUID
    type: EndpointType
    value: str = Field(min_length=1, max_length=MAX_ENDPOINT_VALUE_CHARS, pattern=NO_NUL)
    enabled: bool = True
    rate_limit_per_s: float | None = RateLimit


class EndpointPatch(PatchBody):
    NULLABLE = frozenset({"rate_limit_per_s"})  # null: back to the default

    type: EndpointType | None = None
    value: str | None = Field(default=None, min_length=1, max_length=MAX_ENDPOINT_VALUE_CHARS, pattern=NO_NUL)
    enabled: bool | None = None
    rate_limit_per_s: float | None = RateLimit


class EndpointOut(BaseModel):
    endpoint_id: UUID
    rule_id: UUID
    client_id: UUID
    type: str
    value: str
    enabled: bool
    rate_limit_per_s: float | None
    created_at: datetime
    updated_at: datetime


class EndpointCreated(EndpointOut):
    # Null for Slack and email: only webhooks are signed, and a secret that signs nothing read as if
    # it did (docs/api.md, "Endpoint secrets").
    secret: str | None = Field(description="the HMAC-SHA256 key of X-Alerting-Signature-Timestamped and "
                                           "X-Alerting-Signature; shown only in this response; null for a "
                                           "slack or email endpoint, which is not signed")

    @classmethod
    def of(cls, row: Any) -> "EndpointCreated":
        data = dict(row)
        if data["type"] != "webhook":
            data["secret"] = None
        return cls.model_validate(data)


class EndpointQuery(PageQuery):
    rule_id: UUID | None = None


# --- notifications -------------------------------------------------------------------------------

class DeliveryOut(BaseModel):
    """One endpoint's delivery of a notification: PENDING until SENT or FAILED."""

    endpoint_id: UUID
    channel: str
    status: str
    attempts: int
    last_error: str | None
    created_at: datetime
    first_attempt_at: datetime | None
    last_attempt_at: datetime | None
    next_attempt_at: datetime | None = Field(description="when a PENDING delivery is tried next")


class SilencedAlert(BaseModel):
    """A group member a silence muted when its group closed."""

    alert_id: str
    silence_id: UUID = Field(description="the silence that muted it (of several in force, the smallest id)")


class NotificationOut(BaseModel):
    notification_id: UUID
    client_id: UUID
    alert_id: str
    alerts: list[dict]
    rule_ids: list[UUID]
    status: str
    detail: str | None
    created_at: datetime
    updated_at: datetime
    truncated_alerts: int = Field(description="alerts of the group beyond those listed in `alerts`")
    group_rule_id: UUID | None = Field(description="the rule whose group window collected the alerts; "
                                                   "null when notified at once")
    silenced_alerts: list[SilencedAlert] | None = Field(
        description="a group's members that a silence muted when it closed and that `alerts` does not list: "
                    "notified to nobody; empty for a notification not of a group, null for a group closed "
                    "before this was recorded")
    truncated_silenced_alerts: int | None = Field(description="silenced members beyond those in `silenced_alerts`")
    deliveries: list[DeliveryOut]


class NotificationQuery(PageQuery):
    client_id: UUID | None = None
    status: NotificationStatus | None = None
    # ISO 8601 with a UTC offset (or unix seconds): without an offset the instant would depend on
    # the server's time zone.
    since: StorableDatetime | None = Field(default=None, description="created at or after")
    until: StorableDatetime | None = Field(default=None, description="created before")
    # As the Alert contract's alert_id (1-200 characters, no NUL): the notifications that concern
    # that alert of the caller's client (web/notifications.py). Alert ids are per client, so the admin
    # must name the client too (checked by the view, which knows the caller).
    alert_id: Annotated[str, Text] | None = Field(default=None, description="of this alert, alone or in a group")

    @field_validator("until")
    @classmethod
    def _after_since(cls, until: datetime | None, info: ValidationInfo) -> datetime | None:
        since = info.data.get("since")
        if until is not None and since is not None and until <= since:
            raise ValueError("must be later than since")
        return until


# --- alerts --------------------------------------------------------------------------------------

class AlertsAccepted(BaseModel):
    alert_ids: list[str]
