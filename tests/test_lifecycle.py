"""The server's life: start-up settings, `/ready`, a visible drain on SIGTERM, clean reloads, and JSON for
the errors gunicorn answers itself (`openai_proxy.worker`, `gunicorn.conf.py`)."""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import gevent
import pytest
import requests
from gevent.event import Event

from openai_proxy.config import ConfigError, build_config
from openai_proxy.runtime import clear_server_stopping, mark_server_stopping
from tests.conftest import ROOT, SECURITY_KEY, base_env, free_port
from tests.support.fake_upstream import default_handler, response_events, sse
from tests.support.logpage import AUTH, CHAT, CLOSE

STREAM = {"security_key": SECURITY_KEY, "model": "gpt-4o", "input": "Write a poem.", "stream": True}
PAGES = {"OPENAI_PROXY_PAGES_RATE_LIMIT": "1000/minute"}


# ---- settings --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "says"),
    [
        ("postgresql+psycopg://proxy:hunter2@db.example/proxy", "names a driver (SQLAlchemy's form)"),
        ("redis://x", "is a redis:// URL, not a file path"),
        ("sqlite:///var/log.sqlite3", "is a sqlite:// URL, not a file path"),
    ],
)
def test_a_log_db_url_is_refused_rather_than_taken_for_a_path(value, says):
    with pytest.raises(ConfigError) as exc:
        build_config({"OPENAI_PROXY_LOG_DB": value})
    assert "OPENAI_PROXY_LOG_DB" in str(exc.value) and says in str(exc.value)
    assert "hunter2" not in str(exc.value)


@pytest.mark.parametrize("value", ["var/openai-proxy.sqlite3", "/srv/log.sqlite3", "logs/a:b.sqlite3"])
def test_a_log_db_path_is_kept(value):
    assert build_config({"OPENAI_PROXY_LOG_DB": value}).log_db == value


@pytest.mark.parametrize(
    ("env", "expected", "warned"),
    [
        ({}, 0.0, False),
        ({"OPENAI_PROXY_DRAIN_DELAY_S": "0"}, 0.0, False),
        ({"OPENAI_PROXY_DRAIN_DELAY_S": "2"}, 2.0, False),
        ({"OPENAI_PROXY_DRAIN_DELAY_S": "0.5"}, 0.5, False),
        ({"OPENAI_PROXY_DRAIN_DELAY_S": "-1"}, 0.0, True),
        ({"OPENAI_PROXY_DRAIN_DELAY_S": "soon"}, 0.0, True),
        ({"OPENAI_PROXY_DRAIN_DELAY_S": "nan"}, 0.0, True),
        # It is part of the graceful timeout: in-flight requests would get no time at all.
        ({"OPENAI_PROXY_DRAIN_DELAY_S": "60"}, 0.0, True),
        ({"OPENAI_PROXY_DRAIN_DELAY_S": "60", "OPENAI_PROXY_GRACEFUL_TIMEOUT_S": "90"}, 60.0, False),
    ],
)
def test_drain_delay_setting(env, expected, warned):
    config = build_config(env)
    assert config.drain_delay_s == expected
    assert any("OPENAI_PROXY_DRAIN_DELAY_S" in w for w in config.warnings) == warned


# ---- /ready and /health, in the app -----------------------------------------------------------------


def test_ready_is_public_and_says_draining_once_the_server_is_told_to_stop(app, client, records):
    r = client.get("/ready")
    assert r.status_code == 200 and r.get_json() == {"status": "ready"}
    assert r.headers["Cache-Control"] == "no-store" and r.mimetype == "application/json"
    assert client.head("/ready").status_code == 200
    health = client.get("/health", headers=AUTH).get_json()
    assert (health["status"], health["ready"], health["draining"]) == ("ok", True, False)

    runtime_dir = app.extensions["openai_proxy"].runtime_dir
    mark_server_stopping(runtime_dir)
    try:
        r = client.get("/ready")
        assert r.status_code == 503 and r.get_json() == {"status": "draining"}
        health = client.get("/health", headers=AUTH).get_json()
        assert (health["status"], health["ready"], health["draining"]) == ("draining", False, True)
    finally:
        clear_server_stopping(runtime_dir)
    assert client.get("/ready").status_code == 200
    assert records == []  # a balancer's checks are not API requests


# ---- SIGTERM: a drain a load balancer can see -------------------------------------------------------


@pytest.mark.gunicorn
def test_sigterm_turns_ready_503_at_once_and_lets_streams_finish(gunicorn_server, fake, tmp_path):
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    fake.push("POST", "/v1/responses", sse(response_events("gpt-4o"), gap=0.3, event_names=True), times=3)
    server = gunicorn_server(
        workers=2,
        TMPDIR=str(tmp),
        OPENAI_PROXY_GRACEFUL_TIMEOUT_S="10",
        OPENAI_PROXY_DRAIN_DELAY_S="1",
        OPENAI_PROXY_KEEPALIVE_S="30",  # an idle connection that closes was closed by the drain
        **PAGES,
    )
    _wait_for_every_worker(server, 2)
    balancer = http.client.HTTPConnection("127.0.0.1", server.port, timeout=5)
    assert _get(balancer, "/ready") == (200, {"status": "ready"}, "keep-alive")
    kept_alive = balancer.sock
    idle = http.client.HTTPConnection("127.0.0.1", server.port, timeout=5)
    assert _get(idle, "/")[0] == 200

    started = [Event() for _ in range(3)]
    streams = [gevent.spawn(_stream, server.url, first) for first in started]
    for first in started:
        assert first.wait(10), "a stream did not start"

    signalled = time.monotonic()
    server.proc.send_signal(signal.SIGTERM)
    while True:  # a balancer polling its kept-alive connection
        assert balancer.sock is kept_alive
        status, body, _ = _get(balancer, "/ready")
        if status == 503:
            break
        assert status == 200 and time.monotonic() - signalled < 0.1
        gevent.sleep(0.005)
    assert time.monotonic() - signalled < 0.1, "/ready turned 503 too late"
    assert body == {"status": "draining"}

    # During the drain delay: new connections are still served, /ready says 503, every answer closes
    # its connection, and /health says why.
    gevent.sleep(0.2)
    assert _get(balancer, "/ready") == (503, {"status": "draining"}, "close")
    health = requests.get(server.url + "/health", headers={**AUTH, **CLOSE}, timeout=5).json()
    assert (health["status"], health["draining"]) == ("draining", True)

    # Then the listeners close, and idle keep-alive connections with them (not after 30 s).
    idle.sock.settimeout(5)
    assert idle.sock.recv(1) == b""
    assert 0.8 < time.monotonic() - signalled < 2.5
    _until_refused(server.port, signalled, within=2.5)

    # In-flight streams finish, each with its [DONE].
    gevent.joinall(streams, timeout=15, raise_error=True)
    request_ids = []
    for job in streams:
        request_id, lines = job.value
        assert lines[-1] == "data: [DONE]", lines[-3:]
        assert any('"type":"response.completed"' in line for line in lines)
        request_ids.append(request_id)
    assert server.proc.wait(timeout=10) == 0
    assert time.monotonic() - signalled < 10, "the server outlived its graceful timeout"

    # The records were flushed before the workers exited, and the runtime dir is gone.
    with sqlite3.connect(tmp_path / "openai-proxy.sqlite3") as db:
        rows = db.execute(
            f"SELECT request_id, status, endpoint FROM records WHERE request_id IN ({','.join('?' * 3)})",
            request_ids,
        ).fetchall()
    assert sorted(rows) == sorted((rid, 200, "/openai2") for rid in request_ids)
    assert list(tmp.glob("openai-proxy-*")) == []


def _stream(url: str, first: Event) -> tuple[str, list[str]]:
    with requests.post(url + "/openai2", json=STREAM, headers=CLOSE, stream=True, timeout=30) as r:
        assert r.status_code == 200 and r.headers["Content-Type"] == "text/event-stream"
        lines = []
        for line in r.iter_lines(decode_unicode=True):
            if line:
                lines.append(line)
                first.set()
        return r.headers["X-Proxy-Request-Id"], lines


def _get(conn: http.client.HTTPConnection, path: str) -> tuple[int, object, str | None]:
    conn.request("GET", path)
    response = conn.getresponse()
    body = response.read()
    is_json = response.getheader("Content-Type") == "application/json"
    return response.status, json.loads(body) if is_json else body, response.getheader("Connection")


def _wait_for_every_worker(server, workers: int) -> None:
    """Until each worker has answered (a worker still booting when the test signals would not drain)."""
    seen: set[int] = set()
    deadline = time.monotonic() + 30
    while len(seen) < workers:
        assert time.monotonic() < deadline, f"only workers {seen} answer"
        seen.add(requests.get(server.url + "/health", headers={**AUTH, **CLOSE}, timeout=5).json()["pid"])


# ---- SIGHUP: new workers, the same runtime dir --------------------------------------------------------


@pytest.mark.gunicorn
def test_reload_keeps_the_runtime_dir_and_the_gate_and_the_exit_removes_it(gunicorn_server, fake, tmp_path):
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    release = Event()

    def held(req, conn):
        while not release.is_set():
            conn.wait(0.05)
        default_handler(req, conn)

    fake.push("POST", "/v1/chat/completions", held)
    server = gunicorn_server(
        workers=1,
        TMPDIR=str(tmp),
        OPENAI_PROXY_MAX_PARALLEL_REQUESTS="1",
        OPENAI_PROXY_GRACEFUL_TIMEOUT_S="20",
        **PAGES,
    )
    before = _runtime(server.url)
    runtime_dir = before["config"]["runtime_dir"]
    assert [str(p) for p in tmp.glob("openai-proxy-*")] == [runtime_dir]

    # The old worker holds the only gate slot through the reload.
    in_flight = gevent.spawn(requests.post, server.url + "/openai", json=CHAT, headers=CLOSE, timeout=30)
    _until(lambda: _health(server.url)["gate"]["inUse"] == 1)
    server.proc.send_signal(signal.SIGHUP)
    _until(lambda: _runtime(server.url)["pid"] != before["pid"], timeout=30)

    after = _runtime(server.url)
    assert after["config"]["runtime_dir"] == runtime_dir
    assert [str(p) for p in tmp.glob("openai-proxy-*")] == [runtime_dir]
    assert requests.get(server.url + "/ready", headers=CLOSE, timeout=5).status_code == 200  # not a stop
    # The new worker counts the old worker's slot: the bound still holds for the whole server.
    r = requests.post(server.url + "/openai", json=CHAT, headers=CLOSE, timeout=10)
    assert r.status_code == 503 and r.json()["error"]["code"] == "OPENAI_PROXY_OVERLOADED"
    release.set()
    assert in_flight.get(timeout=10).status_code == 200
    _until(lambda: before["pid"] not in server.worker_pids())
    assert requests.post(server.url + "/openai", json=CHAT, headers=CLOSE, timeout=10).status_code == 200

    # SIGTERM with no drain delay: new connections are refused at once, and the directory goes.
    signalled = time.monotonic()
    server.proc.send_signal(signal.SIGTERM)
    _until_refused(server.port, signalled, within=0.5)
    assert server.proc.wait(timeout=10) == 0
    assert list(tmp.glob("openai-proxy-*")) == []


def _runtime(url: str) -> dict:
    # A long timeout: after a reload, connections wait in the backlog until the new worker has booted.
    return requests.get(url + "/debug/runtime", headers={**AUTH, **CLOSE}, timeout=30).json()


def _health(url: str) -> dict:
    return requests.get(url + "/health", headers={**AUTH, **CLOSE}, timeout=5).json()


def _until_refused(port: int, signalled: float, within: float) -> None:
    """Until every worker has closed its listeners (each on its own signal, so they may differ by ms)."""
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
        except (ConnectionRefusedError, ConnectionResetError):
            # Reset: the connection reached the backlog of a listener that closed before accepting it.
            return
        assert time.monotonic() - signalled < within, "still accepting connections"
        gevent.sleep(0.005)


def _until(condition, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        gevent.sleep(0.1)


# ---- gunicorn's own errors, as JSON -----------------------------------------------------------------


@pytest.fixture(scope="module")
def server(module_gunicorn):
    return module_gunicorn(workers=1)


BIG_HEADER = b"X-Big: " + b"a" * 9216 + b"\r\n"


@pytest.mark.gunicorn
@pytest.mark.parametrize(
    ("raw", "status", "shape"),
    [
        pytest.param(b"POST /openai HTTP/1.1\r\nHost: x\r\n" + BIG_HEADER + b"\r\n", 431, "legacy", id="431"),
        pytest.param(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n" + BIG_HEADER + b"\r\n",
            431,
            "openai",
            id="431-v1",
        ),
        pytest.param(b"GARBAGE\r\n\r\n", 400, "legacy", id="bad-request-line"),
        # Too long to be read, so the path is unknown: the legacy shape even under /v1.
        pytest.param(b"GET /v1/" + b"a" * 9216 + b" HTTP/1.1\r\nHost: x\r\n\r\n", 414, "legacy", id="414"),
        pytest.param(
            b"GET /v1/models HTTP/1.1\r\nHost: x\r\nBad Name: y\r\n\r\n", 400, "openai", id="header-v1"
        ),
        pytest.param(
            b"POST /v1/responses HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: br, chunked\r\n\r\n",
            501,
            "openai",
            id="501-v1",
        ),
    ],
)
def test_errors_gunicorn_answers_itself_are_json(server, raw, status, shape):
    head, body = _raw_exchange(server.port, raw)
    lines = head.decode("latin-1").split("\r\n")
    assert lines[0].startswith(f"HTTP/1.1 {status} "), lines[0]
    headers = {k.lower(): v for k, _, v in (line.partition(": ") for line in lines[1:])}
    assert headers["content-type"] == "application/json"
    assert headers["access-control-allow-origin"] == "*"
    request_id = headers["x-proxy-request-id"]
    error = json.loads(body)["error"]
    assert set(json.loads(body)) == {"error"}
    if shape == "legacy":
        assert error["requestId"] == request_id and error["message"]
        expected = "OPENAI_PROXY_BAD_REQUEST" if status < 500 or status == 501 else "OPENAI_PROXY_INTERNAL"
        assert (error["type"], error["code"]) == ("validation_error", expected)
    else:
        assert set(error) == {"message", "type", "param", "code"}
        assert error["type"] == "invalid_request_error" and request_id in error["message"]


def _raw_exchange(port: int, data: bytes) -> tuple[bytes, bytes]:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(data)
        received = b""
        while chunk := sock.recv(65536):
            received += chunk
    head, _, body = received.partition(b"\r\n\r\n")
    return head, body


# ---- start-up -------------------------------------------------------------------------------------


def _start(tmp_path: Path, fake, args: list[str], *, cwd: Path = ROOT, **env: str) -> subprocess.Popen:
    """gunicorn by hand: the fixture names the app and the bind itself, these tests must not."""
    inherited = {
        k: v for k, v in os.environ.items() if not k.startswith(("OPENAI_", "SECURITY_KEY", "ACCESS_TOKEN"))
    }
    full_env = {**inherited, **base_env(fake), "OPENAI_PROXY_WORKERS": "1", "PORT": str(free_port()),
                "OPENAI_PROXY_LOG_DB": str(tmp_path / "log.sqlite3"), **env}  # fmt: skip
    log = open(tmp_path / "gunicorn.log", "wb")  # noqa: SIM115 - closed with the process
    proc = subprocess.Popen(
        [sys.executable, "-m", "gunicorn", "-c", str(ROOT / "gunicorn.conf.py"), *args],
        cwd=cwd,
        env=full_env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    proc.log_file = log  # type: ignore[attr-defined]
    return proc


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    proc.log_file.close()  # type: ignore[attr-defined]


@pytest.mark.gunicorn
def test_the_config_file_alone_starts_the_app_and_the_log_names_the_real_bind(tmp_path, fake):
    port = free_port()
    proc = _start(tmp_path, fake, ["-b", f"127.0.0.1:{port}"])  # no app argument
    try:
        deadline = time.monotonic() + 30
        while True:
            assert proc.poll() is None, (tmp_path / "gunicorn.log").read_text()
            assert time.monotonic() < deadline, (tmp_path / "gunicorn.log").read_text()
            try:
                if requests.get(f"http://127.0.0.1:{port}/", headers=CLOSE, timeout=1).status_code == 200:
                    break
            except requests.RequestException:
                gevent.sleep(0.1)
        log = (tmp_path / "gunicorn.log").read_text()
        assert f"openai-proxy listening on http://127.0.0.1:{port} with 1 gevent workers" in log, log
        assert "0.0.0.0" not in log
    finally:
        _stop(proc)


@pytest.mark.gunicorn
def test_a_bad_postgresql_log_db_stops_the_server_with_a_clear_message(tmp_path, fake):
    url = "postgresql://proxy:hunter2@db/proxy?sslmod=require"  # a typo libpq would refuse much later
    proc = _start(tmp_path, fake, [], cwd=tmp_path, OPENAI_PROXY_LOG_DB=url)
    try:
        returncode = proc.wait(timeout=30)
    finally:
        _stop(proc)
    log = (tmp_path / "gunicorn.log").read_text()
    assert returncode != 0, log
    assert (
        "openai-proxy cannot start: OPENAI_PROXY_LOG_DB='postgresql://db/proxy?sslmod=require': "
        "unknown connection parameter(s): sslmod" in log
    ), log
    assert "hunter2" not in log
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gunicorn.log"]  # no `postgresql:` folder
