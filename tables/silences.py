"""The silences every worker checks before notifying: a replica of the `silence.changed` changelog.

`silence_index` is what the evaluator reads; `silence_replica` keeps it current from every
partition of `silence.changed`, read outside the consumer group like the rules (tables/
changelog_replica.py). Silences are few, so there is no local store: each start reads the
compacted topic from its beginning into memory.
"""
from __future__ import annotations

from alerting_app.app import app, settings, silence_changed
from alerting_app.contracts import SilenceChanged
from alerting_app.kafka_connection import Broker, kafka_connection
from alerting_app.silencing import SilenceIndex
from tables.changelog_replica import ChangelogReplica, from_the_beginning, keep_running


class SilenceReplica(ChangelogReplica):
    contract = SilenceChanged
    key_field = "silence_id"
    id_fields = ("silence_id", "client_id")
    name = "silence replica"
    index: SilenceIndex

    async def run(self, broker: Broker, topic: str, *, poll_ms: int = 100) -> None:
        """Read every partition of `topic` from its beginning, for ever.

        Each run reads into a fresh index, which takes the place of the one matching reads only once
        it has read up to the end offsets (`reached_end_offsets`), as the rule replica does. A restart
        (after a failure) once read everything again into the served index: a silence it had
        forgotten (its delete, then the null record behind it, read) came back from its first
        upsert until its later records were read again, and a silence expired early is in force in
        that upsert: for a while the restart muted alerts it no longer muted.
        """
        self.filling = SilenceIndex()
        await self.follow(broker, topic, start_at=from_the_beginning, on_batches=self.apply_batches, poll_ms=poll_ms)


silence_index = SilenceIndex()
# Forgotten when Postgres forgets them (agents/retention.py): a deleted silence had ended, or its client is gone.
silence_replica = SilenceReplica(silence_index, forget_deletions_after_s=settings.silence_retention_days * 86_400)


@app.task
async def replicate_silences() -> None:
    async def run_once() -> None:
        await silence_replica.run(kafka_connection(settings), silence_changed.get_topic_name())

    await keep_running("silence replica", run_once, lambda: app.should_stop)
