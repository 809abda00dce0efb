"""The container health check: `python -m alerting_app.healthcheck [live|ready|started]`.

Python itself, standard library only, so it works in any image that runs the app (the system we
replace called `wget`, which its Alpine image lacked). It asks this container's worker on
$WEB_BIND:$WEB_PORT, read in any case as the settings read them (loopback when it listens on every
address), and exits 0 when the answer is
200, 1 otherwise (ECS and Docker read only the exit code; the printed line is for `docker inspect`).
It asks the worker directly, whatever proxy the environment names (`direct_opener`).

- `live` (default): /healthz, the process is alive. Use it for the container health check: a
  worker that waits for Postgres is still healthy, and restarting it would not help.
- `ready`: /readyz, every dependency answers. Use it where traffic is routed (a load balancer's
  target group), not to decide restarts.
- `started`: /startedz, the worker has been ready at least once: a deployment's check (ECS's
  default). A release that never gets ready fails it; a dependency's outage later does not.
"""
from __future__ import annotations

import os
import sys
from collections.abc import Callable, Mapping
import urllib.error
import urllib.request

PATHS = {"live": "/healthz", "ready": "/readyz", "started": "/startedz"}
TIMEOUT_S = 5.0  # the worker's own probes answer within ~2 s


def direct_opener(*handlers: urllib.request.BaseHandler) -> urllib.request.OpenerDirector:
    """urllib without the environment's proxy, for a worker on this machine. urllib sends every
    http:// request through $HTTP_PROXY unless $NO_PROXY names the host (`localhost` there does not
    cover 127.0.0.1), and a proxy cannot reach this machine's loopback: with Docker's client configured
    with a proxy (which puts it in every container's environment), every check of a healthy worker
    failed, and ECS replaced its tasks until the deployment rolled back."""
    return urllib.request.build_opener(urllib.request.ProxyHandler({}), *handlers)


_DIRECT = direct_opener()


def get_directly(url: str, timeout: float = TIMEOUT_S) -> tuple[int, bytes]:
    """(status, body) of a GET to a worker on this machine, asked directly; OSError when no answer."""
    try:
        with _DIRECT.open(url, timeout=timeout) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:  # 503 and the like: an answer, with its body
        return exc.code, exc.read()


def probe_url(environ: Mapping[str, str], check: str) -> str:
    """The URL of this container's worker; ValueError when WEB_PORT is not a port, or WEB_PORT or
    WEB_BIND is set in two spellings with different values."""
    return worker_url(environ) + PATHS[check]


def spellings(environ: Mapping[str, str], name: str) -> dict[str, str]:
    """Each spelling of the variable `name` set in `environ` (in any case, an empty one being unset),
    with its value: as the worker's settings (pydantic-settings, case_sensitive=False) read them."""
    return {key: value for key, value in environ.items() if key.lower() == name.lower() and value != ""}


def spelling_conflict(name: str, found: Mapping[str, str], show: Callable[[str], str] | None = repr) -> str | None:
    """Why the spellings `found` of `name` are refused, or None: two set to different values. Settings
    take the last in the environment's order, which nobody sees (a compose file's, a task
    definition's, a shell's), so which value the worker ran with, and the health check asked, was
    chance. The same value twice is no question, and is taken. `show` shows a value in the message
    (None: not at all, for a secret)."""
    if len(set(found.values())) < 2:
        return None
    given = " and ".join(f"{key}={show(value)}" if show else key for key, value in found.items())
    return (f"{name.upper()}: set twice with different values, as {given}: which one counts would depend on "
            "the order of the environment; set it once")


def setting(environ: Mapping[str, str], name: str) -> str:
    """The variable `name` as the worker's settings read it from `environ`, or "" when unset;
    ValueError, naming each spelling, when two spellings are set to different values (the worker
    refuses to start then: settings.load_settings).

    Settings (pydantic-settings, case_sensitive=False) take a variable in any case, `web_port` as
    `WEB_PORT`, and an empty one as unset. Reading only WEB_PORT, the health check asked port 6066 of
    a worker told `web_port=7000`, and failed until the container was replaced.
    """
    found = spellings(environ, name)
    conflict = spelling_conflict(name, found)
    if conflict:
        raise ValueError(conflict)
    return next(iter(found.values()), "")


def worker_url(environ: Mapping[str, str]) -> str:
    """Where a worker given `environ` (WEB_BIND, WEB_PORT) answers on this machine; ValueError when
    WEB_PORT is not a port, or either is set in two spellings with different values."""
    port = setting(environ, "WEB_PORT").strip() or "6066"
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"WEB_PORT {port!r} is not a port")
    return f"http://{_probe_host(setting(environ, 'WEB_BIND'))}:{int(port)}"


def _probe_host(bind: str) -> str:
    # A worker bound to one address answers only there; bound to all, loopback is the sure one:
    # IPv4's for 0.0.0.0, IPv6's for :: (asyncio binds :: to IPv6 only).
    bind = bind.strip().removeprefix("[").removesuffix("]")
    if bind in ("", "0.0.0.0"):
        return "127.0.0.1"
    if bind == "::":
        return "[::1]"
    return f"[{bind}]" if ":" in bind else bind


def main(argv: list[str]) -> int:
    check = argv[0] if argv else "live"
    if check not in PATHS or len(argv) > 1:
        print(f"usage: python -m alerting_app.healthcheck [{'|'.join(PATHS)}]", file=sys.stderr)
        return 1  # Docker reserves exit code 2
    try:
        url = probe_url(os.environ, check)
    except ValueError as exc:
        print(f"{check}: {exc}", file=sys.stderr)
        return 1
    try:
        status, body = get_directly(url)
    except (OSError, ValueError) as exc:  # nothing listens, timeout, a WEB_BIND that is no host
        print(f"{check}: {url}: {exc}", file=sys.stderr)
        return 1
    print(f"{check}: {url}: {status} {body.decode(errors='replace')}")
    return 0 if status == 200 else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
