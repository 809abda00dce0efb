"""Messages about a client (tenant) deleted while they were in flight: dropped, not dead-lettered.

DELETE /api/v1/clients/{id} deletes the client's rules and endpoints at once and marks the client
being deleted (its notifications follow, then its row: agents/retention.py), but every worker's
rule replica matches its rules until their deletions arrive (a few hundred ms), and its matches and
notifications already on alerts.matched and notifications.ready still come. They name a client
that is gone: there is nothing to record or deliver, and nothing wrong with the message, so a dead
letter (counted in alerting_dead_letters_total, which operators alert on) would be a false alarm.
Each deleted rule is remembered with its client (deleted_rules, for republishing): a message naming
a rule deleted with its client, which is gone or being deleted, is about a deleted client; one
naming a client that never existed (hand-written, corrupted) is still a dead letter.
"""
from __future__ import annotations

import logging
from collections.abc import Iterable

import asyncpg

from alerting_app import metrics

log = logging.getLogger(__name__)

_DELETED = """
SELECT DISTINCT m.client_id::text
FROM unnest($1::uuid[], $2::uuid[]) AS m(client_id, rule_id)
JOIN deleted_rules d ON d.rule_id = m.rule_id AND d.client_id = m.client_id
WHERE NOT EXISTS (SELECT 1 FROM clients c WHERE c.client_id = m.client_id AND c.deleting_since IS NULL)
"""


async def deleted_clients(conn: asyncpg.Connection | asyncpg.Pool,
                          messages: Iterable[tuple[str, list[str]]]) -> set[str]:
    """Of the clients of these messages (client_id, the rule_ids it names), those deleted."""
    client_ids, rule_ids = [], []
    for client_id, rules in messages:
        for rule_id in rules:
            client_ids.append(client_id)
            rule_ids.append(rule_id)
    if not client_ids:
        return set()
    return {row[0] for row in await conn.fetch(_DELETED, client_ids, rule_ids)}


def dropped(topic: str, client_ids: list[str]) -> None:
    """Count (and log) the messages of `topic` dropped because their client was deleted."""
    if client_ids:
        metrics.messages_of_deleted_clients.labels(topic=topic).inc(len(client_ids))
        log.info("dropped %d %s messages of clients deleted while they were in flight (first: %s)",
                 len(client_ids), topic, client_ids[0])
