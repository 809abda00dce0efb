"""Requests aiohttp's HTTP parser refuses (a line over 8,190 bytes, more than 128 headers, a bad
Content-Length or Transfer-Encoding, an invalid method) are answered before any view sees them:
with the API's JSON error, not aiohttp's plain text (alerting_app/http_server.py), and the worker
logs each in one INFO line: before, each was an ERROR with a traceback, so junk anyone can send
without a token filled the log where alarms look.
The server's own errors keep ERROR and their traceback (alerting_app/http_errors.py)."""
from __future__ import annotations

import json
import logging
import os
import socket
import sys
import time
from urllib.parse import urlsplit

import pytest
from aiohttp.http_exceptions import BadHttpMessage, ContentEncodingError, LineTooLong
from aiohttp.web_protocol import RequestPayloadError

from alerting_app.http_errors import ParserRefusalsBelowError

HEALTHZ = b"GET /healthz HTTP/1.1\r\nHost: worker\r\n\r\n"
FOO_AFTER_HEALTHZ = b"FOO / HTTP/1.1\r\nHost: worker\r\n\r\n"
REFUSED = {
    "a URL over 8,190 bytes": b"GET /api/v1/clients?" + b"a" * 9000 + b" HTTP/1.1\r\nHost: worker\r\n\r\n",
    "a header over 8,190 bytes": b"GET /healthz HTTP/1.1\r\nHost: worker\r\nX-Junk: " + b"a" * 9000 + b"\r\n\r\n",
    "more than 128 headers": b"GET /healthz HTTP/1.1\r\nHost: worker\r\n"
                             + b"".join(b"X-Junk-%d: 1\r\n" % i for i in range(200)) + b"\r\n",
    "a Content-Length that is no number": b"POST /api/v1/alerts HTTP/1.1\r\nHost: worker\r\n"
                                          b"Content-Length: abc\r\n\r\n",
    "a Transfer-Encoding aiohttp does not know": b"POST /api/v1/alerts HTTP/1.1\r\nHost: worker\r\n"
                                                 b"Transfer-Encoding: foo\r\n\r\n",
    "a header name with a character no header name has": b"GET /healthz HTTP/1.1\r\nHost: worker\r\n"
                                                          b"X(Junk): 1\r\n\r\n",
    # aiohttp undoes gzip and deflate; br and zstd only with packages we do not install.
    "a Content-Encoding aiohttp cannot undo": b"POST /api/v1/alerts HTTP/1.1\r\nHost: worker\r\n"
                                              b"Content-Encoding: br\r\nContent-Length: 2\r\n\r\n{}",
    "a chunk size that is no number": b"POST /api/v1/alerts HTTP/1.1\r\nHost: worker\r\n"
                                      b"Transfer-Encoding: chunked\r\n\r\nzz\r\n{}\r\n0\r\n\r\n",
    # As a connection's first request aiohttp logs an invalid method at DEBUG already; once it has
    # answered one, at ERROR like the rest.
    "an invalid method after a valid request": FOO_AFTER_HEALTHZ,
}
# Answered the same, but aiohttp logs it at DEBUG: a TLS hello sent to the plain-HTTP port.
REFUSED_AT_DEBUG = {
    "bytes that are no HTTP at all, as a connection's first request": b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc"
                                                                       b"\x03\x03\r\n\r\n",
}


def exchange(url: str, raw: bytes, served_first: bytes = b"") -> bytes:
    """Everything the server sends back for `raw`, until it closes the connection; `served_first` is
    sent and answered on the same connection before."""
    address = urlsplit(url)
    with socket.create_connection((address.hostname, address.port), timeout=10) as connection:
        if served_first:
            connection.sendall(served_first)
            first = b""
            while b"\r\n\r\n" not in first:
                first += connection.recv(65536)
            head, _, body = first.partition(b"\r\n\r\n")
            length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
            while len(body) < length:
                body += connection.recv(65536)
            assert head.startswith(b"HTTP/1.1 200 "), head
        connection.sendall(raw)
        answer = b""
        while chunk := connection.recv(65536):
            answer += chunk
    return answer


@pytest.mark.e2e
def test_requests_the_http_parser_refuses_are_400_and_one_info_line_each(start_worker):
    worker = start_worker(LOG_LEVEL="info")
    before = len(worker.log())

    for what, raw in {**REFUSED, **REFUSED_AT_DEBUG}.items():
        answer = exchange(worker.url, raw, served_first=HEALTHZ if raw is FOO_AFTER_HEALTHZ else b"")
        head, _, body = answer.partition(b"\r\n\r\n")
        assert head.split(b"\r\n")[0].endswith(b" 400 Bad Request"), (what, answer[:300])
        assert b"\r\nContent-Type: application/json" in head, (what, head)
        error = json.loads(body)
        assert error["error"] == "bad_request", (what, error)
        assert error["message"].startswith("the HTTP server could not read the request: "), (what, error)

    log = worker.log()[before:]
    refusals = [line for line in log.splitlines() if "Error handling request from" in line]
    assert len(refusals) == len(REFUSED), log
    assert all("[INFO]" in line and ": refused with 400 (" in line for line in refusals), refusals
    assert "Traceback" not in log and "[ERROR]" not in log, log


def not_its_encoding(path: str, token: str | None = None) -> bytes:
    """A request whose body is not the gzip its Content-Encoding names."""
    body = b"this is no gzip data"
    authorization = f"Authorization: Bearer {token}\r\n".encode() if token else b""
    return (f"POST {path} HTTP/1.1\r\nHost: worker\r\nContent-Encoding: gzip\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n").encode() + authorization + b"\r\n" + body


@pytest.mark.e2e
def test_a_body_that_is_not_its_content_encoding_is_one_info_line_whoever_sends_it(start_worker):
    # The view that reads the body answers 422, one that does not 401 (no token) or 200 (a probe);
    # then aiohttp read the rest of the body and logged "Unhandled exception" at ERROR with three
    # chained tracebacks, for a request anyone can send without a token.
    worker = start_worker(LOG_LEVEL="info")
    before = len(worker.log())
    requests = [(not_its_encoding("/api/v1/clients"), b" 401 "),
                (not_its_encoding("/api/v1/clients", os.environ["ADMIN_TOKEN"]), b" 422 "),
                (not_its_encoding("/healthz"), b" 405 ")]

    for raw, status in requests:
        answer = exchange(worker.url, raw)
        assert status in answer.split(b"\r\n")[0], answer[:300]

    def unread_bodies() -> list[str]:
        return [line for line in worker.log()[before:].splitlines() if "body could not be read" in line]

    deadline = time.monotonic() + 30  # the line is written as the connection closes, after the answer
    while len(unread_bodies()) < len(requests) and time.monotonic() < deadline:
        time.sleep(0.1)
    log = worker.log()[before:]
    assert len(unread_bodies()) == len(requests), log
    assert all("[INFO]" in line and "(ContentEncodingError: Can not decode content-encoding: gzip)" in line
               for line in unread_bodies()), log
    assert "Traceback" not in log and "[ERROR]" not in log, log


def test_a_body_that_cannot_be_read_becomes_one_info_line(server_logger_at_info):
    exc = RequestPayloadError("400, message:\n  Can not decode content-encoding: gzip")
    exc.__cause__ = ContentEncodingError("Can not decode content-encoding: gzip")
    record = record_of(exc)

    assert ParserRefusalsBelowError().filter(record)
    assert (record.levelname, record.exc_info) == ("INFO", None)
    assert record.getMessage() == ("a request's body could not be read, its connection closed after the answer "
                                   "(ContentEncodingError: Can not decode content-encoding: gzip)")


def test_a_payload_error_of_the_server_itself_stays_an_error(server_logger_at_info):
    record = record_of(RequestPayloadError("no cause that is the client's"))
    assert ParserRefusalsBelowError().filter(record)
    assert record.levelno == logging.ERROR and record.exc_info is not None


def record_of(exc: BaseException, level: int = logging.ERROR) -> logging.LogRecord:
    try:
        raise exc
    except BaseException:
        return logging.LogRecord("aiohttp.server", level, __file__, 1, "Error handling request from %s",
                                 ("203.0.113.9",), sys.exc_info())


@pytest.fixture
def server_logger_at_info(caplog):
    caplog.set_level(logging.INFO, logger="aiohttp.server")


def test_a_refused_request_becomes_one_info_line_naming_what_was_refused(server_logger_at_info):
    record = record_of(BadHttpMessage("Invalid character in Content-Length:\n\n  b'Content-Length: abc'\n   ^"))

    assert ParserRefusalsBelowError().filter(record)
    assert (record.levelname, record.exc_info) == ("INFO", None)
    assert record.getMessage() == ("Error handling request from 203.0.113.9: refused with 400 (BadHttpMessage: "
                                   "Invalid character in Content-Length: b'Content-Length: abc' ^)")


def test_the_quoted_request_is_cut_short(server_logger_at_info):
    record = record_of(LineTooLong("a" * 9000, 8190))
    assert ParserRefusalsBelowError().filter(record)
    assert len(record.getMessage()) < 400


def test_a_refused_request_is_dropped_when_the_server_logger_is_above_info(caplog):
    caplog.set_level(logging.WARNING, logger="aiohttp.server")
    assert not ParserRefusalsBelowError().filter(record_of(BadHttpMessage("junk")))


@pytest.mark.parametrize("exc", [RuntimeError("a bug"), BadHttpMessage("x")])
def test_the_servers_own_errors_stay_errors_with_their_traceback(server_logger_at_info, exc):
    if isinstance(exc, BadHttpMessage):
        exc.code = 500  # a 5xx is the server's failure, whatever raised it
    record = record_of(exc)
    assert ParserRefusalsBelowError().filter(record)
    assert record.levelno == logging.ERROR and record.exc_info is not None
    assert record.getMessage() == "Error handling request from 203.0.113.9"
