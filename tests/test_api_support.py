"""Serving the API for tests: the worker's own Faust web application, over real HTTP.

The views are served by the aiohttp application of Faust's web driver (`app.web`), exactly as
the worker serves them, on a local port through aiohttp's test server. An aiohttp application
and Faust's producer both stay bound to the event loop that first ran them, so the API tests
share the session's event loop (`pytestmark = API_LOOP` in each module), and each module hands
the producer and the Postgres pool back when it is done.

This module holds no tests; the test_api_* modules import its fixtures and helpers.
"""
from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Any

import pytest
import pytest_asyncio
from aiohttp.test_utils import TestClient, TestServer
from multidict import CIMultiDict

API_LOOP = pytest.mark.asyncio(loop_scope="session")

_NO_BODY = object()


@dataclass
class Reply:
    status: int
    body: Any
    headers: Any

    def failing_fields(self) -> set[str]:
        assert self.status == 422, (self.status, self.body)
        assert self.body["error"] == "validation_failed"
        return {entry["field"] for entry in self.body["fields"]}


@dataclass
class Tenant:
    client_id: str
    key: str


class Api:
    def __init__(self, client: TestClient, admin_token: str) -> None:
        self.client = client
        self.admin_token = admin_token
        self.tenants: list[Tenant] = []

    async def call(self, method: str, path: str, token: str | None, json: Any = _NO_BODY, *,
                   data: bytes | None = None, params: Any = None, headers: Any = ()) -> Reply:
        # `headers`: a dict, or (name, value) pairs for a header sent on several lines.
        headers = CIMultiDict(headers)
        if token is not None:
            headers["Authorization"] = f"Bearer {token}"
        kwargs: dict[str, Any] = {"headers": headers, "params": params}
        if json is not _NO_BODY:
            kwargs["json"] = json
        if data is not None:
            kwargs["data"] = data
            headers["Content-Type"] = "application/json"
        async with self.client.request(method, path, **kwargs) as response:
            text = await response.text()
            body = await response.json(content_type=None) if text else None
            return Reply(response.status, body, response.headers)

    async def new_tenant(self, name: str = "Acme") -> Tenant:
        reply = await self.call("POST", "/api/v1/clients", self.admin_token, {"name": name})
        assert reply.status == 201, reply.body
        self.tenants.append(Tenant(reply.body["client_id"], reply.body["api_key"]))
        return self.tenants[-1]

    async def delete_tenants(self) -> None:
        for tenant in self.tenants:
            reply = await self.call("DELETE", f"/api/v1/clients/{tenant.client_id}", self.admin_token)
            assert reply.status in (204, 404), reply.body

    async def new_rule(self, tenant: Tenant, severity: str = "HIGH", source: str = "payments",
                       name: str = "*", **extra: Any) -> dict:
        body = {"severity": severity, "source": source, "name": name, **extra}
        reply = await self.call("POST", "/api/v1/rules", tenant.key, body)
        assert reply.status == 201, reply.body
        return reply.body

    async def new_endpoint(self, tenant: Tenant, rule_id: str, type_: str = "webhook",
                           value: str = "https://hooks.example.com/alerts") -> dict:
        reply = await self.call("POST", "/api/v1/endpoints", tenant.key,
                                {"rule_id": rule_id, "type": type_, "value": value})
        assert reply.status == 201, reply.body
        return reply.body


def served_api_routes() -> set[tuple[str, str]]:
    """(method, path template) of every /api/v1 route the worker serves."""
    import web  # noqa: F401  (registers the views)
    from alerting_app.app import app

    return {
        (method, path)
        for path, view in app.web.views.items() if path.startswith("/api/v1")
        for method in view.get_methods() - {"HEAD"}
    }


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def api(services) -> Api:
    # Imported here: the app reads its settings at import, after conftest has set the environment.
    import web  # noqa: F401  (registers the views)
    from agents.retention import finish_client_deletions
    from agents.rule_outbox import relay_pending
    from alerting_app import db, redis_client
    from alerting_app.app import app

    async with TestClient(TestServer(await app.web.wsgi())) as client:
        api = Api(client, services.admin_token)
        yield api
        # Later tests share the broker, and a worker replays rule.changed from the start: leave
        # every rule made here deleted there, so none of them matches those tests' alerts.
        await api.delete_tenants()
    pool = await db.pool()
    # What the aggregate workers' retention would do: no client left half deleted for later tests.
    await finish_client_deletions(pool)
    while await relay_pending(pool):
        pass
    await db.close()
    # Every API request takes a token of its rate limit (web/request_limits.py) through this client,
    # which would stay bound to this loop for later modules' own.
    await redis_client.close()
    await app.producer.stop()
    # Lets a later module start the producer again, in whatever loop it runs.
    app.producer.service_reset()


@pytest_asyncio.fixture(loop_scope="session")
async def tenant(api: Api) -> Tenant:
    return await api.new_tenant(f"tenant-{uuid.uuid4().hex[:8]}")


@pytest_asyncio.fixture(loop_scope="session")
async def other_tenant(api: Api) -> Tenant:
    return await api.new_tenant(f"other-{uuid.uuid4().hex[:8]}")


@pytest.fixture
def broker(services) -> str:
    return services.kafka_bootstrap_servers
