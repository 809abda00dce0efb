"""Process-wide Prometheus metrics; the worker's web server exposes them at /metrics (web/operations.py).

docs/operations.md explains how to read them.
"""
from functools import cache

from prometheus_client import Counter, Gauge, Histogram, disable_created_metrics
from prometheus_client.metrics import MetricWrapperBase

# The `_created` timestamp series double what a scrape carries and no dashboard of ours reads them.
disable_created_metrics()

# from_history: the letter's record was already on a replica's topic when the worker started
# (DeadLetter.from_history): the same letter may have been counted before, at an earlier start.
dead_letters = Counter("alerting_dead_letters_total", "Messages sent to a dead-letter topic", ["topic", "from_history"])
alerts_consumed = Counter("alerting_alerts_consumed_total", "Alerts read from alerts.new")
alerts_matched = Counter("alerting_alerts_matched_total", "alerts.matched messages emitted (one per client)")
notifications_emitted = Counter("alerting_notifications_emitted_total", "notifications.ready messages emitted")
deliveries = Counter("alerting_deliveries_total", "Delivery attempts by outcome", ["channel", "status"])

CHANNELS = ("webhook", "slack", "email")

# Per endpoint of a notification: one notification to three endpoints counts three times.
notifications_sent = Counter("alerting_notifications_sent_total",
                             "Notifications delivered to an endpoint", ["channel"])
notifications_failed = Counter("alerting_notifications_failed_total",
                               "Notifications given up for an endpoint (permanent error or last attempt)", ["channel"])
notifications_retried = Counter("alerting_notifications_retried_total",
                                "Delivery attempts scheduled again after a retryable failure", ["channel"])
notifications_suppressed = Counter("alerting_notifications_suppressed_total",
                                   "Notifications not emitted because they repeat one already sent")
notifications_silenced = Counter("alerting_notifications_silenced_total",
                                 "Notifications not emitted because a silence covers them")
for _channel in CHANNELS:
    # Known label values are exported at 0 from the start, so rates and alerts see the series at once.
    for _counter in (notifications_sent, notifications_failed, notifications_retried):
        _counter.labels(channel=_channel)
# A replica keeps every worker's rules or silences current; one failing again and again leaves them
# stale while the worker still answers /readyz (it caught up once): alert on this rising.
replica_failures = Counter("alerting_replica_failures_total",
                           "Rule or silence replica runs that failed (each is restarted after a pause)", ["replica"])
for _replica in ("rule replica", "silence replica"):
    replica_failures.labels(replica=_replica)
groups_closed_early = Counter("alerting_groups_closed_early_total",
                              "Notification groups closed before their window ended: their client's open "
                              "groups outgrew one changelog message")
notifications_pruned = Counter("alerting_notifications_pruned_total",
                               "Settled notifications deleted, with their deliveries, past NOTIFICATION_RETENTION_DAYS")
# Not dead letters: nothing is wrong with such a message, its client is gone (alerting_app/deleted_clients.py).
messages_of_deleted_clients = Counter("alerting_messages_of_deleted_clients_total",
                                      "Matches and notifications of a client deleted while they were in flight, "
                                      "dropped", ["topic"])
for _topic in ("alerts.matched", "notifications.ready"):
    messages_of_deleted_clients.labels(topic=_topic)

# Faust would restart a crashed agent and acknowledge the batch nobody processed, so the worker then
# commits nothing more and stops (broker_transport.Consumer.on_task_error). Not counted: an agent whose
# sends failed because the stopping worker gave up on the broker (broker_transport.Agent).
agent_crashes = Counter("alerting_agent_crashes_total",
                        "Agents that raised: after the first, this worker commits no offset and stops")

# The API's request rate limits (web/request_limits.py): per client key, and on failed
# authentications per client address.
api_requests_limited = Counter("alerting_api_requests_limited_total",
                               "API requests answered 429: their key was over its rate limit")
api_requests_unchecked = Counter("alerting_api_requests_unchecked_total",
                                 "API requests let through without their rate limit checked: Redis did not answer")
api_failed_authentications = Counter("alerting_api_failed_authentications_total",
                                     "API requests answered 401 after their token was looked up: none of ours")
api_requests_limited_by_address = Counter(
    "alerting_api_requests_limited_by_address_total",
    "API requests answered 429 before their token was looked up: their address had too many failed authentications")

# Observed by the agents: one evaluate or aggregate batch (stream.take_events), one delivery.
STAGES = ("evaluate_batch", "aggregate_batch", "deliver")
stage_seconds = Histogram(
    "alerting_stage_duration_seconds", "Time one pipeline stage spends on one batch or delivery", ["stage"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0),
)
for _stage in STAGES:
    stage_seconds.labels(stage=_stage)

# Set when /metrics is scraped (web/operations.py).
consumer_lag = Gauge("alerting_consumer_lag_messages",
                     "Messages on this worker's assigned partitions past the group's last commit (end offset - committed)",
                     ["topic"])
rules_held = Gauge("alerting_rules_held", "Rules in this worker's rule index, enabled or not")


@cache
def labelled(metric: MetricWrapperBase, *values: str):
    """`metric.labels(*values)`, kept: prometheus_client checks and looks the values up at every call
    (2-3 us), and each delivery counts two or three. For label values of a small set only (a
    channel, a status, a stage): every combination is kept for good."""
    return metric.labels(*values)
