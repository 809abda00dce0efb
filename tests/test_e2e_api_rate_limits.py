"""The API's request rate limits with real processes: two API workers spend one budget per client key,
and count one client address's failed authentications together, kept in Redis (web/request_limits.py),
not one each."""
from __future__ import annotations

import secrets

import aiohttp
import pytest

pytestmark = pytest.mark.e2e

BURST = 6


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def test_two_workers_spend_one_budget_per_client_key(services, start_worker):
    # A request per 1,000 s after the burst: none comes back while the test runs.
    limited = {"APP_ID": f"api-limit-{secrets.token_hex(4)}", "ROLES": "api",
               "API_RATE_LIMIT_PER_S": "0.001", "API_RATE_BURST": str(BURST)}
    first, second = start_worker(**limited), start_worker(**limited)
    admin = bearer(services.admin_token)

    async with aiohttp.ClientSession() as http:
        clients = []
        for name in ("Acme", "Globex"):  # the admin's token is not limited
            async with http.post(first.url + "/api/v1/clients", json={"name": name}, headers=admin) as response:
                assert response.status == 201
                body = await response.json()
                clients.append((body["client_id"], body["api_key"]))
        (acme_id, acme_key), (globex_id, globex_key) = clients

        statuses, refusal = [], None
        for n in range(BURST + 1):  # each worker in turn
            worker = (first, second)[n % 2]
            async with http.get(worker.url + "/api/v1/rules", headers=bearer(acme_key)) as response:
                statuses.append(response.status)
                refusal = (response.headers.get("Retry-After"), await response.json())
        # Globex's budget is its own, on either worker.
        for worker in (first, second):
            async with http.get(worker.url + "/api/v1/rules", headers=bearer(globex_key)) as response:
                assert response.status == 200
        for client_id in (acme_id, globex_id):
            async with http.delete(f"{second.url}/api/v1/clients/{client_id}", headers=admin) as response:
                assert response.status == 204

    # A budget per worker would have let all of them through: each worker saw at most BURST / 2 + 1.
    assert statuses == [200] * BURST + [429]
    retry_after, body = refusal
    assert retry_after.isdigit() and int(retry_after) >= 1
    assert body["error"] == "rate_limited"


async def test_two_workers_count_one_clients_failed_authentications_together(services, start_worker):
    """Behind a load balancer (API_TRUSTED_PROXIES=1) spreading one client's made-up tokens over two
    workers: the client's failed authentications are counted once, in Redis, not once per worker."""
    limited = {"APP_ID": f"api-failed-auth-{secrets.token_hex(4)}", "ROLES": "api",
               "API_FAILED_AUTH_LIMIT_PER_S": "0.001", "API_FAILED_AUTH_BURST": str(BURST),
               "API_TRUSTED_PROXIES": "1"}
    first, second = start_worker(**limited), start_worker(**limited)

    async with aiohttp.ClientSession() as http:
        async def status(worker, forwarded_for: str) -> int:
            headers = {**bearer(f"alk_{secrets.token_urlsafe(32)}"), "X-Forwarded-For": forwarded_for}
            async with http.get(worker.url + "/api/v1/rules", headers=headers) as response:
                return response.status

        # Each with a new address of its own in front of the one the load balancer appends.
        flood = [await status((first, second)[n % 2], f"10.0.0.{n}, 203.0.113.50") for n in range(BURST + 2)]
        other_client = [await status(worker, "203.0.113.51") for worker in (first, second)]

    # Counted per worker, each would have let BURST through: each saw BURST / 2 + 1.
    assert flood == [401] * BURST + [429] * 2
    assert other_client == [401, 401]
