"""`alerting-app api` (alerting_app/api_call.py) against real local HTTP servers."""
from __future__ import annotations

import json
import os
import subprocess
import threading
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from alerting_app.api_call import request
from alerting_app.up import alerting_app_executable
from web.errors import NO_TOKEN


@contextmanager
def server(answer) -> Iterator[tuple[str, list[dict]]]:
    """A local server answering every request with `answer(handler)`; yields its URL and the requests it got."""
    seen: list[dict] = []

    class Handler(BaseHTTPRequestHandler):
        def _any(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            seen.append({"method": self.command, "path": self.path, "authorization": self.headers.get("Authorization"),
                         "body": self.rfile.read(length), "headers": self.headers})
            answer(self)

        do_GET = do_POST = do_PATCH = do_DELETE = _any

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


def json_answer(status: int, body: dict, etag: str | None = None):
    def answer(handler: BaseHTTPRequestHandler) -> None:
        raw = json.dumps(body).encode()
        handler.send_response(status)
        if etag is not None:
            handler.send_header("ETag", etag)
        handler.send_header("Content-Type", "application/json")
        handler.send_header("Content-Length", str(len(raw)))
        handler.end_headers()
        handler.wfile.write(raw)
    return answer


def test_a_request_sends_the_body_and_the_token_and_returns_the_json_answer():
    with server(json_answer(201, {"client_id": "c1"})) as (url, seen):
        assert request("post", url + "/api/v1/clients", '{"name": "acme"}', "T0KEN")[:2] == (201, {"client_id": "c1"})
    assert [{name: value for name, value in sent.items() if name != "headers"} for sent in seen] == [
        {"method": "POST", "path": "/api/v1/clients", "authorization": "Bearer T0KEN", "body": b'{"name": "acme"}'}]


def test_a_redirect_is_the_answer_not_followed_with_the_token():
    with server(json_answer(200, {"stolen": True})) as (elsewhere, seen_elsewhere):
        def redirect(handler: BaseHTTPRequestHandler) -> None:
            handler.send_response(302)
            handler.send_header("Location", elsewhere + "/collect")
            handler.send_header("Content-Length", "0")
            handler.end_headers()

        with server(redirect) as (url, seen):
            status = request("POST", url + "/api/v1/clients", '{"name": "acme"}', "ADMIN-SECRET").status

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
    with server(json_answer(401, {"error": "unauthorized", "message": NO_TOKEN})) as (url, seen):
        result = subprocess.run([alerting_app_executable(), "api", "GET", url + "/api/v1/clients"],
                                env=without_token, capture_output=True, text=True, timeout=60)

    assert [sent["authorization"] for sent in seen] == [None]
    assert result.returncode == 1
    assert result.stderr.splitlines() == [
        f'HTTP 401: {{"error": "unauthorized", "message": "{NO_TOKEN}"}}',
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


def test_headers_given_with_h_are_sent_and_the_answers_etag_is_shown_on_stderr_beside_the_json():
    # docs/api.md's If-Match and If-None-Match examples needed curl: the command sent no header of
    # the caller's, and showed no ETag to name in one.
    with server(json_answer(200, {"rule_id": "r1"}, etag='"v2"')) as (url, seen):
        result = run_api("PATCH", url + "/api/v1/rules/r1", '{"enabled": false}', "--token", "client-key-0123456789",
                         "-H", 'If-Match: "v1"', "--header", "X-Request-Id:  trace-1 ")

    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == {"rule_id": "r1"}  # standard output: the JSON answer alone, as before
    assert result.stderr.splitlines() == ['ETag: "v2"']
    [sent] = seen
    assert (sent["headers"]["If-Match"], sent["headers"]["X-Request-Id"]) == ('"v1"', "trace-1")
    assert sent["authorization"] == "Bearer client-key-0123456789"
    assert sent["headers"]["Content-Type"] == "application/json"


def test_a_header_given_twice_is_sent_as_one_list_and_an_authorization_header_replaces_the_token():
    with server(json_answer(204, {})) as (url, seen):
        result = run_api("DELETE", url + "/api/v1/rules/r1", "--token", "client-key-0123456789",
                         "-H", 'If-Match: "v1"', "-H", 'if-match: "v2"', "-H", "Authorization: Bearer other-key")

    assert result.returncode == 0, result.stderr
    [sent] = seen
    assert sent["headers"].get_all("If-Match") == ['"v1", "v2"']
    assert sent["headers"].get_all("Authorization") == ["Bearer other-key"]


def test_with_field_only_the_field_is_printed_not_the_etag():
    with server(json_answer(201, {"client_id": "c1", "api_key": "k"}, etag='"v1"')) as (url, _):
        result = run_api("POST", url + "/api/v1/clients", '{"name": "acme"}', "--field", "api_key")

    assert (result.returncode, result.stdout, result.stderr) == (0, "k\n", "")


def test_a_304_to_an_if_none_match_says_not_modified_and_exits_0():
    def not_modified(handler: BaseHTTPRequestHandler) -> None:
        handler.send_response(304)
        handler.send_header("ETag", '"v1"')
        handler.end_headers()

    with server(not_modified) as (url, seen):
        result = run_api("GET", url + "/api/v1/rules/r1", "-H", 'If-None-Match: "v1"')

    assert seen[0]["headers"]["If-None-Match"] == '"v1"'
    assert (result.returncode, result.stdout) == (0, ""), result.stderr
    assert result.stderr.splitlines() == [
        "HTTP 304: not modified (the resource still has the ETag If-None-Match names)", 'ETag: "v1"']


def test_a_malformed_header_is_a_usage_error_naming_it_and_nothing_is_sent():
    with server(json_answer(200, {})) as (url, seen):
        results = {given: run_api("GET", url + "/api/v1/clients", "-H", given)
                   for given in ("If-Match", 'If Match: "v1"', ': "v1"', "If-Match: \"v1\"\nX-Other: 1",
                                 'If-Match: "v\u00e9"')}

    assert seen == []
    for given, result in results.items():
        assert result.returncode == 2, (given, result.stderr)
        [error] = [line for line in result.stderr.splitlines() if line.startswith("Error: ")]
        assert error.startswith("Error: Invalid value for '-H' / '--header': "), error
        if "\n" in given or "\u00e9" in given:
            assert error.endswith("holds a character a header cannot carry (only printable ASCII, spaces and tabs)")
        else:
            assert error.endswith(f"{given!r} is not a header: give it as 'Name: value' (e.g. 'If-Match: \"<etag>\"')")


@pytest.mark.e2e
def test_the_etag_examples_of_docs_api_md_run_against_a_worker_with_this_command_alone(start_worker):
    # docs/api.md: read a rule's ETag, ask again with If-None-Match (304), change it with If-Match,
    # then delete it with the ETag the change gave, a stale one refused 412.
    worker = start_worker(APP_ID=f"api-call-{uuid.uuid4().hex[:8]}", ROLES="api")
    api = worker.url + "/api/v1"
    key = run_api("POST", api + "/clients", json.dumps({"name": f"etag-{uuid.uuid4()}"}), "--field", "api_key")
    assert key.returncode == 0, key.stderr
    token = ("--token", key.stdout.strip())
    rule_id = run_api("POST", api + "/rules", '{"severity": "HIGH", "source": "etag-docs", "name": "*"}', *token,
                      "--field", "rule_id").stdout.strip()

    read = run_api("GET", f"{api}/rules/{rule_id}", *token)
    [etag_line] = read.stderr.splitlines()
    etag = etag_line.removeprefix("ETag: ")
    assert json.loads(read.stdout)["rule_id"] == rule_id and etag.startswith('"'), read.stderr

    unchanged = run_api("GET", f"{api}/rules/{rule_id}", *token, "-H", f"If-None-Match: {etag}")
    assert (unchanged.returncode, unchanged.stdout) == (0, ""), unchanged.stderr
    assert unchanged.stderr.splitlines()[0].startswith("HTTP 304: not modified")

    changed = run_api("PATCH", f"{api}/rules/{rule_id}", '{"enabled": false}', *token, "-H", f"If-Match: {etag}")
    assert changed.returncode == 0, changed.stderr
    assert json.loads(changed.stdout)["enabled"] is False
    new_etag = changed.stderr.splitlines()[0].removeprefix("ETag: ")
    assert new_etag != etag

    stale = run_api("DELETE", f"{api}/rules/{rule_id}", *token, "-H", f"If-Match: {etag}")
    assert stale.returncode == 1 and stale.stderr.startswith('HTTP 412: {"error": "precondition_failed"'), stale.stderr
    deleted = run_api("DELETE", f"{api}/rules/{rule_id}", *token, "-H", f"If-Match: {new_etag}")
    assert (deleted.returncode, deleted.stdout) == (0, ""), deleted.stderr
