"""Faust's Kafka transport with overrides: the worker consumer's fetch wait comes from our
settings; a message is handed to its stream without Faust's per-message `wait_first` when the
hand-over cannot block; stream records fetched while a rebalance ends are held, not thrown away
(`Consumer._drain_messages` and `_held_during_rebalance`); a refused commit is made again at the
next commit (`Consumer._commit_offsets`); the end offsets the table recovery reads up to are the
true ends, on the Tansu broker too (`Consumer.highwaters`); after an agent crashed the worker commits nothing more and stops
(`Consumer.on_task_error`); a stopping worker waits for the broker as long as alerting_app/stop_budget.py
says, then commits nothing more and fails the sends still pending (`Producer.give_up_on_the_broker`); an agent whose
sends failed that way stops with a warning, not as a crash (`Agent`).
tests/test_broker_transport.py fails when the installed Faust no longer matches what these rely on.

The fetch wait. Why: every stage hop (alerts.new -> evaluate, alerts.matched -> aggregate) waits for a fetch, and
Faust (faust-streaming 0.15.3) creates its worker consumer with `fetch_max_wait_ms=1500` written
literally, not read from any setting (faust/transport/drivers/aiokafka.py,
`AIOKafkaConsumerThread._create_worker_consumer`). Kafka answers a fetch as soon as data arrives,
but the Tansu broker we run in development, tests and benchmarks holds a fetch that found no data
for up to its max wait, so each hop could add up to 1.5 s (docs/performance.md).

The other fetch knobs need no override: `fetch_min_bytes` is aiokafka's default of 1 (answer as
soon as there is anything), and the per-partition fetch size (`consumer_max_fetch_size`) and the
stream buffer (`stream_buffer_maxsize`) are public Faust settings whose defaults suit us.

The drain loop. Faust awaits `wait_first(callback(message), suspend_flow.wait())` for every
message, so that a rebalance can interrupt a put into a full stream queue; that creates four tasks
and cancels three, 33-41 us per message, about a third of a no-op agent's cost. Where the put cannot
wait (no lock held, flow active, the stream queues have room) the callback is awaited directly;
otherwise the original path runs. Measured: 83-93 -> 57-65 us CPU per message for a no-op agent,
6,065-6,424 -> 6,885-7,087 alerts/s for an evaluate worker (docs/performance.md).
"""
from __future__ import annotations

import asyncio
import copy
import logging
import os
import signal
import threading
from functools import cached_property
from typing import Any, AsyncIterator, Awaitable, Iterable, Mapping, cast

import aiokafka
import faust
from aiokafka.errors import KafkaTimeoutError
from faust.transport.consumer import CONSUMER_FETCHING
from faust.transport.drivers import aiokafka as faust_aiokafka
from faust.types import TP, Message
from faust.types.agents import ActorRefT
from mode import Service, ServiceT

from alerting_app import metrics
from alerting_app.end_offsets import EndOffsetsUnknown, end_offsets
from alerting_app.kafka_connection import Broker
from alerting_app.stop_budget import worker_stop

log = logging.getLogger(__name__)


class ConsumerThread(faust_aiokafka.AIOKafkaConsumerThread):
    def _create_worker_consumer(self, transport: "Transport") -> aiokafka.AIOKafkaConsumer:
        consumer = super()._create_worker_consumer(transport)
        # The consumer is not started yet: AIOKafkaConsumer.start() hands this attribute (set from its
        # `fetch_max_wait_ms` argument) to the Fetcher it creates. tests/test_broker_transport.py fails
        # if an upgrade of aiokafka or Faust stops that.
        consumer._fetch_max_wait_ms = transport.fetch_max_wait_ms
        return consumer

    async def on_thread_stop(self) -> None:
        """Faust's stop of the consumer, finished when aiokafka lets a cancellation of its own escape.

        aiokafka's Fetcher.close (0.14.0, aiokafka/consumer/fetcher.py:455-457) cancels each fetch in
        hand and awaits it: a fetch waiting to retry after a failed request (its broker unreachable, or
        just back) ends cancelled, and CancelledError escapes AIOKafkaConsumer.stop before the consumer
        closes its connections. mode's thread then never tells the worker it has stopped (it does so
        after on_thread_stop, and its backstop catches Exception only), so a worker stopped while its
        broker was unreachable waited 60 s (mode's shutdown_timeout), as long as ECS's stopTimeout,
        and was killed (tests/test_consumer_thread_stop.py). What the stop had left undone is done
        here; the fetches it had not cancelled yet are cancelled by mode's thread as it ends.
        """
        try:
            await super().on_thread_stop()
        except asyncio.CancelledError:
            if asyncio.current_task().cancelling():
                raise  # this stop itself was cancelled
            await self._consumer._client.close()


# Tries of `end_offsets` (each waiting up to _END_OFFSETS_TIMEOUT_S for a fetch's answer) before table recovery
# takes ListOffsets's answer alone.
_END_OFFSETS_ATTEMPTS = 3
_END_OFFSETS_TIMEOUT_S = 10.0


# How long a worker stopping itself after an agent crash may take before it exits outright. A stop
# takes seconds (sends in flight end, deliveries are handed back), but one after a crash was seen
# waiting for ever, in the crashed agent's supervisor (which restarted the agent as the worker
# stopped: no longer, see app.py `agent_supervisor`). A backstop against another such wait: a worker
# that neither works nor exits is never replaced, as its probes still answer 200. Below ECS's
# stopTimeout (60 s).
CRASH_STOP_GRACE_S = 45.0


def exit_unless_stopped_within(seconds: float, after: str = "an agent crash") -> None:
    """End the process with status 1 if it is still running `seconds` from now. A daemon thread, so
    an event loop stuck in its stop cannot hold it, and a process that stops in time is not held
    by it either."""
    def exit_now() -> None:
        log.error("the worker did not finish stopping within %gs of %s: exiting now", seconds, after)
        for handler in logging.getLogger().handlers:
            handler.flush()
        os._exit(1)

    timer = threading.Timer(seconds, exit_now)
    timer.daemon = True
    timer.start()


class Consumer(faust_aiokafka.Consumer):
    def _new_consumer_thread(self) -> ConsumerThread:
        return ConsumerThread(self, loop=self.loop, beacon=self.beacon)

    async def highwaters(self, *partitions: TP) -> Mapping[TP, int]:
        """The end offset of each partition, found as `end_offsets` finds it (ListOffsets, raised to
        a fetch's high watermark).

        Faust's table recovery reads each changelog partition up to what this returns, then stops
        reading it (faust/tables/recovery.py, `_build_highwaters`, 0.15.3). Faust asks ListOffsets
        alone, which the Tansu broker answers with the first offset of the partition's last record
        batch + 1: a worker taking over a partition whose last changelog batch held the groups of
        several clients (one aggregate batch writes them together) recovered the first of them only,
        and the others were never closed, their alerts never notified
        (`test_a_new_worker_recovers_every_group_of_a_partition_written_in_one_batch`).
        """
        if not partitions:
            return {}  # a worker assigned no partition of a table (more workers than partitions)
        tps = [aiokafka.TopicPartition(tp.topic, tp.partition) for tp in partitions]
        for attempt in range(1, _END_OFFSETS_ATTEMPTS + 1):
            try:
                ends = await end_offsets(self.transport.broker, tps, timeout_s=_END_OFFSETS_TIMEOUT_S)
                return {TP(tp.topic, tp.partition): end for tp, end in ends.items()}
            except EndOffsetsUnknown as exc:
                # A loaded broker slow to answer a fetch. Faust's recovery stops the worker on any
                # error here: after a few tries, ListOffsets alone (exact on Apache Kafka) instead.
                log.warning("end offsets for table recovery, try %d of %d: %s", attempt, _END_OFFSETS_ATTEMPTS, exc)
        return await self.listed_highwaters(*partitions)

    async def listed_highwaters(self, *partitions: TP) -> Mapping[TP, int]:
        """Faust's own end offsets: ListOffsets on the consumer's connection. Exact on Apache Kafka;
        on the Tansu broker short of the end by the rest of a partition's last record batch."""
        return await super().highwaters(*partitions)

    # Set at the first agent crash (see on_task_error): from then on this worker commits nothing.
    crashed_agent: str | None = None

    async def on_task_error(self, exc: BaseException) -> None:
        """Called by Faust when an agent raised (`App._on_agent_error`), before it restarts the agent.

        The batch the crashed agent held was not processed, yet Faust acknowledges it: `take_events`
        acks its buffered events in a `finally`, which runs as soon as the crashed agent lets go of
        the iterator, and the next commit would pass over messages nobody processed (lost). So from
        the first crash on, this worker commits no offset at all (not even the commit Faust makes
        here), and it stops: restarted (by ECS, compose or whoever runs it), it reads everything past
        the last commit again, which every stage handles (a redelivered message finds its rows).
        Transient Postgres errors never get here: the stages retry them (db.retry_transient).
        """
        self.crashed_agent = f"{type(exc).__name__}: {exc}"
        metrics.agent_crashes.inc()
        log.error("an agent crashed (%s): this worker commits no further offsets and stops, so that the "
                  "batch it held is read again when it is restarted", self.crashed_agent)
        await super().on_task_error(exc)
        self.stop_worker()

    def stop_worker(self) -> None:
        # As `docker stop` would: the worker stops gracefully (deliveries in hand are handed back).
        os.kill(os.getpid(), signal.SIGTERM)
        exit_unless_stopped_within(CRASH_STOP_GRACE_S)

    async def wait_empty(self) -> None:
        """Faust's wait, before a stop or a rebalance commits, until every message in process is
        acknowledged; none after an agent crashed, when nothing is committed any more.

        An agent whose sink raised (a send the broker refused or timed out, a write Postgres
        refused) stays suspended at its `yield`, holding its batch, which is never acknowledged:
        the wait never ended, so the worker never finished stopping, its partitions were processed
        by nobody, and its probes still answered 200 (nothing restarted it).
        """
        if self.crashed_agent is not None or self.gave_up_on_the_broker.is_set():
            return
        # Giving up on the broker ends the wait too: it waits for the sinks' sends and commits
        # (Faust's commit flushes the producer first, and aiokafka's commit waits for the group
        # coordinator for ever while the broker is unreachable: `commit_offsets` loops on
        # `ensure_coordinator_known`).
        await _unless_set(self.gave_up_on_the_broker, super().wait_empty())

    # Set when a stopping worker gave up on its broker (Producer.give_up_on_the_broker): from then on
    # it commits nothing.
    @cached_property
    def gave_up_on_the_broker(self) -> asyncio.Event:
        return asyncio.Event()

    async def _commit(self, offsets: Mapping[TP, int]) -> bool:
        """The commit at the broker, which Faust's `_commit_offsets` makes once it has flushed the
        producer; none once the stopping worker gave up on the broker.

        Giving up fails the sends still pending, which ends that flush: the commit that followed
        would pass over input whose output never reached the broker, should the broker be back by
        then. (A commit already past the flush may go on: what it covers was acknowledged.)
        """
        if self.gave_up_on_the_broker.is_set():
            return False
        return await super()._commit(offsets)

    # Offsets the broker refused to commit, by partition, to be committed at the next commit.
    @cached_property
    def _refused_commits(self) -> dict[TP, int]:
        return {}

    def _filter_committable_offsets(self, tps: Iterable[TP]) -> dict[TP, int]:
        """Faust's offsets to commit, plus those the broker refused last time (see _commit_offsets)."""
        offsets = super()._filter_committable_offsets(tps)
        assigned = self.assignment()
        for tp, offset in list(self._refused_commits.items()):
            if tp not in assigned:
                del self._refused_commits[tp]  # its new owner reads it from what was committed
            elif offset > offsets.get(tp, -1):
                offsets[tp] = offset
        return offsets

    async def _commit_offsets(self, offsets: Mapping[TP, int], start_new_transaction: bool = True) -> bool:
        """Faust's commit, except that offsets the broker refused are committed again next time.

        faust-streaming 0.15.3 records the offsets as committed even when the broker refused the
        commit (typically during a rebalance, e.g. right after a restart while the dead member is
        still in the group), and by then it has also dropped the acknowledgements they covered
        (`_new_offset`): it never commits them again until newer messages arrive, so consumer lag
        looks stuck and a later rebalance reprocesses them. Fixed upstream (PR #692, not released).
        Putting back the old committed offset instead would leave Faust's bookkeeping with a gap
        below its acknowledgements, and no later commit of that partition would happen at all; so
        Faust's records stay as they are, and the refused offsets are added to the next commit
        (`_filter_committable_offsets`). Committing the same offsets twice is harmless.
        """
        if self.crashed_agent is not None:
            return False  # an agent crashed: what Faust acknowledged since may not be done (on_task_error)
        did_commit = await super()._commit_offsets(offsets, start_new_transaction)
        for tp, offset in offsets.items():
            if not did_commit:
                self._refused_commits[tp] = max(offset, self._refused_commits.get(tp, offset))
            elif self._refused_commits.get(tp, offset) <= offset:
                self._refused_commits.pop(tp, None)
        return did_commit

    # Stream records fetched while a rebalance is in progress, by partition and offset.
    #
    # Why: when a rebalance ends, Faust's recovery (faust/tables/recovery.py, `on_recovery_completed`
    # and `_resume_streams`, 0.15.3) resumes the stream partitions, awaits `perform_seek()`, and
    # only then calls `app.flow_control.resume()`, which CLEARS every stream queue (mode's
    # FlowControlEvent.resume). The flow is already active by then (recovery resumed it to read
    # changelogs), so records fetched in between are handed to the streams and then thrown away.
    # For a partition with a committed offset, `perform_seek` often seeks back and they are read
    # again; for a partition without one (a new group, or a partition nothing was committed on
    # yet) nothing seeks back: those records are never processed, and the next commit on that
    # partition silently passes over them; with one, the commit stuck below them. Seen in
    # tests/test_e2e_grouping_crash.py as offsets never committed after a SIGKILL and restart (its
    # strict wait timed out in 8 of 13 runs before this, in none of 4 after).
    # Holding them until `app.rebalancing` is over (`on_rebalance_end`, after the clear) and
    # handing them over then, in offset order, loses none. Changelog records are never held:
    # recovery reads them during the rebalance. Upstream: faust-streaming issue #596 (open).
    @cached_property
    def _held_during_rebalance(self) -> dict[TP, dict[int, Message]]:
        return {}

    async def _release_held(self) -> AsyncIterator[tuple[TP, Message]]:
        """The held records of partitions still assigned, in offset order, past what was committed,
        fetched in the consumer's current generation."""
        records = dict(self._held_during_rebalance)
        self._held_during_rebalance.clear()
        assigned = self.assignment()
        generation = self.app.consumer_generation_id
        for tp, by_offset in records.items():
            if tp not in assigned:
                continue  # revoked meanwhile: its new owner reads it from the committed offset
            committed = self._committed_offset.get(tp)
            for offset in sorted(by_offset):
                # One of an earlier generation (a second rebalance began before the release) would
                # be skipped by its stream after the drain loop counted it as read, and the records
                # fetched again up to it dropped as already read: each rebalance seeks every
                # assigned partition back to its commit, so it is fetched again instead.
                if by_offset[offset].generation_id != generation:
                    continue
                if committed is None or offset >= committed:
                    yield tp, by_offset[offset]

    def _delivery_cannot_wait(self, message: Message) -> bool:
        """True when handing `message` to the streams completes without ever suspending.

        What the callback does (faust-streaming 0.15.3, the Cython `ConductorHandler` it installs):
        takes the Conductor's `_tp_to_callback_lock`, waits while flow control is suspended
        (rebalances) and while the producer buffer holds more than `max_messages`, decodes (our
        topics are raw bytes: synchronous), then `put_nowait`s into each subscribed channel's queue,
        or, if one is full, awaits a blocking put. Each check below is one of those waits.
        """
        app = self.app
        conductor = app.topics
        lock = conductor._tp_to_callback_lock
        # asyncio.Lock.acquire() also waits when unlocked but a released waiter has not run yet.
        if lock.locked() or lock._waiters or app.client_only or not app.flow_control.is_active():
            return False
        buffer = app.producer.buffer
        if buffer.size > buffer.max_messages:
            return False
        # Without Faust's Cython handler the callback is a closure we cannot inspect: safe path.
        channels = getattr(conductor._tp_to_callback.get(message.tp), "channels", None)
        if not channels:
            return False
        return not any(channel.queue.full() for channel in channels)

    # A copy of faust-streaming 0.15.3's `Consumer._drain_messages` (faust/transport/consumer.py)
    # with one change, marked below. Why: for every message Faust awaits
    # `wait_first(callback(message), suspend_flow.wait())`, which creates four tasks, runs
    # asyncio.wait and cancels three, 33-41 us per message, a third of a no-op agent's cost
    # (docs/performance.md, "Faust consumer overhead"). The wait_first exists so that a rebalance
    # (`suspend_flow`) can interrupt a callback blocked on a full stream queue; a callback that
    # cannot block completes in the same step either way, so it is awaited directly.
    # tests/test_broker_transport.py fails when the installed Faust's method differs from 0.15.3's.
    async def _drain_messages(self, fetcher: ServiceT) -> None:  # pragma: no cover
        # This is the background thread started by Fetcher, used to
        # constantly read messages using Consumer.getmany.
        # It takes Fetcher as argument, because we must be able to
        # stop it using `await Fetcher.stop()`.
        callback = self.callback
        getmany = self.getmany
        consumer_should_stop = cast(Service, self)._stopped.is_set
        fetcher_should_stop = cast(Service, fetcher)._stopped.is_set

        get_read_offset = self._read_offset.__getitem__
        set_read_offset = self._read_offset.__setitem__
        flag_consumer_fetching = CONSUMER_FETCHING
        set_flag = self.diag.set_flag
        unset_flag = self.diag.unset_flag
        commit_every = self._commit_every
        acks_enabled_for = self.app.topics.acks_enabled_for

        yield_every = 100
        num_since_yield = 0
        sleep = asyncio.sleep

        # Changed: only the Conductor's callback is one whose waits we know.
        callback_is_conductors = callback is self.app.topics.on_message
        suspend_flow_is_set = self.suspend_flow.is_set
        delivery_cannot_wait = self._delivery_cannot_wait

        # Changed: stream records that arrive while a rebalance is in progress are held, then
        # released in offset order once it is over (see `_held_during_rebalance`).
        held = self._held_during_rebalance
        app = self.app
        changelogs = app.tables._changelogs

        try:
            while not (consumer_should_stop() or fetcher_should_stop()):
                set_flag(flag_consumer_fetching)
                if held and not app.rebalancing:
                    ait = self._release_held()
                else:
                    ait = cast(AsyncIterator, getmany(timeout=1.0))

                # Sleeping because sometimes getmany is called in a loop
                # never releasing to the event loop
                await self.sleep(0)
                if not self.should_stop:
                    async for tp, message in ait:
                        num_since_yield += 1
                        if num_since_yield > yield_every:
                            await sleep(0)
                            num_since_yield = 0

                        offset = message.offset
                        # Changed: held (see above); a partition with held records keeps holding
                        # until they are released, so its records stay in order.
                        if (app.rebalancing or tp in held) and tp.topic not in changelogs:
                            held.setdefault(tp, {})[offset] = message
                            continue
                        r_offset = get_read_offset(tp)
                        if r_offset is None or offset >= r_offset:
                            gap = offset - (r_offset or 0)
                            # We have a gap in income messages
                            if gap > 1 and r_offset:
                                acks_enabled = acks_enabled_for(message.topic)
                                if acks_enabled:
                                    await self._add_gap(tp, r_offset + 1, offset)
                            if commit_every is not None:
                                if self._n_acked >= commit_every:
                                    self._n_acked = 0
                                    await self.commit()
                            # Changed: awaited directly when it cannot block (see above).
                            if (callback_is_conductors and not suspend_flow_is_set()
                                    and delivery_cannot_wait(message)):
                                await callback(message)
                            else:
                                await self.wait_first(
                                    callback(message), self.suspend_flow.wait()
                                )
                            set_read_offset(tp, offset)
                        else:
                            self.log.dev(
                                "DROPPED MESSAGE ROFF %r: k=%r v=%r",
                                offset,
                                message.key,
                                message.value,
                            )
                    unset_flag(flag_consumer_fetching)

        except self.consumer_stopped_errors:
            if self.transport.app.should_stop:
                # we're already stopping so ignore
                self.log.info("Broker stopped consumer, shutting down...")
                return
            raise
        except asyncio.CancelledError:
            if self.transport.app.should_stop:
                # we're already stopping so ignore
                self.log.info("Consumer shutting down for user cancel.")
                return
            raise
        except Exception as exc:
            self.log.exception("Drain messages raised: %r", exc)
            raise
        finally:
            unset_flag(flag_consumer_fetching)


async def _unless_set(event: asyncio.Event, awaitable: Awaitable[Any]) -> Any:
    """The result of `awaitable`, or None if `event` is set first (`awaitable` is then cancelled)."""
    work = asyncio.ensure_future(awaitable)
    interrupted = asyncio.ensure_future(event.wait())
    try:
        await asyncio.wait({work, interrupted}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        interrupted.cancel()
        interrupted_first = not work.done()
        if interrupted_first:
            work.cancel()
    return None if interrupted_first else work.result()


class GaveUpOnTheBroker(KafkaTimeoutError):
    """The failure of every send once the stopping worker gave up on the broker
    (`Producer.give_up_on_the_broker`): not acknowledged, nor refused. A request of one may be at a
    broker that writes it later (agents/rule_outbox.py, `_unanswered`). Copies of it keep its type
    (aiokafka raises copies)."""


def failed_by_giving_up(exc: BaseException) -> bool:
    """Whether `exc` is the failure of a send the stopping worker gave up on, or was raised from one
    (`raise ... from`, as tables/groups.py `ChangelogWriteFailed` is)."""
    cause: BaseException | None = exc
    while cause is not None:
        if isinstance(cause, GaveUpOnTheBroker):
            return True
        cause = cause.__cause__
    return False


class Agent(faust.Agent):
    """Faust's agent, except that an actor whose sends failed because the stopping worker gave up on
    the broker ends with one warning: it is no crash.

    Faust handles any other exception of an actor as a crash: `on_error` (Consumer.on_task_error:
    logged as an error, counted in alerting_agent_crashes_total, the worker stopped), then the
    actor's own crash, logged with its traceback, and its supervisor's, logged as critical. Giving up
    fails the sends of every agent busy with a batch, in a worker already stopping, and on purpose;
    operators alert on that metric. What the agent held is not lost either way: nothing is committed
    after giving up (Consumer._commit), so the next worker reads it again.
    """

    async def _execute_actor(self, coro: Awaitable, aref: ActorRefT) -> None:
        await super()._execute_actor(self._ending_quietly_if_given_up(coro), aref)

    async def _ending_quietly_if_given_up(self, coro: Awaitable) -> None:
        try:
            await coro
        except Exception as exc:
            if not failed_by_giving_up(exc):
                raise
            log.warning("agent %s stopped: its sends failed when this worker gave up on the broker while "
                        "stopping (%s); what it held is read again by the next worker", self.name, exc)


class Producer(faust_aiokafka.Producer):
    # The failure every send gets once the stopping worker gave up on the broker.
    gave_up: GaveUpOnTheBroker | None = None

    @Service.task
    async def _give_up_on_the_broker_late_in_a_stop(self) -> None:
        await self.app.wait_for_stopped()
        # Cancelled (with this producer's other tasks) when the producer stops: it is the last
        # service of the app to stop, so this runs only while the stop is still waiting. The time
        # the stop waits for sends in flight is not the broker's (alerting_app/stop_budget.py).
        worker_stop.begin()
        while (wait_s := worker_stop.broker_wait_left_s()) > 0:
            worker_stop.changed.clear()
            try:
                async with asyncio.timeout(wait_s):
                    await worker_stop.changed.wait()
            except TimeoutError:
                pass
        self.give_up_on_the_broker()

    def give_up_on_the_broker(self) -> None:
        """Stop waiting for the broker: the worker commits no offset any more, and every send still
        waiting for the broker's acknowledgement, and every later one, fails.

        Nothing is lost. The consumer stops committing first, so no commit follows the failed sends
        (Consumer._commit). Each stage acknowledges its input only once the broker has acknowledged
        what it sent for it (a sink waits for its sends), and a failed send fails the sink: its
        input stays uncommitted and is read again by the next worker (aggregate waits for its table's
        changelog writes too: `groups.wait_until_written`). The outbox relay keeps its rows when a
        send fails, and whichever worker relays next sends them. A send already on the wire may
        still reach the broker if it comes back before this worker has exited: it is then sent
        twice, which every consumer of our topics handles; and since it may land after the next
        relay's newer versions of its keys, the relay leaves its batch recorded in flight, for
        those keys to be queued again (agents/rule_outbox.py, `_unanswered`).
        """
        if self.gave_up is not None:
            return
        elapsed_s = worker_stop.elapsed_s()
        log.warning("still stopping %.0fs after the stop began: giving up on the broker; this worker commits "
                    "nothing more, and fails the sends the broker has not acknowledged (what they were sent "
                    "for is read again by the next worker)", elapsed_s)
        cast(Consumer, self.app.consumer).gave_up_on_the_broker.set()
        self.gave_up = GaveUpOnTheBroker(f"not acknowledged by the broker within {elapsed_s:.0f}s "
                                         "of the worker's stop")
        if self._producer is not None:
            fail_pending_sends(self._producer, self.gave_up)
        # A backstop: what is left of the stop's budget (STOP_BUDGET_S). With a broker that accepts
        # connections but never answers, aiokafka's stop of the producer waits for a metadata
        # request in flight, up to the producer's request timeout, and this ends it (status 1,
        # nothing committed after giving up).
        exit_unless_stopped_within(round(max(worker_stop.left_s(), 0.0), 1), after="giving up on the broker")

    async def send(self, *args: Any, **kwargs: Any) -> Awaitable[Any]:
        """Faust's send (topics, table changelogs); once the worker gave up on the broker, a send
        that has already failed. Raising instead would crash Faust's producer buffer, which sends
        table changelog records: a crashed service crashes the whole worker."""
        if self.gave_up is not None:
            failed = asyncio.get_running_loop().create_future()
            failed.set_exception(copy.copy(self.gave_up))
            return failed
        return await super().send(*args, **kwargs)


class _TolerantBatchSet(set):
    """aiokafka's set of the batches in flight, from which a batch failed by `fail_pending_sends`
    may be removed twice."""

    def remove(self, batch: Any) -> None:
        self.discard(batch)


def fail_pending_sends(producer: aiokafka.AIOKafkaProducer, failure: Exception) -> None:
    """Fail every batch `producer` has not had acknowledged, waking whoever waits for one (the sinks,
    the outbox relay, Faust's flush before a commit, the producer's own stop), and every later send.

    aiokafka 0.14.0 (producer/message_accumulator.py, sender.py) fails batches only from its sender
    task, and `fail_all` (its own way to fail everything, when that task dies) assumes as much. A
    batch whose request failed waits out a back-off and is then queued again (`reenqueue`), which
    takes it out of the set of batches in flight; but its future, failed here meanwhile, has already
    done that (`_pop_batch`'s callback), and the second removal raised KeyError, which ended the sender
    task. So the set tolerates a second removal, and a failed batch is not queued again: no batch
    this worker gave up on is sent again (one already on the wire may still land).
    tests/test_broker_transport.py fails when aiokafka changes these.
    """
    accumulator = producer._message_accumulator
    requeue = accumulator.reenqueue

    def requeue_unless_failed(batch: Any) -> None:
        if not batch.future.done():
            requeue(batch)

    accumulator.reenqueue = requeue_unless_failed
    accumulator._pending_batches = _TolerantBatchSet(accumulator._pending_batches)
    accumulator.fail_all(failure)  # every later send raises it too
    accumulator._batches.clear()  # failed: never to be sent


class Transport(faust_aiokafka.Transport):
    """Faust's aiokafka Transport whose worker consumer waits at most `fetch_max_wait_ms` per fetch,
    and finds end offsets on `broker` (`Consumer.highwaters`); whose producer stops waiting for the
    broker late in a stop (`Producer.give_up_on_the_broker`)."""

    Consumer = Consumer
    Producer = Producer

    def __init__(self, *args, fetch_max_wait_ms: int, broker: Broker, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.fetch_max_wait_ms = fetch_max_wait_ms
        self.broker = broker
