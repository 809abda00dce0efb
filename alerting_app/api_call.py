"""`alerting-app api`: one request to a worker's REST API, with Python alone.

What `up` prints to try the platform uses it rather than curl, which slim images and fresh machines
may not have (the system we replace failed its health checks on exactly that: a tool the image
lacked).
"""
from __future__ import annotations

import ipaddress
import json
import re
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterable, Mapping
from typing import Any, NamedTuple

from alerting_app.healthcheck import direct_opener, worker_url

METHODS = ("GET", "POST", "PUT", "PATCH", "DELETE")

# RFC 9110 5.1: a field name is a token; 5.5: a value is visible ASCII, spaces and tabs (urllib sends a
# value as Latin-1, and a line break in one would start another header).
_FIELD_NAME = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
_FIELD_VALUE = re.compile(r"[\x20-\x7e\t]*")


class Answer(NamedTuple):
    status: int
    body: Any  # its JSON, or its text when it is not JSON, or None when empty
    etag: str | None  # the ETag header, when there is one


def parse_headers(given: Iterable[str]) -> dict[str, str]:
    """`-H 'Name: value'` options as headers; a name given more than once is one list, its values joined
    with ", " (RFC 9110 5.3: as the API reads several If-Match lines). ValueError naming the one
    that is not a header."""
    headers: dict[str, str] = {}
    names: dict[str, str] = {}  # lower-cased: the first spelling given
    for text in given:
        name, colon, value = text.partition(":")
        name, value = name.strip(), value.strip()
        if not colon or not _FIELD_NAME.fullmatch(name):
            raise ValueError(f"{text!r} is not a header: give it as 'Name: value' (e.g. 'If-Match: \"<etag>\"')")
        if not _FIELD_VALUE.fullmatch(value):
            raise ValueError(f"the value of {name} holds a character a header cannot carry (only printable ASCII, "
                             f"spaces and tabs)")
        name = names.setdefault(name.lower(), name)
        headers[name] = f"{headers[name]}, {value}" if name in headers else value
    return headers


def target(url_or_path: str, environ: Mapping[str, str]) -> str:
    """A full URL as it is; a path (`/api/v1/clients`) on this machine's worker (WEB_BIND, WEB_PORT)."""
    if url_or_path.startswith("/"):
        return worker_url(environ) + url_or_path
    # Without a scheme urllib said "unknown url type: localhost"; with ftp:// or file:// it would
    # have fetched that, not asked an API.
    if urllib.parse.urlsplit(url_or_path).scheme.lower() not in ("http", "https") or "://" not in url_or_path:
        raise ValueError(f"the URL must start with http://, https:// or / (a path on this machine's worker): "
                         f"got {url_or_path!r}")
    return url_or_path


class _NoRedirects(urllib.request.HTTPRedirectHandler):
    # urllib would follow a redirect with our Authorization header to whatever host it names, and
    # turn a POST into a GET that "succeeds": a 3xx is the answer, shown and exiting 1 like a 4xx.
    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None


_opener = urllib.request.build_opener(_NoRedirects)
# A worker on this machine is asked directly: a proxy the environment names cannot reach its loopback
# (healthcheck.direct_opener). Any other URL goes through that proxy, as with any HTTP client.
_direct = direct_opener(_NoRedirects)


def on_this_machine(url: str) -> bool:
    """Is the URL's host this machine's loopback (localhost, 127.0.0.0/8, ::1)?"""
    host = (urllib.parse.urlsplit(url).hostname or "").rstrip(".").lower()
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def request(method: str, url: str, body: str | None, token: str | None, timeout_s: float = 30.0,
            direct: bool = False, headers: Mapping[str, str] | None = None) -> Answer:
    """The answer to one request. `direct`, or a URL on this machine's loopback: without the environment's
    proxy. `headers` (parse_headers) are sent too, in place of the command's own of the same name
    (Content-Type, Accept, Authorization)."""
    if body is not None:
        try:
            json.loads(body)
        except ValueError as exc:
            raise ValueError(f"the body is not JSON: {exc}") from None
    sent = {"Content-Type": "application/json", "Accept": "application/json"}
    # Surrounding whitespace dropped, as the worker drops it from the tokens it is given: a line
    # break cannot go into a header (urllib refused it with an error that showed the token).
    token = token.strip() if token else token
    if token:
        sent["Authorization"] = f"Bearer {token}"
    given = dict(headers or {})
    sent = {name: value for name, value in sent.items() if name.lower() not in {n.lower() for n in given}}
    call = urllib.request.Request(url, data=None if body is None else body.encode(), method=method.upper(),
                                  headers={**sent, **given})
    try:
        with (_direct if direct or on_this_machine(url) else _opener).open(call, timeout=timeout_s) as response:
            status, raw, etag = response.status, response.read(), response.headers.get("ETag")
    except urllib.error.HTTPError as exc:  # 3xx (a 304 too), 4xx and 5xx: an answer, with its body
        status, raw, etag = exc.code, exc.read(), exc.headers.get("ETag")
    except urllib.error.URLError as exc:  # no answer: said with the URL, not as "<urlopen error ...>"
        refused = isinstance(exc.reason, ConnectionRefusedError)
        raise (ConnectionRefusedError if refused else OSError)(f"{url}: {exc.reason}") from None
    except TimeoutError:
        raise OSError(f"{url}: no answer within {timeout_s:.0f}s") from None
    if not raw:
        return Answer(status, None, etag)
    text = raw.decode(errors="replace")
    try:
        return Answer(status, json.loads(text), etag)
    except ValueError:
        return Answer(status, text, etag)
