"""REST API v1, served by the worker's Faust web server (aiohttp driver).

Importing this package registers every view on `alerting_app.app.app`.
"""
from web import alerts, clients, endpoint_trial, endpoints, notifications, rules, silences, worker_state  # noqa: F401
