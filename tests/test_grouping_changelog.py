"""`groups.wait_until_written` sees the outcome of every changelog write of the group table.

Faust's producer flush never raises for a write that failed; the write's future does (Faust's
`Topic._on_published` sets the broker's error on it). Real broker for the writes that succeed; a
failed write is a future failed as Faust fails it, since making this broker refuse one would also
break the shared producer for the tests that follow.
"""
from __future__ import annotations

import asyncio
import uuid

import pytest
import pytest_asyncio
from aiokafka.errors import MessageSizeTooLargeError

from alerting_app.sending import partition_for
from tables import groups
from test_agent_support import AGENT_LOOP, pipeline  # noqa: F401  (fixtures)


@pytest_asyncio.fixture(scope="module", loop_scope="session", autouse=True)
async def group_changelog(pipeline):
    await groups.prepare_writes()  # the changelog itself is created by the `pipeline` fixture


def a_value() -> groups.ClientGroups:
    return {str(uuid.uuid4()): groups.open_group(str(uuid.uuid4()), 5, 1.0)}


@AGENT_LOOP
async def test_wait_until_written_returns_once_the_broker_acknowledged_every_write():
    key = str(uuid.uuid4()).encode()
    groups.write_value_of_partition(key, a_value(), partition_for(key, tuple(range(64))))
    [write] = groups.open_groups.unchecked_writes

    await groups.wait_until_written()

    assert write.done() and write.result().topic == groups.open_groups.changelog_topic.get_topic_name()
    assert groups.open_groups.unchecked_writes == []
    del groups.open_groups[key]
    await groups.wait_until_written()


@AGENT_LOOP
async def test_a_changelog_write_the_broker_refused_makes_wait_until_written_raise():
    key = str(uuid.uuid4()).encode()
    groups.write_value_of_partition(key, a_value(), partition_for(key, tuple(range(64))))
    refused = asyncio.get_running_loop().create_future()
    refused.set_exception(MessageSizeTooLargeError("refused by the broker"))
    groups.open_groups.unchecked_writes.append(refused)

    with pytest.raises(groups.ChangelogWriteFailed, match="1 of 2 changelog writes failed"):
        await groups.wait_until_written()

    assert groups.open_groups.unchecked_writes == []  # checked once: the next wait is about later writes
    del groups.open_groups[key]
    await groups.wait_until_written()
