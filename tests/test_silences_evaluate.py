"""The evaluate agent names the silence muting a match: silences arrive through the real silence.changed
topic and the worker's silence replica (Faust's test driver in, the real broker out).

Each test uses its own clients, rules, silences and alert source, as in test_agent_evaluate.py.
"""
from __future__ import annotations

import asyncio
import time

from alerting_app.contracts import DeadLetter, Silence, SilenceChanged
from kafka_probe import produce
from tables.silences import silence_index
from test_agent_evaluate import alert, apply_changes, evaluate, new_id, upsert
from test_agent_support import AGENT_LOOP, pipeline, sent_to  # noqa: F401  (fixtures)

pytestmark = AGENT_LOOP


def silence_upsert(silence_id: str, client_id: str, source: str, version: int = 1, *,
                   ends_in_s: float = 3600) -> SilenceChanged:
    now = time.time()
    return SilenceChanged.upsert(Silence(
        silence_id=silence_id, client_id=client_id, version=version, severity="*", source=source, name="*",
        starts_at=now - 1, ends_at=now + ends_in_s, comment="test", created_by="tests"))


async def apply_silences(*changes: SilenceChanged) -> None:
    """Publish on the real silence.changed topic; return once the replica has read them."""
    from alerting_app.app import settings

    await produce(settings.kafka_bootstrap_servers, "silence.changed",
                  [(change.silence_id.encode(), change.encode()) for change in changes])
    deadline = time.monotonic() + 30
    while any(silence_index.versions().get(c.silence_id) != c.version for c in changes):
        assert time.monotonic() < deadline, "the silence replica did not read the changes"
        await asyncio.sleep(0.05)


async def test_a_match_of_a_silenced_client_names_the_silence_and_others_are_untouched(pipeline):
    source = f"payments-{new_id()}"
    muted, other, silence_id = new_id(), new_id(), new_id()
    await apply_changes(upsert(new_id(), muted, source=source), upsert(new_id(), other, source=source))
    await apply_silences(silence_upsert(silence_id, muted, source))

    [evaluation] = await evaluate(alert(source).encode())

    assert {m.client_id: m.silenced_by for m in evaluation.matched} == {muted: silence_id, other: None}
    [on_broker] = await sent_to("alerts.matched", muted)
    assert on_broker["silenced_by"] == silence_id


async def test_an_expired_silence_no_longer_mutes(pipeline):
    source = f"payments-{new_id()}"
    client, silence_id = new_id(), new_id()
    await apply_changes(upsert(new_id(), client, source=source))
    await apply_silences(silence_upsert(silence_id, client, source))
    await apply_silences(silence_upsert(silence_id, client, source, version=2, ends_in_s=-0.5))

    [evaluation] = await evaluate(alert(source).encode())

    assert [m.silenced_by for m in evaluation.matched] == [None]


async def test_an_undecodable_silence_event_is_dead_lettered_and_the_next_one_applies(pipeline):
    from alerting_app.app import settings

    source = f"payments-{new_id()}"
    client, silence_id = new_id(), new_id()
    garbage_key = f"garbage-{new_id()}"
    await produce(settings.kafka_bootstrap_servers, "silence.changed", [(garbage_key.encode(), b"{not json")])
    await apply_changes(upsert(new_id(), client, source=source))
    await apply_silences(silence_upsert(silence_id, client, source))

    [evaluation] = await evaluate(alert(source).encode())

    assert [m.silenced_by for m in evaluation.matched] == [silence_id]
    [letter] = [DeadLetter.model_validate(value) for value in await sent_to("silence.changed.dlq", garbage_key)]
    assert letter.topic == "silence.changed" and "json" in letter.reason.lower()
