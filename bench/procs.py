"""Processes for the bench: the fake upstream and the proxy under gunicorn, and what /proc says of them.

Every process is started here with a log file in the run's temp dir and stopped by pid (SIGTERM,
then SIGKILL for the whole tree after a grace period): other gunicorn servers on the same machine
are never touched.
"""

from __future__ import annotations

import contextlib
import json
import os
import resource
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
KEY = "bench-security-key"
CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, timeout: float = 20.0, popen: subprocess.Popen | None = None) -> None:
    """Wait until something listens on `port`; give up at once if `popen` (the server) has exited."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if popen is not None and popen.poll() is not None:
            raise RuntimeError(f"the server exited ({popen.returncode}) before listening on port {port}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise RuntimeError(f"nothing listens on port {port}")


# ---- /proc ----------------------------------------------------------------------------------------


def tree(pid: int) -> list[int]:
    """`pid` and all its descendants (children of every thread, not only the main one)."""
    pids, frontier = [pid], [pid]
    while frontier:
        parent = frontier.pop()
        try:
            tasks = os.listdir(f"/proc/{parent}/task")
        except OSError:
            continue
        for task in tasks:
            try:
                children = Path(f"/proc/{parent}/task/{task}/children").read_text().split()
            except OSError:
                continue
            for child in map(int, children):
                pids.append(child)
                frontier.append(child)
    return pids


def cpu_of(pid: int) -> float:
    """utime + stime of one process (all its threads), in seconds."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def cpu_by_pid(pid: int) -> dict[int, float]:
    """CPU seconds of `pid` and each descendant."""
    return {p: cpu_of(p) for p in tree(pid)}


def rss_bytes(pid: int) -> int:
    """Resident set of `pid` and its descendants, summed (shared pages count once per process)."""
    total = 0
    for p in tree(pid):
        try:
            total += int(Path(f"/proc/{p}/statm").read_text().split()[1]) * PAGE
        except OSError:
            continue
    return total


def pss_bytes(pid: int) -> int:
    """Proportional set size of the tree: shared pages split between the processes that map them."""
    total = 0
    for p in tree(pid):
        try:
            for line in Path(f"/proc/{p}/smaps_rollup").read_text().splitlines():
                if line.startswith("Pss:"):
                    total += int(line.split()[1]) * 1024
                    break
        except OSError:
            continue
    return total


def machine_cpu() -> tuple[float, float]:
    """(busy, total) CPU seconds of the whole machine since boot, all cores, from /proc/stat."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + fields[4]  # idle + iowait
    total = sum(fields[:8])  # guest time is already inside user
    return (total - idle) / CLK_TCK, total / CLK_TCK


def children_cpu() -> float:
    """CPU seconds of this process's children that have been waited for (wrk, stream clients)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def raise_open_files_limit() -> tuple[int, int]:
    """Lift the soft open-files limit to the hard one (1000 streams need ~2000 sockets in the proxy)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard and hard != resource.RLIM_INFINITY:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    elif soft < 65536 and hard == resource.RLIM_INFINITY:
        resource.setrlimit(resource.RLIMIT_NOFILE, (65536, hard))
    return soft, resource.getrlimit(resource.RLIMIT_NOFILE)[0]


# ---- the servers ---------------------------------------------------------------------------------


class Proc:
    """A server process with its output in a log file."""

    def __init__(
        self, name: str, args: list[str], env: dict[str, str], port: int, log: Path, cwd: Path = ROOT
    ) -> None:
        self.name = name
        self.port = port
        self.log = log
        self._log = open(log, "wb")  # noqa: SIM115 (closed in stop)
        self.popen = subprocess.Popen(args, cwd=cwd, env=env, stdout=self._log, stderr=subprocess.STDOUT)
        self.pid = self.popen.pid
        try:
            wait_port(port, popen=self.popen)
        except RuntimeError:
            self.stop()
            raise RuntimeError(f"{name} did not start:\n{log.read_text()[-3000:]}") from None

    def stop(self, grace_s: float = 15.0) -> None:
        if self.popen.poll() is None:
            pids = tree(self.pid)
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(grace_s)
            except subprocess.TimeoutExpired:
                for pid in pids:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
                self.popen.wait()
        self._log.close()

    def __enter__(self) -> Proc:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


@dataclass(frozen=True)
class FakeSettings:
    latency_ms: float = 0.0
    events: int = 50
    gap_ms: float = 20.0
    procs: int = 1
    tls: bool = False  # HTTPS, with a certificate from the run's throwaway CA (see tls_files)
    full_stream: bool = False  # streams as a client that rebuilds them needs (see fake_answers.sse_events)


def tls_files(workdir: Path) -> tuple[Path, Path]:
    """(CA certificate PEM, server key + chain PEM for 127.0.0.1): a throwaway CA, made once per run.

    The CA is what the proxy is told to trust (OPENAI_PROXY_CA_BUNDLE) and what the bench's own stats
    requests verify against; wrk does not verify certificates.
    """
    folder = workdir / "tls"
    ca_pem, server_pem = folder / "ca.pem", folder / "server.pem"
    if not server_pem.exists():
        import trustme  # the [test] extra; only the HTTPS scenarios need it

        folder.mkdir(exist_ok=True)
        ca = trustme.CA()
        ca.cert_pem.write_to_path(str(ca_pem))
        ca.issue_cert("127.0.0.1").private_key_and_cert_chain_pem.write_to_path(str(server_pem))
    return ca_pem, server_pem


class FakeProc(Proc):
    """The fake upstream: a Proc that knows whether it serves HTTPS and which CA signed its certificate."""

    def __init__(self, args: list[str], port: int, log: Path, ca_pem: Path | None) -> None:
        self.ca_pem = ca_pem
        super().__init__("fake upstream", args, dict(os.environ), port, log)

    @property
    def tls(self) -> bool:
        return self.ca_pem is not None

    def url(self, path: str = "") -> str:
        return f"{'https' if self.tls else 'http'}://127.0.0.1:{self.port}{path}"

    def stats(self) -> dict:
        """The fake's counters: `late` (cumulative lateness histogram, see fake_upstream), `connections`
        (those that carried a request so far, the stats requests' own left out), `connections_open`
        (how many of those are still open) and `tls` (how many negotiated which version and cipher)."""
        context = ssl.create_default_context(cafile=str(self.ca_pem)) if self.tls else None
        with urllib.request.urlopen(self.url("/_bench/stats"), timeout=5, context=context) as r:
            return json.loads(r.read())


def start_upstream(workdir: Path, settings: FakeSettings) -> FakeProc:
    port = free_port()
    args = [
        sys.executable, "-m", "bench.fake_upstream", "--port", str(port),
        "--latency-ms", str(settings.latency_ms), "--events", str(settings.events),
        "--gap-ms", str(settings.gap_ms), "--procs", str(settings.procs),
    ]  # fmt: skip
    if settings.full_stream:
        args.append("--full-stream")
    ca_pem = None
    if settings.tls:
        ca_pem, server_pem = tls_files(workdir)
        args += ["--tls-cert", str(server_pem)]
    return FakeProc(args, port, workdir / f"upstream-{port}.log", ca_pem)


def fake_lateness(fake: FakeProc) -> list[int]:
    """The fake's cumulative histogram of how late its scheduled writes went out (see fake_upstream)."""
    return fake.stats()["late"]


def clean_env() -> dict[str, str]:
    """The caller's environment without anything that could change what a proxy does: no OPENAI_*,
    keys, tokens or forward proxies."""
    return {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("OPENAI_", "SECURITY_KEY", "ACCESS_TOKEN", "HTTP_PROXY", "HTTPS_PROXY"))
        and k.lower() not in ("http_proxy", "https_proxy", "all_proxy")
    }


def proxy_env(workdir: Path, port: int, upstream: FakeProc, max_parallel: int) -> dict[str, str]:
    """The environment of the proxy: only what the bench must set, nothing from the caller's OPENAI_*."""
    env = clean_env()
    env.update(
        PORT=str(port),
        OPENAI_BASE_URL=upstream.url("/v1"),
        OPENAI_API_KEY="sk-bench-0000000000000000",
        SECURITY_KEY=KEY,
        OPENAI_PROXY_MAX_PARALLEL_REQUESTS=str(max_parallel),
        OPENAI_PROXY_LOG_DB=str(workdir / "log.sqlite3"),
        PYTHONPATH=str(ROOT),
    )
    if upstream.ca_pem is not None:
        env["OPENAI_PROXY_CA_BUNDLE"] = str(upstream.ca_pem)
    return env


def start_redis(workdir: Path) -> Proc:
    """A redis-server on loopback for the Redis gate scenarios: no persistence, its files in the run's
    temp dir (the Debian package `redis-server`, as the tests use)."""
    binary = shutil.which("redis-server") or shutil.which("redis-server", path="/usr/sbin:/usr/local/bin")
    if binary is None:
        raise RuntimeError(
            "redis-server is needed for the *_redis scenarios (Debian: apt-get install redis-server)"
        )
    port = free_port()
    args = [binary, "--port", str(port), "--bind", "127.0.0.1", "--dir", str(workdir), "--save", "",
            "--appendonly", "no", "--protected-mode", "no"]  # fmt: skip
    return Proc("redis", args, dict(os.environ), port, workdir / f"redis-{port}.log")


def start_proxy(
    workdir: Path,
    upstream: FakeProc,
    max_parallel: int,
    extra_env: dict[str, str | None] | None = None,
    *,
    check: bool = True,
) -> Proc:
    """gunicorn -c gunicorn.conf.py app.wsgi:app, as ./run.sh starts it, against the fake upstream.

    `extra_env` is added to proxy_env's; a name set to None there is left out instead. With `check`
    (the default) one chat call must come back through it first; without, only its port must open
    (an upstream that never answers, `bench/waiting.py`).

    It runs in the temp dir so that a developer's `.env` in the checkout (read from the working
    directory) cannot change what is measured; the code and gunicorn.conf.py are this checkout's.
    `max_parallel` must be above any concurrency the bench opens: the gate is a policy, not a speed
    limit, and a 503 is not a latency.
    """
    port = free_port()
    gunicorn = [sys.executable, "-m", "gunicorn", "-c", str(ROOT / "gunicorn.conf.py"), "app.wsgi:app"]
    env = {**proxy_env(workdir, port, upstream, max_parallel), **(extra_env or {})}
    proc = Proc(
        "proxy",
        gunicorn,
        {k: v for k, v in env.items() if v is not None},
        port,
        workdir / f"proxy-{port}.log",
        workdir,
    )
    try:
        if check:
            check_proxy(port)
    except Exception:
        proc.stop()
        raise
    return proc


def check_proxy(port: int, timeout_s: float = 20.0, what: str = "the proxy") -> None:
    """Wait until the proxy relays a chat call to the fake: a bench of 403s or 502s measures nothing."""
    body = json.dumps({"security_key": KEY, "model": "gpt-4o-mini", "messages": []}).encode()
    deadline = time.monotonic() + timeout_s
    last: Exception | None = None
    while time.monotonic() < deadline:
        try:
            req = urllib.request.Request(f"http://127.0.0.1:{port}/openai", data=body, method="POST")
            with urllib.request.urlopen(req, timeout=5) as r:
                if b"Hello from the bench upstream." in r.read():
                    return
        except OSError as exc:
            last = exc
        time.sleep(0.1)
    raise RuntimeError(f"{what} does not relay to the fake upstream: {last}")


# ---- the original Node proxy (--original DIR) ---------------------------------------------------------

ORIGINAL_PORT = 3002  # hard-coded in its src/server.ts


def node_version(node: str) -> str:
    try:
        out = subprocess.run([node, "--version"], capture_output=True, text=True, timeout=10, check=False)
    except OSError as exc:
        return f"unknown ({exc})"
    return out.stdout.strip() or "unknown"


def original_entry(directory: Path) -> tuple[str, Path]:
    """(node binary, build/index.js) of a built checkout of the original, or a clear error."""
    entry = directory / "build" / "index.js"
    if not entry.is_file():
        raise RuntimeError(
            f"--original {directory}: no build/index.js there; build the original first "
            "(git clone https://github.com/gsbelarus/chatgpt-proxy && cd chatgpt-proxy && npm ci && npx tsc)"
        )
    if not (directory / "node_modules").is_dir():
        raise RuntimeError(f"--original {directory}: no node_modules there; run npm ci in it first")
    node = shutil.which("node")
    if node is None:
        raise RuntimeError(
            "--original needs node on PATH (the original's dependencies want Node 22.19 or newer)"
        )
    return node, entry


def port_taken(port: int) -> bool:
    """Something listens on `port` or holds it (Node listens on every address, IPv6 and IPv4)."""
    with socket.socket() as s:
        if s.connect_ex(("127.0.0.1", port)) == 0:
            return True
    for family, anywhere in ((socket.AF_INET6, "::"), (socket.AF_INET, "0.0.0.0")):
        try:
            s = socket.socket(family)
        except OSError:  # no IPv6 here
            continue
        with s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as Node does
            try:
                s.bind((anywhere, port))
            except OSError:
                return True
    return False


def original_env(upstream: FakeProc, max_parallel: int) -> dict[str, str]:
    """What the original reads, set as for the proxy: the fake's /v1 URL (the openai Node SDK reads
    OPENAI_BASE_URL), its own gate at the proxy's limit, the run's CA for an HTTPS fake."""
    env = {k: v for k, v in clean_env().items() if k != "NODE_EXTRA_CA_CERTS"}
    env.update(
        OPENAI_BASE_URL=upstream.url("/v1"),
        OPENAI_API_KEY="sk-bench-0000000000000000",
        SECURITY_KEY=KEY,
        OPENAI_PROXY_MAX_PARALLEL_REQUESTS=str(max_parallel),
    )
    if upstream.ca_pem is not None:
        env["NODE_EXTRA_CA_CERTS"] = str(upstream.ca_pem)
    return env


def start_original(workdir: Path, upstream: FakeProc, max_parallel: int, directory: Path) -> Proc:
    """`node build/index.js` of a built checkout of the original, against the fake, on port 3002.

    Like the proxy it runs in the run's temp dir (its code is the checkout's): it reads `.env.local`
    and `.env` from its working directory, and one left in the checkout must not change what is
    measured.
    """
    node, entry = original_entry(directory)
    if port_taken(ORIGINAL_PORT):
        raise RuntimeError(
            f"port {ORIGINAL_PORT} is taken: the original listens there (hard-coded); stop whatever "
            "holds it (another original proxy?) and run again"
        )
    try:
        proc = Proc(
            "original",
            [node, str(entry)],
            original_env(upstream, max_parallel),
            ORIGINAL_PORT,
            workdir / f"original-{upstream.port}.log",
            workdir,
        )
    except RuntimeError as exc:
        raise RuntimeError(
            f"{exc}\n(node {node_version(node)} at {node}; the original wants 22.19 or newer)"
        ) from None
    try:
        check_proxy(ORIGINAL_PORT, what="the original")
    except Exception:
        proc.stop()
        raise
    return proc
