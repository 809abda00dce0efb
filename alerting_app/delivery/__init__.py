"""Delivering notifications to endpoints: durable, retried, rate-limited, sent once.

- `jobs`: what one delivery needs (the notification, the endpoint, the attempts made).
- `records`: the delivery rows in Postgres (PENDING until SENT or FAILED), leased to one worker.
- `claims`: the Redis idempotency key per (notification, endpoint), claimed around every send.
- `rate_limits`: token buckets in Redis, per endpoint and for all email, shared by every worker.
- `attempts`: one delivery with its retries, backoff and jitter (tenacity's); a retry due later
  than 10 s is handed back to Postgres, for the sweep.
- `recorder`: outcomes written to Postgres in batches; failures to notifications.ready.dlq.
- `dispatcher`: the deliveries a worker holds, run as bounded background tasks.

docs/delivery.md explains how they fit together.
"""
