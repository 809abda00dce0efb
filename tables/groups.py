"""Open notification groups: a changelog-backed table of windows, one key per client.

A group opens at the first alert a grouping rule collects for a client and closes `window_s`
later (Alertmanager's group_wait), whatever else arrives; then it becomes ONE notification listing
up to GROUP_MAX_ALERTS of its alerts and counting the rest as truncated. docs/grouping.md says
why this is not a Faust windowed table, and why a group is emitted exactly once.

The key is the client_id as raw bytes, so the changelog partition is the client's `alerts.matched`
partition (both murmur2 of the same bytes) and recovers on the worker that processes the client.
The value (JSON) maps each open group's rule_id to the group:
`{"notification_id", "opened_at", "window_s", "alerts": [alert, ...], "rule_ids": [...]}`.
`alerts` holds at most GROUP_MAX_ALERTS, within byte budgets (MAX_VALUE_BYTES), so a changelog
message stays under the broker's limit (a first alert too large for them is listed without its
context, keeping its digests for the silences: `without_context`); the members themselves (all
of them) are rows of `notification_alerts` in Postgres, those not listed with their alert
(`unlisted_alert`), which the closer checks against the silences in force.

A closed group may stay in its client's value until the agent next writes that key, or until all
the client's groups are closed and the closer deletes the key: Faust's RocksDB store files a
write under the current stream event's partition, and a timer has no event. The one write the
closer makes is removing a group Postgres refuses (write_value_of_partition names the partition).
"""
from __future__ import annotations

import asyncio
import copy
import json
import logging
import uuid
import weakref
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal, NotRequired

import faust
from faust.streams import _current_event  # no public setter; see write_value
from faust.types import EventT
from faust.types.tuples import FutureMessage
from pydantic import Field, StrictInt, StrictStr, TypeAdapter, ValidationError
from typing_extensions import TypedDict  # pydantic needs this one before Python 3.12

from alerting_app.app import alerts_matched, app, settings
from alerting_app.contracts import AlertMatched, DeadLetter, Severity, context_digests
from alerting_app.dead_letters import CANONICAL_UUID, describe_validation_error
from alerting_app.json_logs import one_line_for_log
from alerting_app.sending import partition_for

log = logging.getLogger(__name__)


class ChangelogWriteFailed(Exception):
    """The broker refused (or the producer could not send) a write of the group table's changelog."""


class ChangelogCheckedTable(faust.Table):
    """A table that keeps the futures of its changelog writes until `wait_until_written` checks them.

    Faust's `on_key_set`/`on_key_del` drop the future `send_changelog` returns, and the producer's
    flush returns whether or not a write failed: without these, a refused write would go unnoticed.
    """

    def __post_init__(self) -> None:
        super().__post_init__()
        self.unchecked_writes: list[FutureMessage] = []

    def send_changelog(self, *args: Any, **kwargs: Any) -> FutureMessage:
        sent = super().send_changelog(*args, **kwargs)
        self.unchecked_writes.append(sent)
        return sent


open_groups: ChangelogCheckedTable = app.tables.add(ChangelogCheckedTable(
    app,
    name="notification-groups",
    help="Each client's open notification groups (docs/grouping.md), keyed by client_id.",
    beacon=app.tables.beacon,
    key_type=bytes,  # raw bytes; values are JSON (Faust's default)
    partitions=settings.topic_partitions,
    # Writes find their changelog partition from the key, not from the current event: the closer
    # deletes keys from a timer, outside any stream event.
    use_partitioner=True,
))

Group = dict  # one open group, as stored (see the module docstring)
ClientGroups = dict  # rule_id -> Group


# A value the table recovers from its changelog is JSON that nothing checked: written by an older
# release, or by hand. A value of another shape (a list, a group without its fields) made the closer
# fail every round, closing no group of any client of the worker's partitions, and the agent fail
# every batch of that client. Such a value, or group, is taken out and sent to the dead-letter topic.
@dataclass(frozen=True)
class Malformed:
    """What of a client's value is not groups as this module writes them: a group (`rule_id` set), or
    the whole value (`rule_id` None); `content` is what the table held."""

    key: bytes
    rule_id: str | None
    content: object
    reason: str


class _ListedAlert(TypedDict):
    # What a closed group's notification is rebuilt from (Alert.from_stored): without a severity it
    # raised KeyError, no refusal, and the closer failed every round on it. Other keys are not checked.
    alert_id: StrictStr
    severity: Literal[tuple(severity.value for severity in Severity)]  # type: ignore[valid-type]


class _StoredGroup(TypedDict):
    """A group as `open_group` and `add_member` build it; what the closer and the agent rely on."""

    notification_id: Annotated[StrictStr, Field(pattern=f"^{CANONICAL_UUID.pattern}$")]
    opened_at: Annotated[float, Field(strict=True, allow_inf_nan=False)]
    window_s: StrictInt
    # At least one: GROUP_MAX_ALERTS is 1 or more and a group's first alert is always listed
    # (add_member), so an empty listing is from a value this release did not write. Closing it would
    # notify nothing (a notification lists at least one alert): it sat in the table for good, never
    # due (due_groups), its client's key never deleted.
    alerts: Annotated[list[_ListedAlert], Field(min_length=1)]
    rule_ids: list[StrictStr]
    listed_bytes: NotRequired[StrictInt]


_STORED_GROUP = TypeAdapter(_StoredGroup)


def _group_problem(group: object) -> str | None:
    """Why `group` is not a group as this module writes it, or None."""
    if not isinstance(group, dict):
        return "not an object"
    try:
        _STORED_GROUP.validate_python(group)
    except ValidationError as exc:
        return describe_validation_error(exc)
    return None


def sorted_out(key: bytes, value: object) -> tuple[ClientGroups, list[Malformed]]:
    """(the well-formed groups of a value read from the table, what of it is malformed)."""
    if value is None:
        return {}, []
    if not isinstance(value, dict):
        return {}, [Malformed(key, None, value, "not an object of groups by rule_id")]
    if all(_group_problem(group) is None for group in value.values()):
        return value, []
    good: ClientGroups = {}
    bad = []
    for rule_id, group in value.items():
        problem = _group_problem(group)
        if problem is None:
            good[rule_id] = group
        else:
            bad.append(Malformed(key, rule_id, group, problem))
    return good, bad


def malformed_letter(malformed: Malformed) -> DeadLetter:
    """The dead letter of what the table held in a shape this module does not write (see Malformed)."""
    client = malformed.key.decode("utf-8", "replace")
    what = f"group of rule {malformed.rule_id}" if malformed.rule_id is not None else "value"
    if isinstance(malformed.content, dict) and isinstance(malformed.content.get("notification_id"), str):
        what += f" (notification {malformed.content['notification_id']})"
    log.error("dropping the %s of client %s from the groups table: %s", what, one_line_for_log(client),
              one_line_for_log(malformed.reason))  # both may quote what the table held
    return DeadLetter(
        topic=alerts_matched.get_topic_name(),
        partition=partition_for(malformed.key, tuple(range(settings.topic_partitions))),
        key=client,
        reason=f"the groups table held a {what} of client {client} that is not a group: {malformed.reason}",
        payload=json.dumps(malformed.content, separators=(",", ":")),
    )


def open_group(notification_id: str, window_s: int, now: float) -> Group:
    return {"notification_id": notification_id, "opened_at": now, "window_s": window_s, "alerts": [],
            "rule_ids": []}


def deadline(group: Group) -> float:
    return group["opened_at"] + group["window_s"]


# A changelog message holds a client's whole value (all its open groups) and must stay under the
# broker's message size limit (the producer's max_request_size, 1,000,000 bytes by default), or every
# write of that client would fail and crash the worker on each redelivery. Sizes are of the value as
# the table encodes it (Faust's JSON codec escapes every non-ASCII character, so an emoji costs 12
# bytes). An alert is listed in full only while its group's listing stays within MAX_LISTED_BYTES
# (so one group does not take the client's whole budget) and the client's value within
# MAX_VALUE_BYTES; the rest are counted as truncated. The first alert of a group is always listed
# (a notification lists at least one), without its context if it does not fit (keeping its digests,
# `without_context`): what is left of an alert is bounded by the contract (16 KB at most), and the
# margin between MAX_VALUE_BYTES and the limit holds those of many groups.
MAX_LISTED_BYTES = 64 * 1024
MAX_VALUE_BYTES = 512 * 1024


def encoded_size(value: object) -> int:
    """Bytes of `value` as the table stores it and writes it to its changelog."""
    return len(app.serializers.dumps_value(None, value, serializer=open_groups.value_serializer))


def listing_size(alert: dict) -> int:
    """Bytes an alert takes in a listing: encoded, and the comma that separates it from the previous one."""
    return encoded_size(alert) + 1


# Where an alert kept without its context keeps, for the silences checked at close, the digests of
# its context (contracts.context_digests): a silence matching on a context value it lost would
# otherwise not mute it. Never listed in a notification (`as_listed`).
CONTEXT_DIGESTS = "context_sha256"


def without_context(alert: dict) -> dict:
    """An alert too large for a listing, as it is listed when it must be (the first of one) and as an
    unlisted member keeps it: without its context, which it keeps as digests, so that the closer's
    silence check decides on it as on the whole alert. What the contract leaves of it is 7.3 KB at
    most as the table encodes it (ids and names of 200 emoji), the digests 8.6 KB (64 entries)."""
    if not alert.get("context"):  # nothing to lose (or lost already, its digests kept)
        return {**alert, "context": {}}
    return {**alert, "context": {}, CONTEXT_DIGESTS: context_digests(alert["context"])}


def as_listed(alert: dict) -> dict:
    """The alert as its notification lists it: the digests of a context it lost are for the closer's
    silence check only."""
    if CONTEXT_DIGESTS not in alert:
        return alert
    return {key: value for key, value in alert.items() if key != CONTEXT_DIGESTS}


def add_member(group: Group, matched: AlertMatched, max_alerts: int, value_room: int) -> tuple[int, bool]:
    """List the alert (while there is room) and its rules; adding it again changes nothing.

    `value_room` is how many bytes the client's value may still grow by; returns how many it grew,
    and whether the alert is listed (now or before).
    """
    added = 0
    listed = {alert["alert_id"] for alert in group["alerts"]}
    if matched.alert.alert_id in listed:
        is_listed = True
    elif len(group["alerts"]) < max_alerts:
        alert = matched.alert.model_dump(mode="json")
        size = listing_size(alert)
        if group.get("listed_bytes", 0) + size <= MAX_LISTED_BYTES and size <= value_room:
            group["alerts"].append(alert)
            group["listed_bytes"] = group.get("listed_bytes", 0) + size
            added = size
        elif not group["alerts"]:
            shortened = without_context(alert)
            group["alerts"].append(shortened)
            added = listing_size(shortened)
            log.warning("alert %r of client %s is too large for its group's listing (%d bytes): listed without "
                        "its context", matched.alert.alert_id, matched.client_id, size)
        is_listed = added > 0
    else:
        is_listed = False
    rule_ids = sorted(set(group["rule_ids"]) | set(matched.rule_ids))
    if rule_ids != group["rule_ids"]:
        added += encoded_size(rule_ids) - encoded_size(group["rule_ids"])
        group["rule_ids"] = rule_ids
    return added, is_listed


def unlisted_record(matched: AlertMatched) -> str:
    """The alert of a member its group does not list, as Postgres keeps it (JSON) for the closer.

    Bounded as a listing is: an alert over MAX_LISTED_BYTES could never be listed in full, and is
    kept without its context but with its digests (`without_context`, 16 KB at most), so no
    member's row grows past that.
    """
    # On a storm's path, once per member past GROUP_MAX_ALERTS: pydantic's own JSON, and the
    # table's encoding measured only for an alert that might be near the bound (that encoding
    # escapes non-ASCII, at most 12 bytes for a 4-byte character, and spaces its separators).
    text = matched.alert.model_dump_json()
    if 3 * len(text.encode()) + 1 > MAX_LISTED_BYTES:
        alert = matched.alert.model_dump(mode="json")
        if listing_size(alert) > MAX_LISTED_BYTES:
            text = json.dumps(without_context(alert), separators=(",", ":"), ensure_ascii=False)
    return text


def fill_listing(listed: list[dict], candidates: Iterable[dict], places: int) -> list[dict]:
    """Append to `listed` the candidates there is room for, in order: up to `places` alerts, within
    MAX_LISTED_BYTES as add_member lists them; return those left out.

    For the closer, when the silences in force left some listed alerts out: the unlisted members
    not silenced take their places. The notification goes out in one `notifications.ready`
    message, so its listing keeps the table's budget; the client's value no longer counts, the
    group is leaving it.
    """
    if len(listed) >= places:
        return list(candidates)
    used = sum(listing_size(alert) for alert in listed)
    left_out = []
    for alert in candidates:
        size = listing_size(alert)
        if len(listed) < places and used + size <= MAX_LISTED_BYTES:
            listed.append(alert)
            used += size
        elif not listed:
            listed.append(without_context(alert))  # a notification lists at least one alert
            used += listing_size(listed[0])
        else:
            left_out.append(alert)
    return left_out


@dataclass(frozen=True)
class Join:
    """An alert that joins its group rule's group, and the group it was a member of before, if any
    (a member of a group the table lost in a crash is moved to the group open now)."""

    matched: AlertMatched
    member_of: str | None = None


@dataclass
class JoinPlan:
    values: dict[bytes, ClientGroups]  # the table values to write, by key
    # (client_id, alert_id, notification_id, unlisted_record or None when listed) to upsert
    memberships: list[tuple[str, str, str, str | None]]
    sizes: dict[bytes, int] = field(default_factory=dict)  # the encoded size of each value joined to


def plan_joins(current: dict[bytes, ClientGroups | None], joins: Sequence[Join], closed: set[str], now: float,
               max_alerts: int) -> JoinPlan:
    """Put each alert in the open group of its client and group rule, opening one if none is open.

    `current` holds the table values of the clients concerned; groups in `closed` (their
    notification exists) are dropped from them. An alert that is a member of an open group
    (`member_of`) stays in it, whatever its group rule is now (its client changed its rules since):
    moved to the group of its current rule, it would be notified by both, or its first group
    reopened under the new rule with its notification_id, a second group of that id. Only when
    the table lost its group is one opened for it, under that notification_id.
    """
    values: dict[bytes, ClientGroups] = {}
    for key, value in current.items():
        values[key] = {rule_id: group for rule_id, group in copy.deepcopy(value or {}).items()
                       if group["notification_id"] not in closed}
    memberships = []
    sizes: dict[bytes, int] = {}  # the encoded size of each value, kept up to date as alerts are added
    for join in joins:
        matched = join.matched
        key = matched.client_id.encode()
        groups = values.setdefault(key, {})
        group = _group_of(groups, join)
        if group is None:
            group = groups[_rule_key(matched)] = open_group(join.member_of or str(uuid.uuid4()),
                                                            matched.group_window_s, now)
            sizes.pop(key, None)  # measured again below, with the new group
        if key not in sizes:
            sizes[key] = encoded_size(groups)
        added, listed = add_member(group, matched, max_alerts, MAX_VALUE_BYTES - sizes[key])
        sizes[key] += added
        # A listing only grows: a member unlisted here stays so in this plan (a later batch that
        # finds room for it, redelivered, lists it and empties its record).
        unlisted = None if listed else unlisted_record(matched)
        memberships.append((matched.client_id, matched.alert.alert_id, group["notification_id"], unlisted))
    return JoinPlan(values, memberships, sizes)


def _group_of(groups: ClientGroups, join: Join) -> Group | None:
    """The open group the joining alert belongs in: the one it is a member of, else its rule's (a
    member of a lost group joins the group open for its rule now: the lost one is never notified)."""
    if join.member_of is not None:
        for group in groups.values():
            if group["notification_id"] == join.member_of:
                return group
    return groups.get(_rule_key(join.matched))


def _rule_key(matched: AlertMatched) -> str:
    # A member of a lost group that its rules no longer group (a rule changed since) is keyed by one
    # of the rules it matched; its group_window_s is 0, so that group is due at once.
    return matched.group_rule_id or matched.rule_ids[0]


@dataclass(frozen=True)
class DueGroup:
    key: bytes
    group_rule_id: str
    group: Group


def due_groups(items: Iterable[tuple[bytes, ClientGroups]], now: float, skip: set[str]) -> list[DueGroup]:
    """The groups of `items` (well-formed: `sorted_out`) whose window has passed, but those in `skip`."""
    return [DueGroup(key, rule_id, group)
            for key, value in items for rule_id, group in (value or {}).items()
            if deadline(group) <= now and group["notification_id"] not in skip]


# Past this, a client's value closes its oldest groups at once, before their window ends. The byte
# budgets bound each group's listing, not how many groups a client has open: each holds at least its
# first alert (without context, up to about 16 KB as encoded with its context's digests) and its
# rule_ids, so about 60 groups of the largest alerts the contract accepts, or a few thousand of
# typical ones, would outgrow the broker's limit; the client's writes would then fail on every
# redelivery and stop its partition.
CLOSE_EARLY_BYTES = 768 * 1024


def close_early(plan: JoinPlan) -> list[DueGroup]:
    """Take the oldest groups out of each of the plan's values larger than CLOSE_EARLY_BYTES until it
    is back within MAX_VALUE_BYTES; return them, to be closed now (their members notified early,
    not lost)."""
    taken: list[DueGroup] = []
    for key, value in plan.values.items():
        # As plan_joins kept it up to date: measuring every value again would cost every batch an
        # encoding of its clients' whole values.
        size = plan.sizes[key] if key in plan.sizes else encoded_size(value)
        if size <= CLOSE_EARLY_BYTES:
            continue
        log.warning("client %s has %d bytes of open groups (more than %d): closing its oldest groups before "
                    "their windows end", key.decode("utf-8", "replace"), size, CLOSE_EARLY_BYTES)
        for rule_id, group in sorted(value.items(), key=lambda item: (item[1]["opened_at"], item[0])):
            if size <= MAX_VALUE_BYTES:
                break
            del value[rule_id]
            taken.append(DueGroup(key, rule_id, group))
            # The entry's own bytes less its braces, plus the comma that separated it; measuring the
            # whole value again after each removal would be quadratic in its size.
            size -= encoded_size({rule_id: group}) - 1
    return taken


async def prepare_writes() -> None:
    """Have the producer know the changelog's partitions: a table write picks its partition at once
    (`send_soon`, eagerly partitioned) and fails on a topic the producer has no metadata for."""
    producer = (await app.maybe_start_producer())._ensure_producer()  # faust has no public accessor
    await producer.partitions_for(open_groups.changelog_topic.get_topic_name())


async def wait_until_written() -> None:
    """Return once the table's changelog writes made so far are acknowledged by the broker; raise
    ChangelogWriteFailed if one of them failed.

    Faust flushes its producer before committing offsets, but that flush gives up, silently, when no
    message went out within 0.1 s (`ProducerBuffer.flush_atmost`, faust-streaming 0.15.3), so under
    load a commit could overtake a changelog write, and a crash then would lose a group's members.
    And no flush raises for a failed write: the broker's refusal only reaches the write's future
    (`Topic._on_published`), and a send the producer refuses at once (a record over its
    max_request_size) kills the buffer's sending task (`ProducerBuffer._handle_pending`), leaving
    that future unresolved. The agent waits here before its batch is acknowledged instead.
    """
    writes, open_groups.unchecked_writes = open_groups.unchecked_writes, []
    producer = app.producer
    while True:
        await producer.flush()
        if not producer.buffer.size:
            break
        if producer.buffer.crashed:
            raise ChangelogWriteFailed(f"the producer's buffer crashed: {producer.buffer.crash_reason!r}")
    pending = set(writes)
    while pending:
        _, pending = await asyncio.wait(pending, timeout=0.1)
        if pending and producer.buffer.crashed:
            raise ChangelogWriteFailed(f"the producer's buffer crashed: {producer.buffer.crash_reason!r}")
    failures = [asyncio.CancelledError("the write was cancelled") if write.cancelled() else write.exception()
                for write in writes if write.cancelled() or write.exception() is not None]
    if failures:
        raise ChangelogWriteFailed(f"{len(failures)} of {len(writes)} changelog writes failed: "
                                   f"{type(failures[0]).__name__}: {failures[0]}") from failures[0]


def write_value(key: bytes, value: ClientGroups, event: EventT) -> None:
    """Write (or, when no group is left, delete) a client's groups from the agent.

    Set under the event that carried the client's message: Faust's RocksDB store files a write
    under the current event's partition, and a batch holds events of several partitions.
    """
    token = _current_event.set(weakref.ref(event))
    try:
        if value:
            open_groups[key] = value
        elif key in open_groups:
            del open_groups[key]
    finally:
        _current_event.reset(token)


@dataclass(frozen=True)
class _Message:
    partition: int


@dataclass(frozen=True)
class _PartitionEvent:
    """What the RocksDB store reads of the current event (`message.partition`), for a write made
    outside any stream event: the closer removing a group that Postgres refuses."""

    message: _Message


def write_value_of_partition(key: bytes, value: ClientGroups, partition: int) -> None:
    """`write_value` from a timer: `partition` is the key's partition of `alerts.matched`, which is
    also its changelog partition (see the module docstring)."""
    write_value(key, value, _PartitionEvent(_Message(partition)))  # type: ignore[arg-type]
