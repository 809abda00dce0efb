"""The health-check command finds the worker wherever WEB_BIND and WEB_PORT put it: IPv6 addresses,
padded values, and loopback when the worker listens on every address."""
from __future__ import annotations

import http.server
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator

import pytest

from alerting_app.healthcheck import probe_url


@pytest.mark.parametrize(("env", "url"), [
    ({"WEB_BIND": "::1", "WEB_PORT": "7001"}, "http://[::1]:7001/healthz"),
    ({"WEB_BIND": "[fd00::7]", "WEB_PORT": "7001"}, "http://[fd00::7]:7001/healthz"),
    ({"WEB_BIND": "::", "WEB_PORT": "7001"}, "http://[::1]:7001/healthz"),
    ({"WEB_BIND": " 0.0.0.0 ", "WEB_PORT": " 7001 "}, "http://127.0.0.1:7001/healthz"),
    ({"WEB_BIND": " 10.0.3.7\n", "WEB_PORT": "7001\n"}, "http://10.0.3.7:7001/healthz"),
    ({"WEB_BIND": "", "WEB_PORT": ""}, "http://127.0.0.1:6066/healthz"),
])
def test_the_probe_url_is_a_valid_url_for_every_bind_address(env, url):
    assert probe_url(env, "live") == url


@pytest.mark.parametrize("port", ["http", "0", "70000", "6066.0"])
def test_a_bad_web_port_fails_the_check_naming_it(port):
    result = _health_check(WEB_PORT=port)

    assert result.returncode == 1
    assert "WEB_PORT" in result.stderr and repr(port.strip()) in result.stderr


class _Healthy(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802  (http.server's name)
        self.send_response(200 if self.path == "/healthz" else 404)
        self.end_headers()
        self.wfile.write(b'{"status": "alive"}')

    def log_message(self, *args: object) -> None:
        pass


class _IPv6Server(http.server.ThreadingHTTPServer):
    address_family = socket.AF_INET6


def _serving(server: http.server.HTTPServer) -> Iterator[int]:
    """Serve in a thread until the test ends; yields the server's port."""
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture
def ipv6_worker() -> Iterator[int]:
    """A stand-in for a worker's /healthz, listening on [::1] only; yields its port."""
    yield from _serving(_IPv6Server(("::1", 0), _Healthy))


@pytest.mark.parametrize("bind", ["::1", "::", " ::1 "])
def test_the_check_passes_against_a_worker_listening_on_ipv6(ipv6_worker, bind):
    result = _health_check(WEB_BIND=bind, WEB_PORT=f" {ipv6_worker} ")

    assert result.returncode == 0, result.stderr
    assert f"[::1]:{ipv6_worker}/healthz: 200" in result.stdout


def _health_check(**env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "alerting_app.healthcheck"],
                          env={"PATH": "/usr/bin:/bin", **env}, capture_output=True, text=True, timeout=60)


class _Proxy(http.server.BaseHTTPRequestHandler):
    """A forward proxy that reaches nothing: what a proxy does with a request for its own loopback."""
    seen: list[str] = []

    def do_GET(self) -> None:  # noqa: N802  (http.server's name)
        _Proxy.seen.append(self.path)
        self.send_response(502)
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def proxy() -> Iterator[str]:
    """An HTTP proxy on this machine, as Docker puts one in every container's environment when the
    Docker client is configured with one (HTTP_PROXY, http_proxy); yields its URL."""
    _Proxy.seen = []
    for port in _serving(http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Proxy)):
        yield f"http://127.0.0.1:{port}"


@pytest.fixture
def ipv4_worker() -> Iterator[int]:
    """A stand-in for a worker's /healthz on 127.0.0.1; yields its port."""
    yield from _serving(http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Healthy))


def test_the_check_asks_the_worker_itself_whatever_proxy_the_environment_names(ipv4_worker, proxy):
    # urllib sends every http:// request through $HTTP_PROXY unless $NO_PROXY names the host, and
    # `localhost` there does not cover 127.0.0.1: a proxy cannot reach the container's loopback, so
    # every check of a healthy worker failed ("Connection refused", naming the worker's URL).
    result = _health_check(WEB_PORT=str(ipv4_worker), HTTP_PROXY=proxy, http_proxy=proxy, NO_PROXY="localhost")

    assert result.returncode == 0, result.stderr
    assert f"127.0.0.1:{ipv4_worker}/healthz: 200" in result.stdout
    assert _Proxy.seen == []


def test_an_answer_other_than_200_fails_the_check_showing_its_status_and_body(ipv4_worker):
    # The stand-in serves /healthz only: its 404 for /readyz is what another process on WEB_PORT, not
    # our worker, would answer. Only a 200 passes; the line shows what did answer, for `docker inspect`.
    result = subprocess.run([sys.executable, "-m", "alerting_app.healthcheck", "ready"],
                            env={"PATH": "/usr/bin:/bin", "WEB_PORT": str(ipv4_worker)}, capture_output=True,
                            text=True, timeout=60)

    assert result.returncode == 1
    assert result.stdout == f'ready: http://127.0.0.1:{ipv4_worker}/readyz: 404 {{"status": "alive"}}\n'
