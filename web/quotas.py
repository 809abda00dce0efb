"""Per-tenant quotas: how many rules, silences, and endpoints per rule a client may have.

Every worker that evaluates holds every rule and every silence (ended ones too, until retention
deletes them), and checks each alert against them. Without a bound, one tenant's key could fill
every worker's memory and slow every other tenant's alerts. The limits are settings (MAX_RULES_PER_CLIENT, MAX_SILENCES_PER_CLIENT,
MAX_ENDPOINTS_PER_RULE); going past one answers 409 and creates nothing.

Each check runs inside the creating transaction, after `lock_client`. Two creations for one client
then count one after the other, so concurrent requests cannot both pass at the limit. The client's
row is locked first, as deleting a client does (web/clients.py), so the two queue instead of
deadlocking.
"""
from __future__ import annotations

from dataclasses import dataclass
from uuid import UUID

import asyncpg

from alerting_app.app import settings
from web.errors import Conflict, ValidationFailed

# NO KEY UPDATE: other clients' creations, whose foreign keys share-lock the row, are not held up;
# creations for this client, and its deletion (FOR UPDATE), wait for this transaction. A client being
# deleted (web/clients.py) is no client: nothing is created for it.
LOCK_CLIENT = "SELECT 1 FROM clients WHERE client_id = $1 AND deleting_since IS NULL FOR NO KEY UPDATE"


@dataclass(frozen=True)
class Quota:
    count: str  # the statement counting what the limit bounds, for its one argument
    setting: str  # the Settings field holding the limit
    holds: str  # what holds too many of what, for the message
    remedy: str


RULES = Quota("SELECT count(*) FROM rules WHERE client_id = $1", "max_rules_per_client",
              "the client has {count} rules", "delete one first")
# Ended ones count too, as Alertmanager's --silences.max-silences counts expired ones: every worker
# holds a silence until retention deletes it (SILENCE_RETENTION_DAYS after its end), and counting
# only those not ended let a key create and expire silences without bound.
SILENCES = Quota("SELECT count(*) FROM silences WHERE client_id = $1", "max_silences_per_client",
                 "the client has {count} silences (ended ones count until SILENCE_RETENTION_DAYS after their "
                 "end, when retention deletes them)", "wait for that, or ask for a higher limit")
# With SILENCE_RETENTION_DAYS=0 (kept for ever) nothing would ever make room again: only those not
# ended count, and the operator who keeps every silence accepts the memory that takes.
# now() is the transaction's start: a silence ending while this runs still counts, which errs safe.
SILENCES_NOT_ENDED = Quota("SELECT count(*) FROM silences WHERE client_id = $1 AND ends_at > now()",
                           "max_silences_per_client", "the client has {count} silences that have not ended",
                           "expire one first")


def silences_quota() -> Quota:
    return SILENCES if settings.silence_retention_days else SILENCES_NOT_ENDED
ENDPOINTS = Quota("SELECT count(*) FROM endpoints WHERE rule_id = $1", "max_endpoints_per_rule",
                  "the rule has {count} endpoints", "delete one first")


async def lock_client(conn: asyncpg.Connection, client_id: UUID) -> bool:
    """Lock the client's row for this transaction; False if there is no such client."""
    return await conn.fetchval(LOCK_CLIENT, client_id) is not None


async def lock_client_within_quota(conn: asyncpg.Connection, client_id: UUID, quota: Quota) -> None:
    """Lock the client's row, then check `quota` for it: 422 naming client_id if there is no such
    client, 409 at the limit. Held until the transaction ends, the lock also keeps the client from
    being deleted meanwhile, so the insert that follows cannot fail its foreign key."""
    if not await lock_client(conn, client_id):
        raise ValidationFailed.field("client_id", "no such client")
    await check_quota(conn, quota, client_id)


async def check_quota(conn: asyncpg.Connection, quota: Quota, owner_id: UUID) -> None:
    """Raise 409 if `owner_id` (a client, or a rule for ENDPOINTS) already holds its limit."""
    limit = getattr(settings, quota.setting)
    count = await conn.fetchval(quota.count, owner_id)
    if count >= limit:
        raise Conflict(f"{quota.holds.format(count=count)}, the most {quota.setting.upper()} allows "
                       f"({limit}); {quota.remedy}")
