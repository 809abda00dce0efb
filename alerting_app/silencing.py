"""Which silence mutes an alert for a client: plain data structures, no Faust.

Silences arrive as `silence.changed` events (upserts and deletes, each with the silence's
version). Unlike rules they are few (a tenant silences a handful of things during an incident),
so `SilenceIndex` keeps them per client and checks a client's silences one by one.
`active_silences` builds one from Postgres instead, for a worker that keeps no replica.
"""
from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Mapping
from typing import Any

import asyncpg
import pydantic

from alerting_app.contracts import Alert, Silence, SilenceChanged
from alerting_app.json_logs import one_line_for_log
from alerting_app.matching import forget_deletions

log = logging.getLogger(__name__)

# The columns of a `silences` row that make its Silence contract.
SILENCE_COLUMNS = ("silence_id, client_id, severity, source, name, context_matchers, starts_at, ends_at, comment, "
                   "created_by, version")


def silence_of_row(row: Mapping[str, Any]) -> Silence:
    """The Silence contract of a `silences` row (ids as text, times as unix seconds)."""
    return Silence(
        silence_id=str(row["silence_id"]), client_id=str(row["client_id"]), severity=row["severity"],
        source=row["source"], name=row["name"], context_matchers=row["context_matchers"],
        starts_at=row["starts_at"].timestamp(), ends_at=row["ends_at"].timestamp(), comment=row["comment"],
        created_by=row["created_by"], version=row["version"],
    )


# The clients' silences in force at $2 (unix seconds); `SilenceIndex.silencing` checks the window again.
_ACTIVE_SILENCES = f"""
SELECT {SILENCE_COLUMNS} FROM silences
WHERE client_id = ANY($1::uuid[]) AND starts_at <= to_timestamp($2) AND ends_at > to_timestamp($2)
"""


async def active_silences(conn: asyncpg.Connection | asyncpg.Pool, client_ids: Iterable[str], at: float
                          ) -> "SilenceIndex":
    """The index of these clients' silences in force at `at`, read from Postgres (the source of truth).

    For the grouping closer (agents/close_groups.py): it runs on aggregate workers, and only the
    evaluate role keeps a silence replica (alerting_app/roles.py). Ask the index with `at` given:
    it holds only what was in force then.
    """
    changes = []
    for row in await conn.fetch(_ACTIVE_SILENCES, sorted(set(client_ids)), at):
        try:
            changes.append(SilenceChanged.upsert(silence_of_row(row)))
        except pydantic.ValidationError as exc:
            # A row the contract no longer accepts must not stop the closing of every tenant's
            # groups: that one silence mutes nothing at close time (the evaluator's replica would
            # have dead-lettered it too).
            log.warning("silence %s of client %s: not applied, the contract refuses it: %s",
                        row["silence_id"], row["client_id"], one_line_for_log(str(exc)))  # it may quote the row
    return SilenceIndex(changes)


# How long after its end a silence stops being scanned (see `SilenceIndex.silencing`).
PRUNE_AFTER_EXPIRY_S = 600.0


class SilenceIndex:
    """The newest version of every silence, by client.

    `apply` is idempotent and order-independent, as for rules: an event whose version is not newer
    than the one held is ignored, and a delete keeps its version so a late upsert cannot revive it,
    until `forget_deletions` lets it go (tables/changelog_replica.py says when).
    Expired silences stay held (an expiry is an upsert) for `versions()`, but `silencing` stops
    scanning them once it has seen them expired for PRUNE_AFTER_EXPIRY_S.
    """

    def __init__(self, changes: Iterable[SilenceChanged] = ()) -> None:
        self._versions: dict[str, int] = {}
        self._deleted_at: dict[str, float] = {}  # silence_id -> when it was deleted, for each tombstone
        self._silences: dict[str, Silence] = {}
        self._by_client: dict[str, dict[str, Silence]] = {}
        self._pruned_at = float("-inf")  # the latest clock reading at which `silencing` pruned one
        for change in changes:
            self.apply(change)

    def apply(self, change: SilenceChanged, at: float | None = None) -> bool:
        """Apply the change if it is newer than what is held; True when it changed the index.

        `at`: when the change was made (unix seconds; default now), kept for a delete's tombstone.
        """
        held = self._versions.get(change.silence_id)
        if held is not None and change.version <= held:
            return False
        self._versions[change.silence_id] = change.version
        if change.action == "delete":
            self._deleted_at[change.silence_id] = time.time() if at is None else at
        else:
            self._deleted_at.pop(change.silence_id, None)
        self._unindex(change.silence_id)
        if change.action == "upsert":
            assert change.silence is not None  # guaranteed by the contract
            self._silences[change.silence_id] = change.silence
            self._by_client.setdefault(change.client_id, {})[change.silence_id] = change.silence
        return True

    def take_over(self, other: SilenceIndex) -> None:
        """Hold what `other` holds from now on, in one step: readers of this index never see a mix.
        `other` must not be changed afterwards (the two share their contents)."""
        self._versions, self._deleted_at, self._silences = other._versions, other._deleted_at, other._silences
        self._by_client, self._pruned_at = other._by_client, other._pruned_at

    def forget(self, silence_id: str) -> bool:
        """Drop whatever is held of the silence, its tombstone or the silence itself, as if it had
        never been seen; whether anything was. For a null record (a Kafka tombstone) on silence.changed."""
        if self._versions.pop(silence_id, None) is None:
            return False
        self._deleted_at.pop(silence_id, None)
        self._unindex(silence_id)
        return True

    def _unindex(self, silence_id: str) -> None:
        old = self._silences.pop(silence_id, None)
        bucket = self._by_client.get(old.client_id) if old is not None else None
        if bucket is not None:  # None: no longer scanned, since `silencing` saw it expired
            bucket.pop(silence_id, None)
            if not bucket:
                del self._by_client[old.client_id]

    def silencing(self, client_id: str, alert: Alert, at: float | None = None,
                  context_digests: Mapping[str, str] | None = None) -> str | None:
        """The smallest silence_id of the client's silences active at `at` (default now) matching the
        alert (`context_digests`: of an alert kept without its context, SilenceMatchers.matches)."""
        asked_now = at is None
        at = time.time() if at is None else at
        if asked_now and at < self._pruned_at - PRUNE_AFTER_EXPIRY_S:
            self._scan_all_again()
        silences = self._by_client.get(client_id)
        if not silences:
            return None
        matching = [silence_id for silence_id, silence in silences.items()
                    if silence.is_active(at) and silence.matches(alert, context_digests)]
        if asked_now:
            # A silence long expired can only come back as a newer version (which `apply` indexes
            # again), so stop scanning it, or a tenant creating a silence per deploy slows every
            # match down. It stays in `versions()`, which workers compare. Only once it is
            # PRUNE_AFTER_EXPIRY_S past its end, so the wall clock's small steps (NTP) cannot drop
            # one still in force; a larger step back has every held silence scanned again
            # (_scan_all_again). The active check above stays exact: a silence past its end never mutes.
            prune_before = at - PRUNE_AFTER_EXPIRY_S
            pruned = [silence_id for silence_id, silence in silences.items() if silence.ends_at <= prune_before]
            for silence_id in pruned:
                del silences[silence_id]
            if pruned:
                self._pruned_at = max(self._pruned_at, at)
            if not silences:
                del self._by_client[client_id]
        return min(matching) if matching else None

    def holds_any_of(self, client_id: str) -> bool:
        """Whether the client has a silence that `silencing` scans: without one, nothing of it is silenced."""
        return bool(self._by_client.get(client_id))

    def _scan_all_again(self) -> None:
        """Scan every held silence again: the clock went back by more than PRUNE_AFTER_EXPIRY_S
        behind a reading that pruned some, which may be in force again at the clock's time now."""
        self._by_client = {}
        for silence_id, silence in self._silences.items():
            self._by_client.setdefault(silence.client_id, {})[silence_id] = silence
        self._pruned_at = float("-inf")

    def forget_deletions(self, deleted_before: float) -> list[str]:
        """Drop the tombstones of silences deleted before `deleted_before` (unix seconds); their ids."""
        return forget_deletions(self._versions, self._deleted_at, deleted_before)

    def deleted_versions(self) -> dict[str, int]:
        """silence_id -> version of every tombstone held."""
        return {silence_id: self._versions[silence_id] for silence_id in self._deleted_at}

    def versions(self) -> dict[str, int]:
        """silence_id -> version of every held silence (deleted ones not included): what workers compare."""
        return {silence_id: silence.version for silence_id, silence in self._silences.items()}

    def __len__(self) -> int:
        return len(self._silences)
