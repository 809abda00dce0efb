"""The worker's web server: Faust's aiohttp driver, whose own error answers are JSON too.

A request aiohttp's HTTP parser refuses (a line over 8,190 bytes, more than 128 headers, a bad
Content-Length or Transfer-Encoding, bytes that are no HTTP) never reaches a view or a middleware:
aiohttp answers it from `RequestHandler.handle_error`, which is also where a view's unexpected
exception (500) or timeout (504) is answered. Those answers were plain text; here they are the
API's `{"error": <code>, "message": ...}` with the status aiohttp chose, so a client parsing JSON
gets one shape whatever went wrong (http_errors.py does the same for what the middlewares see).

aiohttp has no supported hook for these answers (aio-libs/aiohttp#3287), and builds the connection
handler of an Application's server itself. The server of this worker's runner makes connections
of our handler class; nothing in aiohttp changes for anyone else.
tests/test_http_server.py pins the aiohttp and Faust code this relies on.
"""
from __future__ import annotations

from http import HTTPStatus

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.web_protocol import RequestHandler
from faust.types import AppT
from faust.web.drivers import aiohttp as faust_aiohttp

from alerting_app.http_errors import error_code, refusal_detail


def error_answer(status: int, exc: BaseException | None) -> web.Response:
    """The JSON answer to a request aiohttp answers itself."""
    if isinstance(exc, HttpProcessingError) and status < 500:
        message = f"the HTTP server could not read the request: {refusal_detail(exc)}"
    else:
        # The server's own failure: what went wrong is in its log, not for whoever asked.
        message = "the server failed to answer the request; its log says why"
    answer = web.json_response({"error": error_code(HTTPStatus(status).phrase), "message": message},
                               status=status)
    answer.force_close()  # as aiohttp's own answer: the connection's state is unknown
    return answer


class JsonErrorsRequestHandler(RequestHandler):
    """aiohttp's connection handler, answering its errors in JSON."""

    __slots__ = ()

    def handle_error(self, request: web.BaseRequest, status: int = 500, exc: BaseException | None = None,
                     message: str | None = None) -> web.StreamResponse:
        # aiohttp's own does the logging (one INFO line for a refusal: http_errors.ParserRefusalsBelowError)
        # and raises if part of a response was sent already; only its plain-text answer is replaced.
        plain = super().handle_error(request, status, exc, message)
        return error_answer(plain.status, exc)


class _JsonErrorsServer(web.Server):
    def __call__(self) -> RequestHandler:
        return JsonErrorsRequestHandler(self, loop=self._loop, **self._kwargs)


class JsonErrorsAppRunner(web.AppRunner):
    async def _make_server(self) -> web.Server:
        server = await super()._make_server()
        # Application._make_handler builds a plain web.Server with no say in its class; ours only
        # changes which handler a new connection gets.
        server.__class__ = _JsonErrorsServer
        return server


class Web(faust_aiohttp.Web):
    """Faust's aiohttp web driver, serving through a runner whose error answers are JSON."""

    def __init__(self, app: AppT, **kwargs: object) -> None:
        super().__init__(app, **kwargs)
        self._runner = JsonErrorsAppRunner(self.web_app, access_log=None)  # as Faust's, but ours
