"""Request and response bodies of the API v1, and the query parameters of its lists.

Request bodies refuse unknown fields, so a misspelt field is a 422 rather than silently ignored.
Rule criteria reuse the message contract's types, so the API accepts exactly what `rule.changed`
can carry.
"""
from __future__ import annotations

from datetime import datetime
from typing import Literal
from uuid import UUID

from pydantic import BaseModel, ConfigDict, Field

from alerting_app.contracts import WILDCARD, Severity
from web.pagination import PageQuery

Name = Field(min_length=1, max_length=200)
# Criteria fields as in contracts.RuleCriteria: an exact value or "*", 1..200 characters. One
# Literal rather than `Severity | Literal["*"]`, so that an error names just the field.
SeverityCriterion = Literal[tuple(s.value for s in Severity) + (WILDCARD,)]  # type: ignore[valid-type]
TextCriterion = Field(min_length=1, max_length=200)

EndpointType = Literal["webhook", "slack", "email"]
NotificationStatus = Literal["PENDING", "SENT", "FAILED", "SUPPRESSED", "SILENCED"]


class RequestBody(BaseModel):
    model_config = ConfigDict(extra="forbid")


# --- clients -------------------------------------------------------------------------------------

class ClientCreate(RequestBody):
    name: str = Name


class ClientPatch(RequestBody):
    name: str = Name


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


class RuleReplace(RequestBody):
    """PUT: the whole rule, with the version the caller last read."""

    version: int = Field(ge=1)
    severity: SeverityCriterion
    source: str = TextCriterion
    name: str = TextCriterion
    enabled: bool


class RulePatch(RequestBody):
    """PATCH: only the given fields change; `version` is the one the caller last read."""

    version: int = Field(ge=1)
    severity: SeverityCriterion | None = None
    source: str | None = Field(default=None, min_length=1, max_length=200)
    name: str | None = Field(default=None, min_length=1, max_length=200)
    enabled: bool | None = None


class RuleOut(BaseModel):
    rule_id: UUID
    client_id: UUID
    severity: str
    source: str
    name: str
    enabled: bool
    version: int
    created_at: datetime
    updated_at: datetime


class RuleQuery(PageQuery):
    client_id: UUID | None = None


# --- endpoints -----------------------------------------------------------------------------------

RateLimit = Field(default=None, gt=0, le=100_000,
                  description="deliveries per second to this endpoint, shared by all workers; "
                              "null: the ENDPOINT_RATE_LIMIT_PER_S default")


class EndpointCreate(RequestBody):
    rule_id: UUID
    type: EndpointType
    value: str = Field(min_length=1, max_length=2000)
    enabled: bool = True
    rate_limit_per_s: float | None = RateLimit


class EndpointPatch(RequestBody):
    type: EndpointType | None = None
    value: str | None = Field(default=None, min_length=1, max_length=2000)
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
    secret: str = Field(description="the HMAC-SHA256 key of X-Alerting-Signature; shown only in this response")


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
    deliveries: list[DeliveryOut]


class NotificationQuery(PageQuery):
    client_id: UUID | None = None
    status: NotificationStatus | None = None


# --- alerts --------------------------------------------------------------------------------------

class AlertsAccepted(BaseModel):
    alert_ids: list[str]
