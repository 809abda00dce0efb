"""The web server's own error answers are JSON (alerting_app/http_server.py); the aiohttp and Faust
code that relies on is pinned here. Requests the HTTP parser refuses, sent to a real worker:
tests/test_api_parser_refusals.py."""
from __future__ import annotations

import inspect
import logging
import socket

import aiohttp
import asyncpg
from aiohttp import web
from aiohttp.web_protocol import RequestHandler
from faust.web.drivers import aiohttp as faust_aiohttp
from yarl import URL

from alerting_app.app import app
from alerting_app.http_errors import database_unavailable
from alerting_app.http_server import JsonErrorsAppRunner, Web
from pinned_sources import changed_sources

# What http_server.py overrides or relies on, by sha256 of the source (aiohttp 3.14.5, faust-streaming
# 0.15.3): that aiohttp answers a parser refusal, a view's crash and its timeout from handle_error,
# that an Application's server makes each connection's RequestHandler in Server.__call__ from its
# `_loop` and `_kwargs`, built by AppRunner._make_server; and that Faust's driver serves through the
# `_runner` it makes in __init__.
_PINNED_SOURCES = {
    "aiohttp RequestHandler.handle_error": "94962ffef500c172",
    "aiohttp RequestHandler._make_error_handler": "b73dcf1dd177a243",
    "aiohttp Server.__call__": "c5700549e688b164",
    "aiohttp AppRunner._make_server": "2d5358865abd00e3",
    "aiohttp Application._make_handler": "63e4c1bdd0e8983b",
    "faust aiohttp Web.__init__": "52b00c1bd653c82d",
    "faust aiohttp Web.start_server": "b0c4f10491828520",
    "faust aiohttp Web._new_transport_tcp": "3f9463d869f309ec",
}


def _installed_sources() -> dict[str, str]:
    return {
        "aiohttp RequestHandler.handle_error": inspect.getsource(RequestHandler.handle_error),
        "aiohttp RequestHandler._make_error_handler": inspect.getsource(RequestHandler._make_error_handler),
        "aiohttp Server.__call__": inspect.getsource(web.Server.__call__),
        "aiohttp AppRunner._make_server": inspect.getsource(web.AppRunner._make_server),
        "aiohttp Application._make_handler": inspect.getsource(web.Application._make_handler),
        "faust aiohttp Web.__init__": inspect.getsource(faust_aiohttp.Web.__init__),
        "faust aiohttp Web.start_server": inspect.getsource(faust_aiohttp.Web.start_server),
        "faust aiohttp Web._new_transport_tcp": inspect.getsource(faust_aiohttp.Web._new_transport_tcp),
    }


def test_the_json_error_answers_still_match_the_installed_aiohttp_and_faust():
    changed = changed_sources(_installed_sources(), _PINNED_SOURCES)
    assert not changed, (
        f"{changed} changed since aiohttp 3.14.5 / faust-streaming 0.15.3: re-check alerting_app/http_server.py "
        "against the installed code (tests/test_api_parser_refusals.py sends it refused requests), "
        "then record the new hashes here")


def test_the_app_serves_through_the_json_errors_runner():
    assert isinstance(app.web, Web)
    assert isinstance(app.web._runner, JsonErrorsAppRunner)


async def _crash(request: web.Request) -> web.Response:
    raise RuntimeError("secret detail of a bug")


async def test_a_crash_answers_a_json_500_that_does_not_say_what_crashed(caplog):
    caplog.set_level(logging.ERROR, logger="aiohttp.server")
    crashing = web.Application()
    crashing.router.add_get("/crash", _crash)
    runner = JsonErrorsAppRunner(crashing, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        async with aiohttp.ClientSession() as http, http.get(f"http://127.0.0.1:{port}/crash") as answer:
            assert answer.status == 500
            assert answer.content_type == "application/json"
            assert await answer.json() == {"error": "internal_server_error",
                                           "message": "the server failed to answer the request; its log says why"}
    finally:
        await runner.cleanup()
    # The log keeps aiohttp's ERROR with the traceback.
    assert any(record.levelno == logging.ERROR and record.exc_info for record in caplog.records)


def _closed_port() -> int:
    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))
        return unused.getsockname()[1]


async def _postgres_away(request: web.Request) -> web.Response:
    # A Postgres that is not there: the connection is refused, as with one stopped under a worker.
    await asyncpg.connect(host="127.0.0.1", port=request.app[_POSTGRES_PORT], user="nobody", timeout=10)
    return web.Response()


_POSTGRES_PORT = web.AppKey("postgres_port", int)


async def test_the_path_of_a_request_postgres_failed_is_logged_on_one_line(caplog):
    # Any caller reaches Postgres (a key is looked up there), and a request's path is its own text:
    # decoded, `%0A` began a log line of its own, which read as the worker's (a forged ERROR).
    caplog.set_level(logging.WARNING, logger="alerting_app.http_errors")
    failing = web.Application(middlewares=[database_unavailable])
    failing[_POSTGRES_PORT] = _closed_port()
    failing.router.add_get("/api/v1/rules/{rule_id}", _postgres_away)
    runner = web.AppRunner(failing, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    forged = "%0A[2026-11-29%2007:00:00,000]%20[1]%20[ERROR]%20forged"
    try:
        async with aiohttp.ClientSession() as http, \
                http.get(URL(f"http://127.0.0.1:{port}/api/v1/rules/x{forged}", encoded=True)) as answer:
            assert answer.status == 503
    finally:
        await runner.cleanup()
    [logged] = [record.getMessage() for record in caplog.records if record.name == "alerting_app.http_errors"]
    assert logged.splitlines() == [logged]
    assert logged.startswith(f"GET /api/v1/rules/x{forged}: the database is unavailable"), logged
