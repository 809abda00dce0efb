"""Faust settings that lower what Faust's consumer path costs per message (passed to faust.App).

Why: every stage pays Faust's consumer path per message it consumes, about 80 us on the dev
machine (docs/performance.md, "Faust consumer overhead"), more than the 66 us that 15,000
alerts/s per worker allows. Settings alone cannot bring it under that: about half of it is
`Consumer._drain_messages` awaiting `wait_first(callback, suspend_flow)` per message (four tasks
and an `asyncio.wait`, ~40 us), which no setting reaches. What settings can remove is measured
and applied here; what was tried without effect is listed in docs/performance.md.
"""
from __future__ import annotations

from time import monotonic
from typing import Any

from faust.sensors import Monitor


class LeanMonitor(Monitor):
    """Faust's Monitor without its per-message bookkeeping.

    Faust calls the Monitor four times per consumed message (message in, stream event in and out,
    message out) to keep counters, per-topic/per-stream tallies and latency deques: 3.3-5.5 us per
    message in a micro-benchmark, 1.2-1.5 us with this one. In a no-op agent with the rest of
    Faust's path slimmed (experiment) that was 64-74 vs 54-60 us CPU per message; with Faust's
    path as it is, the gain drowns in its noise. Nothing of ours reads those statistics: our
    metrics are alerting_app/metrics.py (Prometheus), and Faust's own views that show them
    (/stats/, /performance) are disabled by default (web_stats_enabled, web_metrics_enabled).

    Kept: `stream_inbound_time`, which Faust's consumer reads to log "stream is not processing
    events" diagnostics (faust/transport/drivers/aiokafka.py, verify_event_path): without it
    every partition would be reported idle. Everything per batch, per commit, per send, per
    rebalance or per table access still goes to Faust's Monitor unchanged.
    """

    def on_message_in(self, tp: Any, offset: int, message: Any) -> None:
        pass

    def on_stream_event_in(self, tp: Any, offset: int, stream: Any, event: Any) -> None:
        self.stream_inbound_time[tp] = monotonic()
        return None  # no per-event state: on_stream_event_out has nothing to time

    def on_stream_event_out(self, tp: Any, offset: int, stream: Any, event: Any, state: Any = None) -> None:
        pass

    def on_message_out(self, tp: Any, offset: int, message: Any) -> None:
        pass

    def track_tp_end_offset(self, tp: Any, offset: int) -> None:
        # Called per message with the partition's high watermark; only Faust's stats view used it.
        # Our consumer lag metric asks the consumer at scrape time (web/operations.py).
        pass


# Keyword arguments for faust.App.
APP_SETTINGS: dict[str, Any] = {
    "Monitor": LeanMonitor,
}
