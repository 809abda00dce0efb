"""Process-wide Prometheus counters; the worker's web server exposes them at /metrics."""
from prometheus_client import Counter

dead_letters = Counter("alerting_dead_letters_total", "Messages sent to a dead-letter topic", ["topic"])
alerts_consumed = Counter("alerting_alerts_consumed_total", "Alerts read from alerts.new")
alerts_matched = Counter("alerting_alerts_matched_total", "alerts.matched messages emitted (one per client)")
notifications_emitted = Counter("alerting_notifications_emitted_total", "notifications.ready messages emitted")
deliveries = Counter("alerting_deliveries_total", "Delivery attempts by outcome", ["channel", "status"])
