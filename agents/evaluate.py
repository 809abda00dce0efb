"""evaluate: matches every alert of `alerts.new` against every rule (tables/rules.py keeps them
current from `rule.changed`), emitting one `alerts.matched` per matching client.

Each agent is a thin loop that yields what its input produced; its sink sends that. So what an
agent decided is exactly what Faust's test driver records as its results, and sending stays one
small function.
"""
from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass, field

from faust.types import EventT, StreamT

from alerting_app import metrics
from alerting_app.app import alerts_matched, alerts_new, app
from alerting_app.contracts import Alert, AlertMatched, DeadLetter
from alerting_app.dead_letters import UndecodableMessage, dead_letter_for, decode, send_dead_letters
from alerting_app.matching import matched_messages
from alerting_app.sending import max_record_bytes, send_batched
from tables.rules import rule_index, rule_replica
from tables.silences import silence_index, silence_replica

# Alerts are matched in batches so that the sends of a batch are acknowledged together; a batch
# waits at most ALERT_BATCH_WITHIN_S for more alerts when traffic is low.
ALERT_BATCH_SIZE = 500
ALERT_BATCH_WITHIN_S = 0.05


@dataclass(frozen=True)
class Evaluation:
    """What one batch of `alerts.new` messages produced."""

    matched: list[AlertMatched] = field(default_factory=list)
    dead_letters: list[DeadLetter] = field(default_factory=list)


def evaluate_alerts(events: Iterable[EventT]) -> Evaluation:
    """Decode each alert and match it against the rule index; undecodable ones become dead letters."""
    evaluation = Evaluation()
    limit = max_record_bytes()  # read once a batch: Faust's settings cost a microsecond a read
    for event in events:
        metrics.alerts_consumed.inc()
        try:
            alert = decode(Alert, event.message.value)
        except UndecodableMessage as exc:
            evaluation.dead_letters.append(dead_letter_for(event.message, str(exc)))
            continue
        for matched in matched_messages(alert, rule_index, silenced_by=silence_index.silencing):
            too_big = oversized(matched, len(event.message.value), limit)
            if too_big is None:
                evaluation.matched.append(matched)
            else:
                evaluation.dead_letters.append(dead_letter_for(event.message, too_big))
    return evaluation


# A match carries the alert and every matching rule of its client (7 at most: criteria are unique
# per client, never all wildcards): an alert that nearly fills a message on its own makes a match
# the broker refuses, on every redelivery of the batch, which would stop the partition for every
# tenant. Such a match is a dead letter (the alert's other
# clients still get theirs; replaying the letter matches them again, which aggregate ignores).
# The notification aggregate builds from a match is smaller than the match, so it fits too.
# An upper bound of its size: the alert as received (re-encoding adds a few bytes at most: the
# defaults of missing fields) plus its rule ids (a quoted UUID and a comma each) and the other fields.
_RULE_ID_BYTES = 39
_MATCH_FIELDS_BYTES = 1024


def oversized(matched: AlertMatched, alert_bytes: int, limit: int) -> str | None:
    """The dead-letter reason of a match over `limit` bytes (key and value), or None when it fits.

    Encoded only when the cheap upper bound does not fit: alerts of a few hundred bytes never are.
    """
    if alert_bytes + _RULE_ID_BYTES * len(matched.rule_ids) + _MATCH_FIELDS_BYTES <= limit:
        return None
    size = len(matched.encode()) + len(matched.client_id.encode())
    if size <= limit:
        return None
    return (f"alerts.matched: the match for client {matched.client_id} ({len(matched.rule_ids)} matching rules) "
            f"would be {size} bytes, more than the {limit} one message may hold")


async def publish_evaluation(evaluation: Evaluation) -> None:
    pending = await send_batched(
        alerts_matched, ((matched.client_id.encode(), matched.encode()) for matched in evaluation.matched))
    # Acknowledged by the broker before the batch is: a refused letter fails the sink, and the batch
    # stays unacknowledged rather than losing the message.
    await send_dead_letters(evaluation.dead_letters)
    # One wait for the whole batch: its alerts are acknowledged only once every match is on the broker.
    await asyncio.gather(*pending)
    metrics.alerts_matched.inc(len(evaluation.matched))


@app.agent(alerts_new, sink=[publish_evaluation])
async def match_alerts(stream: StreamT) -> AsyncIterator[Evaluation]:
    """Alerts to one alerts.matched per matching client, against every rule and silence this worker holds."""
    # Matching against a partial rule set would silently drop notifications: wait for the replica.
    # Likewise for silences, or alerts a tenant silenced would be delivered after each restart.
    await rule_replica.wait_until_caught_up()
    await silence_replica.wait_until_caught_up()
    # The worker's GC thresholds suit batches of thousands of short-lived objects: alerting_app/gc_tuning.py.
    async for events in stream.take_events(ALERT_BATCH_SIZE, within=ALERT_BATCH_WITHIN_S):
        # The sink runs before the generator resumes: the time covers matching and sending.
        with metrics.stage_seconds.labels(stage="evaluate_batch").time():
            yield evaluate_alerts(events)
