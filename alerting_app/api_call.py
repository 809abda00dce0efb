"""`alerting-app api`: one request to a worker's REST API, with Python alone.

What `up` prints to try the platform uses it rather than curl, which slim images and fresh machines
may not have (the system we replace failed its health checks on exactly that: a tool the image
lacked).
"""
from __future__ import annotations

import ipaddress
import json
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Mapping
from typing import Any

from alerting_app.healthcheck import direct_opener, worker_url

METHODS = ("GET", "POST", "PUT", "PATCH", "DELETE")


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
            direct: bool = False) -> tuple[int, Any]:
    """(status, the answer's JSON, or its text when it is not JSON, or None when empty). `direct`, or a
    URL on this machine's loopback: without the environment's proxy."""
    if body is not None:
        try:
            json.loads(body)
        except ValueError as exc:
            raise ValueError(f"the body is not JSON: {exc}") from None
    headers = {"Content-Type": "application/json", "Accept": "application/json"}
    # Surrounding whitespace dropped, as the worker drops it from the tokens it is given: a line
    # break cannot go into a header (urllib refused it with an error that showed the token).
    token = token.strip() if token else token
    if token:
        headers["Authorization"] = f"Bearer {token}"
    call = urllib.request.Request(url, data=None if body is None else body.encode(), method=method.upper(),
                                  headers=headers)
    try:
        with (_direct if direct or on_this_machine(url) else _opener).open(call, timeout=timeout_s) as response:
            status, raw = response.status, response.read()
    except urllib.error.HTTPError as exc:  # 3xx, 4xx and 5xx: an answer, with its body
        status, raw = exc.code, exc.read()
    except urllib.error.URLError as exc:  # no answer: said with the URL, not as "<urlopen error ...>"
        refused = isinstance(exc.reason, ConnectionRefusedError)
        raise (ConnectionRefusedError if refused else OSError)(f"{url}: {exc.reason}") from None
    except TimeoutError:
        raise OSError(f"{url}: no answer within {timeout_s:.0f}s") from None
    if not raw:
        return status, None
    text = raw.decode(errors="replace")
    try:
        return status, json.loads(text)
    except ValueError:
        return status, text
