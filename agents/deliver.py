"""deliver: every notification on `notifications.ready` to every enabled endpoint of its rules.

A batch of messages becomes PENDING delivery rows in Postgres, leased to this worker and handed
to its dispatcher, which sends them in the background; only then is the batch acknowledged. So
the offset commits once the deliveries are durable, not once they are sent: a slow endpoint
never holds up the partition, and a crash loses nothing, because any worker resumes PENDING rows
whose lease expired (`sweep`). A redelivered message finds its rows and sends nothing twice.
docs/delivery.md describes the whole path.
"""
from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass, field

import asyncpg
from faust.types import EventT, StreamT
from mode import Service

from alerting_app import db
from alerting_app.app import app, notifications_ready, settings
from alerting_app.contracts import DeadLetter, NotificationReady
from alerting_app.dead_letters import UndecodableMessage, dead_letter_for, decode, require_uuids, send_dead_letters
from alerting_app.deleted_clients import deleted_clients, dropped
from alerting_app.delivery import records
from alerting_app.delivery.dispatcher import Dispatcher, close_dispatcher, dispatcher
from alerting_app.delivery.jobs import DeliveryJob
from alerting_app.failure_streak import FailureStreak

log = logging.getLogger(__name__)

NOTIFICATION_BATCH_SIZE = 200
NOTIFICATION_BATCH_WITHIN_S = 0.02
SWEEP_BATCH_SIZE = 1_000


@dataclass(frozen=True)
class Intake:
    """What one batch of `notifications.ready` messages produced."""

    started: list[DeliveryJob] = field(default_factory=list)  # deliveries this worker now sends
    dead_letters: list[DeadLetter] = field(default_factory=list)


def decode_notification(raw: bytes | None) -> NotificationReady:
    """Decode a `notifications.ready` message whose ids fit the tables (UUIDs)."""
    notification = decode(NotificationReady, raw)
    # The contract makes up a fresh id for a producer that builds a notification; one that arrives
    # without its id is undecodable, not a notification "no such notification <that made-up id>".
    if "notification_id" not in notification.model_fields_set:
        raise UndecodableMessage("notification_id: Field required")
    require_uuids(notification_id=[notification.notification_id], client_id=[notification.client_id],
                  rule_ids=notification.rule_ids)
    return notification


async def start_deliveries(pool: asyncpg.Pool, delivery: Dispatcher,
                           notifications: list[NotificationReady]) -> list[DeliveryJob]:
    """Open the deliveries of `notifications` and start those this worker has room for."""
    owner = delivery.owner if delivery.room else None
    leased_at = time.monotonic()  # before the statement: the lease runs at least DELIVERY_LEASE_S from here
    jobs = await records.open_deliveries(pool, notifications, owner, settings.delivery_lease_s,
                                         delivery.full_endpoints(), delivery.full_clients(),
                                         delivery.email_to_the_sweep())
    refused = {job.key for job in delivery.submit(jobs, leased_at)}
    await records.release(pool, delivery.owner, list(refused))
    started = [job for job in jobs if job.key not in refused]
    # Settles what has nothing (left) to deliver: no enabled endpoint, or all done before. A
    # notification with a delivery just started has one PENDING: settling it would change nothing.
    in_hand = {job.notification.notification_id for job in started}
    await records.settle_notifications(pool, [n.notification_id for n in notifications
                                              if n.notification_id not in in_hand])
    return started


async def take_in(pool: asyncpg.Pool, delivery: Dispatcher, events: Iterable[EventT]) -> Intake:
    # By (notification_id, client_id): a message naming a notification with another client (a dead
    # letter below) must not take the place of the notification's own message in the same batch.
    decoded: dict[tuple[str, str], tuple[NotificationReady, EventT]] = {}
    letters = []
    for event in events:
        try:
            notification = decode_notification(event.message.value)
        except UndecodableMessage as exc:
            letters.append(dead_letter_for(event.message, str(exc)))
            continue
        decoded.setdefault((notification.notification_id, notification.client_id), (notification, event))
    known = await records.known_notifications(pool, [n for n, _ in decoded.values()])
    unknown = [(notification, event) for ids, (notification, event) in decoded.items() if ids not in known]
    of_deleted_clients: list[str] = []
    if unknown:
        # Deleted with its client while it was in flight: dropped (alerting_app/deleted_clients.py).
        deleted = await deleted_clients(pool, [(n.client_id, n.rule_ids) for n, _ in unknown])
        of_deleted_clients = [n.client_id for n, _ in unknown if n.client_id in deleted]
        letters.extend(dead_letter_for(event.message, f"notification_id: no such notification {n.notification_id}")
                       for n, event in unknown if n.client_id not in deleted)
    # A settled one (SENT, FAILED, ...) has nothing left to deliver: the message is a redelivery or
    # a replay, and is acknowledged without a send.
    notifications = [n for ids, (n, _) in decoded.items() if known.get(ids) == "PENDING"]
    try:
        started = await start_deliveries(pool, delivery, notifications) if notifications else []
    except asyncpg.ForeignKeyViolationError:
        # A notification deleted with its client after it was found here, while its deliveries were
        # being opened: that statement inserted nothing. Taken in again, the batch finds it gone.
        log.info("a notification was deleted while its deliveries were opened; taking the batch in again")
        return await take_in(pool, delivery, events)
    # Counted once taken in: a batch taken in again counts them then.
    dropped("notifications.ready", of_deleted_clients)
    return Intake(started, letters)


async def publish_intake(intake: Intake) -> None:
    # All at once, each acknowledged by the broker before the batch is.
    await send_dead_letters(intake.dead_letters)


@app.agent(notifications_ready, sink=[publish_intake])
async def deliver_notifications(stream: StreamT) -> AsyncIterator[Intake]:
    """Notifications to one delivery per endpoint, kept in Postgres and sent by this worker's dispatcher."""
    # take_events acknowledges a batch after the sink has run, once its rows are in Postgres.
    async for events in stream.take_events(NOTIFICATION_BATCH_SIZE, within=NOTIFICATION_BATCH_WITHIN_S):
        yield await db.retry_transient(lambda pool: take_in(pool, dispatcher(), events), "taking in notifications")


async def sweep(pool: asyncpg.Pool, delivery: Dispatcher) -> list[DeliveryJob]:
    """Lease the due deliveries nobody holds (retries deferred, a dead worker's, those that did not
    fit when opened) as far as this worker has room, and start them."""
    if not delivery.room:
        return []
    # Of each endpoint and each client no more than it has room for here, and of email (every
    # tenant's, round-robin per tenant) no more than the room left for it: what would be refused is
    # not leased.
    leased_at = time.monotonic()
    limit, email_room = min(delivery.room, SWEEP_BATCH_SIZE), delivery.email_room()
    jobs = await records.lease_due(pool, delivery.owner, settings.delivery_lease_s, delivery.held_per_endpoint(),
                                   settings.delivery_endpoint_backlog, limit, delivery.held_per_client(),
                                   settings.delivery_client_backlog, email_room)
    delivery.swept_email(min(email_room, limit), sum(job.endpoint is not None and job.endpoint.channel == "email"
                                                     for job in jobs))
    refused = {job.key for job in delivery.submit(jobs, leased_at)}
    await records.release(pool, delivery.owner, list(refused))
    return [job for job in jobs if job.key not in refused]


@app.service
class DeliverySweep(Service):
    """Sweeps every DELIVERY_SWEEP_INTERVAL_S and keeps this worker's leases alive; on stop, hands
    what it holds back to the other workers."""

    @Service.task
    async def _sweep_and_renew(self) -> None:
        renewed_at = time.monotonic()
        failures = FailureStreak(log, "delivery sweep")
        while not self.should_stop:
            try:
                pool, delivery = await db.pool(), dispatcher()
                if time.monotonic() - renewed_at >= settings.delivery_lease_s / 3:
                    asked_at = time.monotonic()
                    renewed = await records.renew_leases(pool, delivery.owner, settings.delivery_lease_s,
                                                         delivery.held_keys())
                    delivery.renewed(renewed, asked_at)
                    renewed_at = time.monotonic()
                await sweep(pool, delivery)
                failures.succeeded()
            except asyncio.CancelledError:
                raise
            except Exception:
                failures.failed("delivery sweep failed; trying again")
            await self.sleep(settings.delivery_sweep_interval_s)

    async def on_stop(self) -> None:
        # Leave the consumer group before waiting out the sends in flight, so that the other workers
        # take this worker's partitions now, not once its slowest send has ended (up to 30 s: every
        # new notification on them waited that long). By now Faust has stopped fetching, waited for
        # the batches in process and committed them (App._stop_consumer); stopping the consumer
        # commits what is left and leaves (it would, later in the app's stop). Nothing here needs the
        # partitions: what keeps a delivery sent once is its row's lease in Postgres and its claim
        # in Redis, as in any rebalance while sends are in flight (docs/delivery.md); a message read
        # again by the partition's next owner finds its rows leased by this worker, or settled.
        await app.consumer.stop()
        await close_dispatcher()
