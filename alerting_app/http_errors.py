"""aiohttp middleware: the web server's own error answers (no such route, a method a route does not
take) as JSON like every other API error (web/errors.py), not aiohttp's plain text: a client
parsing `{"error": ...}` gets one shape whatever went wrong. Postgres away under a running worker
answers 503 `database_unavailable`, which a client retries, not a plain-text 500.

A request aiohttp's HTTP parser refuses never reaches the middlewares: the server answers it
itself, in JSON too (http_server.py), and its log says so in one line below ERROR
(ParserRefusalsBelowError)."""
from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.log import server_logger
from aiohttp.web_protocol import RequestPayloadError

from alerting_app.json_logs import one_line_for_log

log = logging.getLogger(__name__)

_KEPT_HEADERS = ("Allow",)  # a 405 says which methods the route takes

# What a 503 asks a client to wait before trying again: Postgres restarting or failing over
# takes seconds to minutes.
DATABASE_RETRY_AFTER_S = 5


@web.middleware
async def json_http_errors(request: web.Request,
                           handler: Callable[[web.Request], Awaitable[web.StreamResponse]]) -> web.StreamResponse:
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise  # redirects and the like are not errors
        headers = {name: exc.headers[name] for name in _KEPT_HEADERS if name in exc.headers}
        body = {"error": error_code(exc.reason)}
        # A message, as every other error has: the bare code left a caller to guess what was wrong.
        if exc.status == 404:
            body["message"] = "no route of the API at this path (docs/api.md lists them)"
        elif exc.status == 405 and "Allow" in headers:
            body["message"] = f"this route does not take {request.method}; it takes {headers['Allow']}"
        return web.json_response(body, status=exc.status, headers=headers)


def error_code(reason: str) -> str:
    """An HTTP reason phrase as web/errors.py names its codes: "Not Found" -> "not_found"."""
    return reason.lower().replace(" ", "_")


@web.middleware
async def database_unavailable(request: web.Request,
                               handler: Callable[[web.Request], Awaitable[web.StreamResponse]]) -> web.StreamResponse:
    """503 for a request that failed because Postgres is away (refused, restarting, the connection
    lost), so that a client tries again later; without it aiohttp answered a plain-text 500.

    The API's other I/O maps its own errors before they get here (the broker's: web/alerts.py; a
    webhook host's DNS: channels/addresses.py), so what `db.is_transient` recognises is Postgres.
    """
    try:
        return await handler(request)
    except Exception as exc:
        # Imported here: alerting_app.db reads the settings from alerting_app.app, which imports this module.
        from alerting_app.db import is_transient

        if not is_transient(exc):
            raise
        # The caller may be any tenant: asyncpg's message names our database's host and port, so it
        # goes to the worker's log, and the answer says only what kind of trouble it was. The path as
        # it came, percent-encoded, on one line: decoded (request.path), any caller's `%0A` began a log
        # line of its own, which read as one of ours (a forged `[ERROR] ...`).
        path = one_line_for_log(request.raw_path.partition("?")[0])
        log.warning("%s %s: the database is unavailable: %s: %s", request.method, path, type(exc).__name__, exc)
        return web.json_response({"error": "database_unavailable",
                                  "message": f"the database is unavailable ({type(exc).__name__}); try again later"},
                                 status=503, headers={"Retry-After": str(DATABASE_RETRY_AFTER_S)})


# The longest part of the parser's message kept in the log line and the answer: it quotes the
# refused request.
REFUSAL_MESSAGE_CHARS = 200


def refusal_detail(exc: HttpProcessingError) -> str:
    """The parser's message, which quotes the request's bytes over several lines: one line, cut short."""
    return " ".join(exc.message.split())[:REFUSAL_MESSAGE_CHARS]


class ParserRefusalsBelowError(logging.Filter):
    """One INFO line, not an ERROR with a traceback, for a request aiohttp's HTTP parser refused.

    aiohttp answers such a request (a URL or header line over 8,190 bytes, more than 128 headers, a
    bad Content-Length or Transfer-Encoding) with a 400 before any view or middleware sees it
    (in JSON: http_server.py), and logs it with `logger.exception`: junk that anyone can send
    without a token filled the worker's log with tracebacks at ERROR, where alarms look. What aiohttp itself logs at
    DEBUG (an invalid method as a connection's first request) stays at DEBUG, in one line too.
    The server's own failures (any other exception, or a 5xx) keep their level and traceback.

    So does a body the parser cannot read once the request is answered: data that is not the
    `Content-Encoding` it names (`gzip` that is not gzip). aiohttp reads what the view left of the
    body after the answer, meets the error again (the view that read it answered 422 already, one
    that did not, 401 or a probe's 200), and logged "Unhandled exception" at ERROR with three
    chained tracebacks, for a request with no token too.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        unread_body = isinstance(exc, RequestPayloadError) and isinstance(exc.__cause__, HttpProcessingError)
        if unread_body:
            exc = exc.__cause__
        if not (isinstance(exc, HttpProcessingError) and 400 <= exc.code < 500):
            return True
        level = min(record.levelno, logging.INFO)
        # The logger let the record through at its own level: a worker logging at WARNING drops it.
        if not logging.getLogger(record.name).isEnabledFor(level):
            return False
        if unread_body:
            record.msg = (f"a request's body could not be read, its connection closed after the answer "
                          f"({type(exc).__name__}: {refusal_detail(exc)})")
        else:
            record.msg = f"{record.getMessage()}: refused with {exc.code} ({type(exc).__name__}: {refusal_detail(exc)})"
        record.args = ()
        record.levelno, record.levelname = level, logging.getLevelName(level)
        record.exc_info, record.exc_text = None, None
        return True


# On the logger itself, which outlives the logging set-up Faust's worker does later.
server_logger.addFilter(ParserRefusalsBelowError())
