"""A client that stalls while sending its body cannot hold the gate (CONTRACT §17): every route reads
or spools the whole body before it takes a slot; a `/v1` upload that stalls gets 408 and leaves no file."""

from __future__ import annotations

import contextlib
import json
import os
import select
import socket
import struct
import time
from pathlib import Path

import pytest
import requests

from tests.conftest import ACCESS_TOKEN, SECURITY_KEY
from tests.support.logpage import CHAT, CLOSE

pytestmark = pytest.mark.gunicorn

PAGES = {"Authorization": f"Bearer {ACCESS_TOKEN}", **CLOSE}
DECLARED = 1_000_000  # Content-Length the stalling clients announce
SAFETY_S = 15  # only a bound for a broken proxy; nothing here is timed
IDLE_S = 3  # OPENAI_PROXY_UPLOAD_IDLE_TIMEOUT_S where a legacy call must be answered well before it


def open_upload(server, path: str, trace_id: str, content_type: str, first_bytes: bytes,
                headers: str = f"Authorization: Bearer {SECURITY_KEY}\r\n") -> socket.socket:  # fmt: skip
    """A raw client that sends a request head announcing DECLARED bytes, then only `first_bytes`."""
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=SAFETY_S)
    head = (
        f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n{headers}Content-Type: {content_type}\r\n"
        f"Content-Length: {DECLARED}\r\nX-Request-Id: {trace_id}\r\n\r\n"
    )
    sock.sendall(head.encode() + first_bytes)
    return sock


def open_file_upload(server, trace_id: str, path: str = "/v1/files") -> socket.socket:
    part = b'--x\r\nContent-Disposition: form-data; name="purpose"\r\n\r\nassistants\r\n'
    return open_upload(server, path, trace_id, "multipart/form-data; boundary=x", part)


def read_response(sock: socket.socket) -> tuple[int, dict[str, str], bytes]:
    """Status, headers and body of one HTTP/1.1 response with a Content-Length."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, f"connection closed before a response: {data!r}"
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    while len(body) < int(headers.get("content-length", "0")):
        chunk = sock.recv(65536)
        assert chunk, "connection closed in the middle of the body"
        body += chunk
    return int(lines[0].split(" ")[1]), headers, body


def gate_in_use(server) -> int:
    r = requests.get(server.url + "/health", headers=PAGES, timeout=SAFETY_S)
    assert r.status_code == 200
    return r.json()["gate"]["inUse"]


def in_flight(server) -> float:
    text = requests.get(server.url + "/metrics", headers=PAGES, timeout=SAFETY_S).text
    return sum(
        float(line.split()[-1])
        for line in text.splitlines()
        if line.startswith("openai_proxy_requests_in_flight")
    )


def wait_until(condition, what: str) -> None:
    deadline = time.monotonic() + SAFETY_S
    while not condition():
        assert time.monotonic() < deadline, f"still waiting for {what}"
        time.sleep(0.05)


def record_of(server, trace_id: str) -> dict:
    found: list[dict] = []

    def seen() -> bool:
        for line in server.log_text().splitlines():
            if line.startswith('{"event":"completion"') and trace_id in line:
                entry = json.loads(line)
                if entry["incomingRequestId"] == trace_id:
                    found.append(entry)
                    return True
        return False

    wait_until(seen, f"the completion record of {trace_id}")
    return found[0]


def chat_ok(server) -> int:
    return requests.post(server.url + "/openai", json=CHAT, headers=CLOSE, timeout=SAFETY_S).status_code


def spool_files(server, spool_dir: Path) -> list[str]:
    """Temporary files the workers hold open in `spool_dir`: spooled bodies have no name (they are
    unlinked at once), so only the workers' descriptors show them. gunicorn's heartbeat file is not one."""
    found = []
    for pid in server.worker_pids():
        for fd in os.listdir(f"/proc/{pid}/fd"):
            with contextlib.suppress(OSError):
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
                if target.startswith(str(spool_dir)) and "wgunicorn-" not in target:
                    found.append(target)
    return found


def readable(sock: socket.socket) -> bool:
    """Whether the proxy has answered (or closed) on `sock` yet (poll: select() fails on descriptors
    past 1023, which a long test run's process reaches)."""
    poller = select.poll()
    poller.register(sock, select.POLLIN)
    return bool(poller.poll(0))


@pytest.mark.parametrize("path", ["/v1/files", "/v1/audio/transcriptions"])
def test_stalled_v1_uploads_hold_no_slot_and_get_408(gunicorn_server, fake, tmp_path, path):
    """CONTRACT §17: limit 2, two uploads stall mid-body, and a legacy call still answers 200 at once."""
    spool_dir = tmp_path / "spool"
    spool_dir.mkdir()
    server = gunicorn_server(
        workers=1,
        OPENAI_PROXY_MAX_PARALLEL_REQUESTS="2",
        OPENAI_PROXY_UPLOAD_IDLE_TIMEOUT_S=str(IDLE_S),
        OPENAI_PROXY_RUNTIME_DIR=str(tmp_path / "run"),
        TMPDIR=str(spool_dir),
    )
    # More than the proxy keeps in memory: these two bodies are being spooled to disk when they stall.
    part = b'--x\r\nContent-Disposition: form-data; name="file"; filename="a.wav"\r\n\r\n' + b"a" * 400_000
    clients = [
        open_upload(server, path, f"stall-{i}", "multipart/form-data; boundary=x", part) for i in range(2)
    ]
    try:
        wait_until(lambda: in_flight(server) >= 2, "both uploads to be in flight")
        started = time.monotonic()
        assert chat_ok(server) == 200
        answered_in = time.monotonic() - started
        # Answered while both uploads were still stalled, and within the contract's "at once".
        assert not any(readable(sock) for sock in clients)
        assert answered_in < 1.0
        assert gate_in_use(server) == 0
        wait_until(lambda: len(spool_files(server, spool_dir)) == 2, "both bodies to be spooled")
        answers = [read_response(sock) for sock in clients]
    finally:
        for sock in clients:
            sock.close()

    for status, headers, body in answers:
        assert status == 408
        assert headers["content-type"] == "application/json"
        err = json.loads(body)["error"]
        assert err["type"] == "invalid_request_error" and err["code"] == "OPENAI_PROXY_REQUEST_TIMEOUT"
        assert err["message"].startswith(f"The request body stalled: nothing arrived for {IDLE_S} s")
        assert err["param"] is None
    for i in range(2):
        record = record_of(server, f"stall-{i}")
        assert (record["status"], record["result"]) == (408, "request_timeout")
    # Nothing of them went upstream, and no spooled file is left, open or named.
    assert fake.count(path) == 0
    assert spool_files(server, spool_dir) == []
    assert os.listdir(spool_dir) == []
    assert chat_ok(server) == 200


@pytest.mark.parametrize("how", ["close", "reset"])
def test_v1_upload_whose_client_goes_away_is_cancelled_and_leaves_no_file(
    gunicorn_server, fake, tmp_path, how
):
    spool_dir = tmp_path / "spool"
    spool_dir.mkdir()
    server = gunicorn_server(
        workers=1,
        OPENAI_PROXY_MAX_PARALLEL_REQUESTS="1",
        OPENAI_PROXY_RUNTIME_DIR=str(tmp_path / "run"),
        TMPDIR=str(spool_dir),
    )
    sock = open_file_upload(server, f"gone-{how}")
    sock.sendall(b"x" * 400_000)  # past what stays in memory: on disk when the client goes
    wait_until(lambda: in_flight(server) >= 1, "the upload to be in flight")
    wait_until(lambda: len(spool_files(server, spool_dir)) == 1, "the body to be spooled")
    assert gate_in_use(server) == 0
    if how == "reset":  # RST instead of FIN: the proxy's read of the body fails with ECONNRESET
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()

    record = record_of(server, f"gone-{how}")
    assert (record["status"], record["result"], record["cancelled"]) == (499, "client_cancelled", True)
    assert fake.count("/v1/files") == 0
    assert spool_files(server, spool_dir) == [] and os.listdir(spool_dir) == []
    assert gate_in_use(server) == 0
    assert chat_ok(server) == 200


def test_routes_that_read_the_body_first_hold_no_slot_while_it_stalls(gunicorn_server, fake):
    server = gunicorn_server(
        workers=1, OPENAI_PROXY_MAX_PARALLEL_REQUESTS="1", OPENAI_PROXY_UPLOAD_IDLE_TIMEOUT_S="1"
    )
    audio_part = (
        f'--x\r\nContent-Disposition: form-data; name="security_key"\r\n\r\n{SECURITY_KEY}\r\n'
        '--x\r\nContent-Disposition: form-data; name="file"; filename="a.wav"\r\n'
        "Content-Type: audio/wav\r\n\r\nRIFF"
    ).encode()
    clients = [
        open_upload(server, "/openai", "json", "application/json", b'{"security_key": "', headers=""),
        open_upload(
            server,
            "/openai/audio/transcriptions",
            "audio",
            "multipart/form-data; boundary=x",
            audio_part,
            headers="",
        ),
        open_upload(server, "/v1/chat/completions", "v1-json", "application/json", b'{"model": "'),
    ]
    try:
        # All three are being served (their bodies are being read), none holds the one slot, and a
        # stall past the upload idle timeout does not matter to them: they cost no slot.
        wait_until(lambda: in_flight(server) >= 3, "the stalled requests to be in flight")
        time.sleep(1.5)
        assert gate_in_use(server) == 0
        assert chat_ok(server) == 200
        assert chat_ok(server) == 200
    finally:
        for sock in clients:
            sock.close()
