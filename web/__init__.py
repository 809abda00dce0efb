"""REST API v1, served by the worker's Faust web server (aiohttp driver).

Importing this package registers every view on `alerting_app.app.app`.
"""
from web import alerts, clients, endpoints, notifications, rules, worker_state  # noqa: F401
