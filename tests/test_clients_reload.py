"""The clients file under gunicorn: checked at start, reloaded by SIGHUP, a bad reload keeps the old."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
import requests

from tests.conftest import ROOT, base_env, free_port

pytestmark = pytest.mark.gunicorn

CHAT = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}


def entry(name: str, key: str) -> str:
    return f'[[client]]\nname = "{name}"\nkey = "{key}"\n\n'


def status_with(server, key: str) -> int:
    return requests.post(
        server.url + "/openai", json=CHAT, headers={"X-Security-Key": key}, timeout=60
    ).status_code


def wait_for(predicate, what: str, deadline_s: float = 30.0) -> None:
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def test_sighup_reloads_and_a_bad_file_keeps_the_old_clients(gunicorn_server, fake, tmp_path):
    path = tmp_path / "clients.toml"
    path.write_text(entry("alpha", "alpha-key-0123456789"))
    server = gunicorn_server(workers=2, OPENAI_PROXY_CLIENTS_FILE=str(path))
    assert status_with(server, "alpha-key-0123456789") == 200
    assert status_with(server, "beta-key-0123456789") == 403

    path.write_text(entry("alpha", "alpha-key-0123456789") + entry("beta", "beta-key-0123456789"))
    server.proc.send_signal(signal.SIGHUP)
    # Old workers drain while new ones start: every answer is 200 once the new ones serve alone.
    wait_for(
        lambda: all(status_with(server, "beta-key-0123456789") == 200 for _ in range(6)), "beta to be let in"
    )
    assert "Clients file reloaded" in server.log_text()

    workers_before = set(server.worker_pids())
    path.write_text(
        entry("alpha", "alpha-key-0123456789") + '[[client]]\nname = "gamma"\nkey = "g"\nrpm = 0\n'
    )
    server.proc.send_signal(signal.SIGHUP)
    wait_for(lambda: "Clients file not reloaded" in server.log_text(), "the bad reload to be logged")
    wait_for(lambda: len(set(server.worker_pids()) - workers_before) >= 2, "new workers")
    log = server.log_text()
    assert f"{path}:8: client 'gamma': `rpm` must be a whole number" in log
    assert server.proc.poll() is None
    # The new workers serve the last good clients: both old keys work, the bad file's new one does not.
    for _ in range(6):
        assert status_with(server, "alpha-key-0123456789") == 200
        assert status_with(server, "beta-key-0123456789") == 200
        assert status_with(server, "g") == 403


def test_a_bad_file_stops_gunicorn_at_start_naming_the_line(fake, tmp_path):
    path = tmp_path / "clients.toml"
    path.write_text(entry("alpha", "k1") + entry("alpha", "k2"))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OPENAI_", "SECURITY_KEY"))}
    env.update(base_env(fake, OPENAI_PROXY_CLIENTS_FILE=str(path), PORT=str(free_port()),
                        OPENAI_PROXY_LOG_DB=str(tmp_path / "log.sqlite3")))  # fmt: skip
    proc = subprocess.run([sys.executable, "-m", "gunicorn", "-c", "gunicorn.conf.py"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=60)  # fmt: skip
    assert proc.returncode != 0
    assert "MonkeyPatchWarning" not in proc.stderr
    assert f"openai-proxy cannot start: {path}:6: duplicate client name 'alpha'" in proc.stderr
