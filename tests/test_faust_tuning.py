"""The app runs Faust with LeanMonitor (alerting_app/faust_tuning.py), and LeanMonitor still does
what Faust needs from its Monitor.

LeanMonitor works by overriding Faust's per-message sensor hooks by name: if an upgrade of Faust
renamed one or changed its parameters, the override would silently stop applying (or break the
call), and only this test would say so.
"""
from __future__ import annotations

import inspect

import faust
from faust.sensors import Monitor
from faust.types import TP

from alerting_app.app import app
from alerting_app.faust_tuning import APP_SETTINGS, LeanMonitor

PER_MESSAGE_HOOKS = ("on_message_in", "on_stream_event_in", "on_stream_event_out", "on_message_out",
                     "track_tp_end_offset")


def test_the_app_uses_lean_monitor():
    assert APP_SETTINGS["Monitor"] is LeanMonitor
    assert app.conf.Monitor is LeanMonitor


def test_lean_monitor_overrides_hooks_faust_still_has_with_the_same_parameters():
    for name in PER_MESSAGE_HOOKS:
        assert name in vars(LeanMonitor), name
        faust_hook = getattr(Monitor, name)
        assert list(inspect.signature(getattr(LeanMonitor, name)).parameters) == \
            list(inspect.signature(faust_hook).parameters), name


async def test_events_still_mark_the_partition_as_processing_and_nothing_per_message_is_kept():
    # Faust's consumer reads stream_inbound_time to log "stream is not processing events"; the
    # per-message tallies are what LeanMonitor drops. Called as Faust's stream calls them: through
    # the app's SensorDelegate, with the state on_stream_event_in returned.
    tuned = faust.App("faust-tuning-test", Monitor=LeanMonitor)
    monitor = tuned.monitor
    tuned.sensors.add(monitor)
    tp = TP("alerts.new", 3)
    stream = tuned.stream(tuned.channel())

    tuned.sensors.on_message_in(tp, 41, object())
    state = tuned.sensors.on_stream_event_in(tp, 41, stream, None)
    tuned.sensors.on_stream_event_out(tp, 41, stream, None, state)
    tuned.sensors.on_message_out(tp, 41, object())
    monitor.track_tp_end_offset(tp, 100)

    assert tp in monitor.stream_inbound_time
    assert monitor.messages_received_total == 0
    assert monitor.events_total == 0
    assert not monitor.events_runtime
    assert not monitor.tp_end_offsets
