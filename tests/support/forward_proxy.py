"""A real forward proxy for the tests: Debian's tinyproxy on loopback, demanding Basic credentials.

Corporate networks reach OpenAI through a forward proxy that wants credentials, so the tests run the
proxy's upstream traffic through a real one rather than a mock: tinyproxy (1.11) speaks `CONNECT`
for HTTPS upstreams and absolute-form requests for plain-HTTP ones, and answers 407 without
credentials. Each instance runs its own `tinyproxy -d -c <conf>` from a private temp directory as a
child process, so the Debian package's own service (if any) plays no part.

Its log (`LogLevel Connect`) is what the tests read to see what went through the proxy. The lines
they grep for look like::

    CONNECT   Nov 30 02:24:22.495 [4128]: Connect (file descriptor 5): 127.0.0.1
    CONNECT   Nov 30 02:24:22.495 [4128]: Request (file descriptor 5): CONNECT 127.0.0.1:19443 HTTP/1.1
    CONNECT   Nov 30 02:24:22.627 [4128]: Request (file descriptor 5): POST http://127.0.0.1:19080/v1/x HTTP/1.1

Quirks of tinyproxy 1.11 worth knowing:
- Wrong credentials get `401 Unauthorized` (with `WWW-Authenticate`), not 407; missing ones get 407.
- A CONNECT to a port nobody listens on gets `500 Unable to connect`.
- Its 407/401 to a request with a body comes without reading the body: the answer (HTTP/1.0, no
  Content-Length) arrives whole, then a TCP reset instead of an EOF. A client must judge the
  status from the head, not insist on reading the answer to a clean end.
- In absolute form it sends `Connection: close` upstream, strips `Proxy-Authorization`, adds a `Via`
  header, and closes the client connection after each answer without saying so in the answer.
- Started as root it drops to `User`/`Group` *before* opening its log file, so the file is created
  here, beforehand, writable by that user, in a directory that user can enter.
"""

from __future__ import annotations

import contextlib
import grp
import os
import pwd
import re
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

from tests.support.servers import free_port

# What `Via` says, so a test can tell from the upstream's side that a request came through us.
VIA_NAME = "forward-proxy-under-test"

_REQUEST_LINE = re.compile(r"Request \(file descriptor \d+\): (.+?)\s*$", re.M)
_CLIENT_CONNECT = re.compile(r"Connect \(file descriptor \d+\): ", re.M)


def tinyproxy_path() -> str | None:
    """The tinyproxy binary, or None when the Debian package is not installed."""
    # Debian ships it in /usr/bin; some layouts use sbin, which is not always on a user's PATH.
    return shutil.which("tinyproxy") or shutil.which("tinyproxy", path="/usr/sbin:/usr/local/sbin")


def _unprivileged_user() -> tuple[str, str] | None:
    """(user, group) for tinyproxy to drop to when started as root; None when not root."""
    if os.geteuid() != 0:
        return None  # tinyproxy only changes UID/GID as root ("Not running as root, ...")
    user = "nobody"
    pwd.getpwnam(user)
    for group in ("nogroup", "nobody"):  # Debian calls it nogroup; other distributions nobody
        with contextlib.suppress(KeyError):
            grp.getgrnam(group)
            return user, group
    return user, str(pwd.getpwnam(user).pw_gid)


class ForwardProxy:
    """tinyproxy on a free loopback port: start(), url / url_without_credentials, log_text(), stop()."""

    def __init__(self, user: str = "proxy-user", password: str = "proxy-pass-7f3a9c") -> None:
        self.user = user
        self.password = password
        self.host = "127.0.0.1"
        self.port = 0
        self.proc: subprocess.Popen[bytes] | None = None
        self.dir: Path | None = None
        self.log_path: Path | None = None
        # Where the current test's part of the log starts (see rewind()); the proxy serves a module.
        self.log_start = 0

    # -- lifecycle ---------------------------------------------------------------------------------
    def start(self) -> ForwardProxy:
        binary = tinyproxy_path()
        if binary is None:
            raise RuntimeError("tinyproxy is not installed (Debian package tinyproxy)")
        # mkdtemp directly under /tmp (not pytest's 0700 tree) so the unprivileged user can reach it.
        self.dir = Path(tempfile.mkdtemp(prefix="tinyproxy-"))
        self.dir.chmod(0o755)
        self.log_path = self.dir / "tinyproxy.log"
        # tinyproxy opens its log only after dropping privileges: the file must already be writable.
        self.log_path.touch()
        self.log_path.chmod(0o666)
        last_error = ""
        # A free port can be taken between choosing and binding it; a few tries make that harmless.
        for _ in range(5):
            self.port = free_port()
            conf = self.dir / "tinyproxy.conf"
            conf.write_text(self._config())
            stderr = open(self.dir / "stderr.log", "ab")  # noqa: SIM115 - owned by the child's lifetime
            try:
                self.proc = subprocess.Popen(
                    [binary, "-d", "-c", str(conf)],
                    stdin=subprocess.DEVNULL,
                    stdout=stderr,
                    stderr=stderr,
                    cwd=self.dir,
                )
            finally:
                stderr.close()
            if self._wait_ready():
                return self
            last_error = self._diagnostics()
            self._terminate()
        self.stop()
        raise RuntimeError(f"tinyproxy did not start: {last_error}")

    def _config(self) -> str:
        assert self.log_path is not None
        lines = [
            f"Port {self.port}",
            f"Listen {self.host}",
            # Only loopback clients; with an Allow line present everything else is denied.
            "Allow 127.0.0.1",
            f"BasicAuth {self.user} {self.password}",
            # No ConnectPort line at all: tinyproxy then allows CONNECT to every port (the fake
            # upstream listens on a random one), where the stock config allows only 443 and 563.
            f'LogFile "{self.log_path}"',
            # Connect level: every client connection and request line, without Info's noise.
            "LogLevel Connect",
            # No PidFile line: tinyproxy then writes none. No Syslog line: it logs to LogFile only.
            "Timeout 600",
            "MaxClients 200",
            f'ViaProxyName "{VIA_NAME}"',
        ]
        drop = _unprivileged_user()
        if drop is not None:
            lines += [f"User {drop[0]}", f"Group {drop[1]}"]
        return "\n".join(lines) + "\n"

    def _wait_ready(self) -> bool:
        assert self.proc is not None
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                return False
            # This probe shows in the log as a `Connect` and a "closed socket before read" error,
            # before any test's rewind().
            with contextlib.suppress(OSError), socket.create_connection((self.host, self.port), timeout=0.5):
                # Listening: a port taken by someone else would have made tinyproxy exit instead.
                time.sleep(0.05)
                return self.proc.poll() is None
            time.sleep(0.05)
        return False

    def _diagnostics(self) -> str:
        assert self.dir is not None
        parts = []
        for name in ("stderr.log", "tinyproxy.log"):
            with contextlib.suppress(OSError):
                parts.append(f"{name}: {(self.dir / name).read_text(errors='replace')[-2000:]}")
        return "\n".join(parts)

    def _terminate(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def stop(self) -> None:
        self._terminate()
        if self.dir is not None:
            shutil.rmtree(self.dir, ignore_errors=True)
            self.dir = None

    # -- addresses -----------------------------------------------------------------------------------
    @property
    def url(self) -> str:
        """`http://user:password@127.0.0.1:port`, as OPENAI_PROXY_OUTBOUND_PROXY takes it."""
        return self.url_with(self.user, self.password)

    @property
    def url_without_credentials(self) -> str:
        return f"http://{self.host}:{self.port}"

    def url_with(self, user: str, password: str) -> str:
        """The proxy's URL with other credentials (e.g. a wrong password)."""
        return f"http://{user}:{password}@{self.host}:{self.port}"

    # -- the log -------------------------------------------------------------------------------------
    def rewind(self) -> None:
        """Make log_text() and friends start from now: each test reads only what it caused."""
        self.log_start = self.log_path.stat().st_size if self.log_path else 0

    def log_text(self, since: int | None = None) -> str:
        """The log from `since` (a byte offset; default where the current test started)."""
        assert self.log_path is not None
        with open(self.log_path, "rb") as f:
            f.seek(self.log_start if since is None else since)
            return f.read().decode(errors="replace")

    def request_lines(self, since: int | None = None) -> list[str]:
        """Request lines tinyproxy received, e.g. `CONNECT 127.0.0.1:4430 HTTP/1.1`."""
        return _REQUEST_LINE.findall(self.log_text(since))

    def connects_to(self, host: str, port: int, since: int | None = None) -> int:
        """How many CONNECT requests (tunnels, or refused attempts) named host:port."""
        return self.request_lines(since).count(f"CONNECT {host}:{port} HTTP/1.1")

    def client_connections(self, since: int | None = None) -> int:
        """How many TCP connections clients opened to the proxy."""
        return len(_CLIENT_CONNECT.findall(self.log_text(since)))
