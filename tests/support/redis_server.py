"""A real Redis for the tests: Debian's `redis-server` on a loopback port, from a private temp dir.

The fleet-wide gate and the shared limits talk to Redis; a fake would hide exactly what they depend
on (Lua scripts, key expiry, a server that goes away mid-run). One server per test session; tests
that need a clean slate call `flush()`, tests that stop it (`stop()`) start it again on the same port
(`start()`), so a URL handed to a running proxy stays valid.
"""

from __future__ import annotations

import contextlib
import shutil
import socket
import subprocess
import tempfile
import time

import pytest

from tests.support.servers import free_port


def redis_server_path() -> str | None:
    """The redis-server binary, or None when the Debian package is not installed."""
    return shutil.which("redis-server") or shutil.which("redis-server", path="/usr/sbin:/usr/local/bin")


class RedisServer:
    """One `redis-server` child process: no persistence, loopback only, stoppable and restartable."""

    def __init__(self, binary: str) -> None:
        self.binary = binary
        self.port = free_port()
        self.dir = tempfile.mkdtemp(prefix="openai-proxy-redis-")
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> RedisServer:
        args = [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--dir", self.dir,
                "--save", "", "--appendonly", "no", "--protected-mode", "no"]  # fmt: skip
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"redis-server exited with {self.proc.returncode}")
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", self.port), 0.2) as s:
                s.sendall(b"PING\r\n")
                if s.recv(16).startswith(b"+PONG"):
                    return self
            time.sleep(0.05)
        raise RuntimeError("redis-server did not answer PING within 10 s")

    def command(self, *args: str) -> bytes:
        """Send one command (inline protocol) and return the raw reply, for checks and `flush()`."""
        with socket.create_connection(("127.0.0.1", self.port), 2) as s:
            s.sendall((" ".join(args) + "\r\n").encode())
            return s.recv(65536)

    def flush(self) -> None:
        assert self.command("FLUSHALL").startswith(b"+OK")

    def stop(self) -> None:
        """Stop it at once (SIGKILL: a crashed or unreachable Redis, nothing saved)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self.proc = None

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture(scope="session")
def redis_session():
    binary = redis_server_path()
    if binary is None:
        pytest.skip(
            "redis-server is not installed (Debian package redis-server; ./test.sh installs it as root)"
        )
    server = RedisServer(binary).start()
    yield server
    server.close()


@pytest.fixture
def redis_server(redis_session):
    """The session's Redis, running and empty; restarted if an earlier test stopped it."""
    if redis_session.proc is None or redis_session.proc.poll() is not None:
        redis_session.start()
    redis_session.flush()
    yield redis_session
    if redis_session.proc is None or redis_session.proc.poll() is not None:
        redis_session.start()
