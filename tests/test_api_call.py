"""`alerting-app api` (alerting_app/api_call.py) against real local HTTP servers."""
from __future__ import annotations

import json
import os
import subprocess
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from alerting_app.api_call import request
from alerting_app.up import alerting_app_executable


@contextmanager
def server(answer) -> Iterator[tuple[str, list[dict]]]:
    """A local server answering every request with `answer(handler)`; yields its URL and the requests it got."""
    seen: list[dict] = []

    class Handler(BaseHTTPRequestHandler):
        def _any(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            seen.append({"method": self.command, "path": self.path, "authorization": self.headers.get("Authorization"),
                         "body": self.rfile.read(length)})
            answer(self)

        do_GET = do_POST = _any

        def log_message(self, *args) -> None:
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}", seen
    finally:
        httpd.shutdown()
        httpd.server_close()


def json_answer(status: int, body: dict):
    def answer(handler: BaseHTTPRequestHandler) -> None:
        raw = json.dumps(body).encode()
        handler.send_response(status)
        handler.send_header("Content-Type", "application/json")
        handler.send_header("Content-Length", str(len(raw)))
        handler.end_headers()
        handler.wfile.write(raw)
    return answer


def test_a_request_sends_the_body_and_the_token_and_returns_the_json_answer():
    with server(json_answer(201, {"client_id": "c1"})) as (url, seen):
        assert request("post", url + "/api/v1/clients", '{"name": "acme"}', "T0KEN") == (201, {"client_id": "c1"})
    assert seen == [{"method": "POST", "path": "/api/v1/clients", "authorization": "Bearer T0KEN",
                     "body": b'{"name": "acme"}'}]


def test_a_redirect_is_the_answer_not_followed_with_the_token():
    with server(json_answer(200, {"stolen": True})) as (elsewhere, seen_elsewhere):
        def redirect(handler: BaseHTTPRequestHandler) -> None:
            handler.send_response(302)
            handler.send_header("Location", elsewhere + "/collect")
            handler.send_header("Content-Length", "0")
            handler.end_headers()

        with server(redirect) as (url, seen):
            status, _ = request("POST", url + "/api/v1/clients", '{"name": "acme"}', "ADMIN-SECRET")

    assert status == 302  # not 2xx: the command exits 1
    assert len(seen) == 1
    assert seen_elsewhere == []  # the token went nowhere else


def test_the_command_sends_admin_token_as_the_worker_reads_it_without_a_secret_files_newline():
    # The worker drops the newline (settings.py); the command sent $ADMIN_TOKEN as given, which urllib
    # refused with "Invalid header value b'Bearer <the token>\\n'": the request failed, showing the token.
    token = "admin-token-from-a-secret-file"
    with server(json_answer(200, {"items": []})) as (url, seen):
        result = subprocess.run([alerting_app_executable(), "api", "GET", url + "/api/v1/clients"],
                                env={**os.environ, "ADMIN_TOKEN": token + "\n"}, capture_output=True, text=True,
                                timeout=120)

    assert result.returncode == 0, result.stderr
    assert [sent["authorization"] for sent in seen] == [f"Bearer {token}"]
    assert token not in result.stderr


def test_a_token_given_with_surrounding_whitespace_is_sent_without_it():
    with server(json_answer(200, {})) as (url, seen):
        assert request("GET", url + "/api/v1/clients", None, " client-key-0123456789\n")[0] == 200
    assert seen[0]["authorization"] == "Bearer client-key-0123456789"


def run_api(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([alerting_app_executable(), "api", *args], env=os.environ, capture_output=True,
                          text=True, timeout=60)


def test_a_401_to_a_request_sent_without_a_token_says_how_to_give_one():
    # A new shell after `up` has no ADMIN_TOKEN: the command sent no Authorization header and showed
    # only `HTTP 401: {"error": "unauthorized"}`, as for a wrong token.
    without_token = {name: value for name, value in os.environ.items() if name.upper() != "ADMIN_TOKEN"}
    with server(json_answer(401, {"error": "unauthorized"})) as (url, seen):
        result = subprocess.run([alerting_app_executable(), "api", "GET", url + "/api/v1/clients"],
                                env=without_token, capture_output=True, text=True, timeout=60)

    assert [sent["authorization"] for sent in seen] == [None]
    assert result.returncode == 1
    assert result.stderr.splitlines() == [
        'HTTP 401: {"error": "unauthorized"}',
        "api: no token was sent: give --token, or set ADMIN_TOKEN (`alerting-app up` prints it, and keeps it "
        "in DATA_DIR/admin-token)"], result.stderr


def test_a_url_without_http_or_https_is_refused_naming_it():
    with server(json_answer(200, {})) as (url, seen):
        without_scheme = url.removeprefix("http://") + "/api/v1/clients"  # 127.0.0.1:PORT/api/v1/clients

        for given in (without_scheme, "ftp://127.0.0.1/api/v1/clients", "file:///etc/hostname"):
            result = run_api("GET", given)

            assert result.returncode == 1
            assert result.stderr.strip() == (f"api: the URL must start with http://, https:// or / (a path on "
                                             f"this machine's worker): got {given!r}"), result.stderr
    assert seen == []


def test_a_url_nothing_answers_at_is_named_with_the_reason():
    with server(json_answer(200, {})) as (url, _):
        pass  # closed: nothing listens on its port any more

    result = run_api("GET", url + "/api/v1/clients")

    assert result.returncode == 1
    assert result.stderr.strip() == f"api failed: {url}/api/v1/clients: [Errno 111] Connection refused", result.stderr


def test_a_path_nothing_answers_at_names_the_settings_that_chose_its_port():
    # `up` started with WEB_PORT=7000, then `api GET /api/v1/...` in another shell asked 6066 and said
    # only "Connection refused".
    with server(json_answer(200, {})) as (url, _):
        pass  # closed: nothing listens on its port any more
    port = url.rsplit(":", 1)[1]
    environ = {name: value for name, value in os.environ.items() if name.upper() not in ("WEB_PORT", "WEB_BIND")}

    result = subprocess.run([alerting_app_executable(), "api", "GET", "/api/v1/clients"],
                            env={**environ, "WEB_BIND": "127.0.0.1", "WEB_PORT": port},
                            capture_output=True, text=True, timeout=60)

    assert result.returncode == 1
    assert result.stderr.strip() == (
        f"api failed: {url}/api/v1/clients: [Errno 111] Connection refused: no worker listens at this shell's "
        f"WEB_BIND and WEB_PORT; set them as the worker has them, or give the API URL `up` printed"), result.stderr


def test_a_request_to_this_machine_goes_to_it_and_any_other_through_the_environments_proxy():
    # urllib sent every http:// request through $HTTP_PROXY unless $NO_PROXY named the host (its
    # `localhost` does not cover 127.0.0.1): a proxy cannot reach this machine's loopback, so the lines
    # `up` prints, and `api GET /api/v1/...`, failed on a machine with a proxy configured.
    with server(json_answer(200, {"via": "proxy"})) as (proxy, through_proxy), \
            server(json_answer(200, {"items": []})) as (url, seen):
        port = url.rsplit(":", 1)[1]
        environment = {**os.environ, "HTTP_PROXY": proxy, "http_proxy": proxy, "NO_PROXY": "localhost",
                       "WEB_BIND": "127.0.0.1", "WEB_PORT": port}
        for given in ("/api/v1/clients", url + "/api/v1/clients", f"http://localhost:{port}/api/v1/clients"):
            result = subprocess.run([alerting_app_executable(), "api", "GET", given], env=environment,
                                    capture_output=True, text=True, timeout=60)

            assert result.returncode == 0, (given, result.stderr)
            assert json.loads(result.stdout) == {"items": []}, given
        assert len(seen) == 3 and through_proxy == []

        # Elsewhere, the proxy the environment names is used, as any HTTP client would.
        elsewhere = "http://api.example.invalid/api/v1/clients"
        result = subprocess.run([alerting_app_executable(), "api", "GET", elsewhere], env=environment,
                                capture_output=True, text=True, timeout=60)

        assert result.returncode == 0, result.stderr
        assert [sent["path"] for sent in through_proxy] == [elsewhere]
