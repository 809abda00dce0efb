"""`alerting-app worker` whose only agent reads alerts.new in batches and does nothing with them.

Run by bench/faust_ceiling.py: what Faust's consumer costs per message, before any work of ours.
"""
from __future__ import annotations

import os
import warnings

from faust.sensors import Monitor

from alerting_app.app import alerts_new, app
from alerting_app.cli import main

if os.environ.get("BENCH_FAUST_MONITOR") == "faust":  # faust_ceiling.py --compare-monitor
    with warnings.catch_warnings():  # Faust warns that the setting was given before; the Monitor is made at start
        warnings.simplefilter("ignore")
        app.conf.Monitor = Monitor

for name in list(app.agents):
    del app.agents[name]
app._app_tasks.clear()  # no rule replica, no outbox relay: nothing but the agent below


@app.agent(alerts_new)
async def read_alerts(stream):
    async for _events in stream.take_events(500, within=0.05):
        pass


if __name__ == "__main__":
    main()
