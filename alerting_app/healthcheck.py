"""The container health check: `python -m alerting_app.healthcheck [live|ready]`.

Python itself, standard library only, so it works in any image that runs the app (the system we
replace called `wget`, which its Alpine image lacked). It asks this container's worker on
127.0.0.1:$WEB_PORT and exits 0 when the answer is 200, 1 otherwise (ECS and Docker read only
the exit code; the printed line is for `docker inspect`).

- `live` (default): /healthz, the process is alive. Use it for the container health check: a
  worker that waits for Postgres is still healthy, and restarting it would not help.
- `ready`: /readyz, every dependency answers. Use it where traffic is routed (a load balancer's
  target group), not to decide restarts.
"""
from __future__ import annotations

import os
import sys
from collections.abc import Mapping
import urllib.error
import urllib.request

PATHS = {"live": "/healthz", "ready": "/readyz"}
TIMEOUT_S = 5.0  # the worker's own probes answer within ~2 s


def probe_url(environ: Mapping[str, str], check: str) -> str:
    port = environ.get("WEB_PORT") or "6066"
    # A worker bound to one address answers only there; bound to all, loopback is the sure one.
    bind = environ.get("WEB_BIND") or "0.0.0.0"
    host = "127.0.0.1" if bind in ("0.0.0.0", "::", "") else bind
    return f"http://{host}:{port}{PATHS[check]}"


def main(argv: list[str]) -> int:
    check = argv[0] if argv else "live"
    if check not in PATHS or len(argv) > 1:
        print(f"usage: python -m alerting_app.healthcheck [{'|'.join(PATHS)}]", file=sys.stderr)
        return 1  # Docker reserves exit code 2
    url = probe_url(os.environ, check)
    try:
        with urllib.request.urlopen(url, timeout=TIMEOUT_S) as response:
            status, body = response.status, response.read()
    except urllib.error.HTTPError as exc:  # 503 and the like: an answer, with its body
        status, body = exc.code, exc.read()
    except (OSError, ValueError) as exc:  # nothing listens, timeout, bad WEB_PORT
        print(f"{check}: {url}: {exc}", file=sys.stderr)
        return 1
    print(f"{check}: {url}: {status} {body.decode(errors='replace')}")
    return 0 if status == 200 else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
