"""alerting_app.shared_probe.SharedProbe: what /readyz, /startedz and /metrics ask the services, once for the
requests arriving together and reused for a moment (anyone on WEB_PORT may call them, without a
token). The e2e flood of /readyz is in test_e2e_operations_probes.py."""
from __future__ import annotations

import asyncio

import pytest


def counting_probe(answers: list, gate: asyncio.Event | None = None):
    calls = []

    async def probe():
        calls.append(None)
        if gate is not None:
            await gate.wait()
        answer = answers[len(calls) - 1]
        if isinstance(answer, Exception):
            raise answer
        return answer
    return probe, calls


async def test_requests_arriving_together_share_one_probe():
    from alerting_app.shared_probe import SharedProbe

    gate = asyncio.Event()
    probe, calls = counting_probe(["up"], gate)
    shared = SharedProbe(probe, reuse_s=60)
    waiting = [asyncio.ensure_future(shared()) for _ in range(40)]
    await asyncio.sleep(0)
    gate.set()
    assert await asyncio.gather(*waiting) == ["up"] * 40
    assert len(calls) == 1


async def test_an_answer_is_reused_within_its_time_and_asked_again_after():
    from alerting_app.shared_probe import SharedProbe

    probe, calls = counting_probe(["first", "second"])
    reused = SharedProbe(probe, reuse_s=60)
    assert [await reused(), await reused()] == ["first", "first"]
    probe, calls = counting_probe(["first", "second"])
    fresh = SharedProbe(probe, reuse_s=0)
    assert [await fresh(), await fresh()] == ["first", "second"]


async def test_a_failed_probe_is_not_kept():
    from alerting_app.shared_probe import SharedProbe

    probe, calls = counting_probe([ConnectionError("broker away"), "up"])
    shared = SharedProbe(probe, reuse_s=60)
    with pytest.raises(ConnectionError):
        await shared()
    assert await shared() == "up"


async def test_a_request_given_up_does_not_cancel_the_probe_the_others_wait_for():
    from alerting_app.shared_probe import SharedProbe

    gate = asyncio.Event()
    probe, calls = counting_probe(["up"], gate)
    shared = SharedProbe(probe, reuse_s=60)
    given_up, waiting = asyncio.ensure_future(shared()), asyncio.ensure_future(shared())
    await asyncio.sleep(0)
    given_up.cancel()  # its client went away
    await asyncio.sleep(0)
    gate.set()
    assert await waiting == "up"
    assert len(calls) == 1
