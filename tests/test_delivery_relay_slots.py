"""The SMTP relay's send slots in a worker (alerting_app/delivery/relay_slots.py): a slot freed goes
to the tenants waiting in turn, and an email that stops waiting (a worker stopping cancels it) takes
no slot with it. The end-to-end order at a real relay is in test_delivery_tenant_share.py."""
from __future__ import annotations

import asyncio

from alerting_app.delivery.relay_slots import RelaySlots


async def waiting_for(slots: RelaySlots, client_id: str, served: list[str]) -> asyncio.Task:
    """An email of `client_id` waiting for a slot; once it has one, it notes its client in `served`."""
    async def take() -> None:
        await slots.acquire(client_id)
        served.append(client_id)

    task = asyncio.ensure_future(take())
    await asyncio.sleep(0)  # queued now
    return task


async def test_a_slot_freed_goes_to_the_tenants_waiting_in_turn_not_to_the_longest_waiting_email():
    slots, served = RelaySlots(1), []
    await slots.acquire("storm")
    tasks = [await waiting_for(slots, "storm", served) for _ in range(3)]
    tasks.append(await waiting_for(slots, "other", served))
    assert slots.waiting() == 4  # emails, not tenants

    for _ in tasks:
        slots.release()
        await asyncio.sleep(0)

    assert served == ["storm", "other", "storm", "storm"]


async def test_an_email_that_stops_waiting_takes_no_slot_with_it():
    slots, served = RelaySlots(1), []
    await slots.acquire("storm")
    gave_up = await waiting_for(slots, "storm", served)
    then_gave_up = await waiting_for(slots, "other", served)
    last = await waiting_for(slots, "third", served)

    gave_up.cancel()  # while it waits
    await asyncio.gather(gave_up, return_exceptions=True)
    slots.release()  # to "other", which is cancelled before it runs on: the slot goes on to "third"
    then_gave_up.cancel()
    await asyncio.gather(then_gave_up, last, return_exceptions=True)

    assert served == ["third"] and slots.waiting() == 0
    slots.release()
    taken = asyncio.ensure_future(slots.acquire("anyone"))
    await asyncio.sleep(0)
    assert taken.done()  # the one slot is free again: taken without waiting
