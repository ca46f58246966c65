"""gunicorn settings: gevent workers, bind from PORT, long requests, a runtime dir shared by workers.

Settings come from the same place as the app's (environment, `.env.local`, `.env`). gunicorn runs this
file in the master at start, and again on every SIGHUP (a reload) in the same master process.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import sys
import tempfile

from openai_proxy.clients import ClientsFileError, load_clients
from openai_proxy.config import ConfigError, available_cpus, load_config
from openai_proxy.keys.state import forget as forget_key_state
from openai_proxy.observe.prices import load_prices
from openai_proxy.runtime import clear_server_stopping, mark_server_stopping

try:
    _config = load_config(warn=False)
    # Checked here so that a bad prices file stops the server before any worker starts; each worker
    # then reads the file once, when it builds the app.
    load_prices(_config.prices_file)
except ConfigError as exc:
    # A setting the proxy cannot run with (an unsupported proxy scheme, a missing CA file, ...):
    # say which and stop, rather than start and fail every request.
    sys.exit(f"openai-proxy cannot start: {exc}")

# One directory per server, shared by its workers (gate slots, Prometheus samples, the stop marker,
# the control socket). Made here, in the master, so every worker inherits the path; removed when the
# server exits if the proxy made it. A reload runs this file again: the master remembers in its
# environment which directory it made ("<pid>:<path>"), so old and new workers share the same one and
# it is still removed at exit, never one more per reload.
_OWNED_VAR = "OPENAI_PROXY_OWNED_RUNTIME_DIR"


def _choose_runtime_dir() -> tuple[str, bool]:
    """(the directory, whether this server made it)."""
    pid, _, made = os.environ.get(_OWNED_VAR, "").partition(":")
    if pid == str(os.getpid()) and made == _config.runtime_dir and os.path.isdir(made):
        return made, True  # a reload of the master that made it
    if _config.runtime_dir:
        return _config.runtime_dir, False
    made = tempfile.mkdtemp(prefix="openai-proxy-")
    os.environ[_OWNED_VAR] = f"{os.getpid()}:{made}"
    return made, True


_runtime_dir, _owns_runtime_dir = _choose_runtime_dir()
os.makedirs(_runtime_dir, exist_ok=True)
os.environ["OPENAI_PROXY_RUNTIME_DIR"] = _runtime_dir
# Prometheus multiprocess mode: each worker writes its samples under this directory and any worker
# serves the sum. prometheus_client reads the variable when a worker first imports it, so it is set
# here, before the fork, and always to this server's own directory.
_metrics_dir = os.path.join(_runtime_dir, "metrics")
os.makedirs(_metrics_dir, exist_ok=True)
os.environ["PROMETHEUS_MULTIPROC_DIR"] = _metrics_dir

# The clients file is checked here, in the master, at start and on every SIGHUP (gunicorn runs this file
# again then). Workers read a copy of the last file that passed, so a bad edit followed by a reload
# keeps the clients that were working (`on_reload` says why); at start, a bad file stops the server.
_clients_problem: str | None = None


def _publish_clients() -> None:
    global _clients_problem
    snapshot_var = "OPENAI_PROXY_CLIENTS_SNAPSHOT"
    if not _config.clients_file:
        os.environ.pop(snapshot_var, None)
        return
    snapshot = os.path.join(_runtime_dir, "clients.toml")
    reloading = bool(os.environ.get("OPENAI_PROXY_CONFIG_REPORTED"))
    try:
        with open(_config.clients_file, "rb") as f:
            content = f.read()
    except OSError as exc:
        content, problem = (
            None,
            f"{_config.clients_file}: cannot read the clients file: {exc.strerror or exc}",
        )
    if content is not None:
        # Judge exactly the bytes that will be published: the file may change while we look.
        candidate = f"{snapshot}.{os.getpid()}.new"
        fd = os.open(candidate, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(content)
        try:
            load_clients(candidate, _config.security_key, _config.upstream_keys, _config.openai_api_key)
            problem = None
        except ClientsFileError as exc:
            problem = str(exc).replace(candidate, _config.clients_file)
        if problem is None:
            os.replace(candidate, snapshot)
            os.environ[snapshot_var] = snapshot
            return
        os.unlink(candidate)
    if not reloading:
        sys.exit(f"openai-proxy cannot start: {problem}")
    _clients_problem = problem
    if not os.environ.get(snapshot_var):
        # The file is new since the last good load, when there were no named clients: keep it so.
        with open(snapshot, "wb"):
            pass
        os.environ[snapshot_var] = snapshot


_publish_clients()

# `gunicorn -c gunicorn.conf.py` alone serves the proxy; an app named on the command line still wins.
wsgi_app = "app.wsgi:app"
# `-b`/`--bind` on the command line wins over this; when_ready logs what is really bound.
bind = f"0.0.0.0:{_config.port}"
# gunicorn's gevent worker, plus: `/ready` turns 503 and idle connections close as soon as the server
# is told to stop, `OPENAI_PROXY_DRAIN_DELAY_S`, and JSON instead of gunicorn's HTML error pages.
worker_class = "openai_proxy.worker.ProxyWorker"
# The CPUs this process may use (affinity, a container's CPU quota), not the host's count.
workers = _config.workers or available_cpus()
# Concurrent connections per worker (streams included); the gate bounds upstream work separately.
worker_connections = 2000
# gevent workers heartbeat from their own greenlet, so this only fires for a truly stuck worker;
# long upstream calls and 15-minute streams are not affected by it.
timeout = 30
# On SIGTERM, in-flight requests and streams get this long to finish (the drain delay included)
# before workers are killed; counted from the signal, by the master and by each worker.
graceful_timeout = _config.graceful_timeout_s
# Idle keep-alive connections are held this long (a stop closes them at once). Behind a load balancer
# that reuses connections, set it above the balancer's idle timeout.
keepalive = _config.keepalive_s
accesslog = None
errorlog = "-"
loglevel = "info"
# Monkey-patching happens in each worker before the app is imported; preloading would import
# ssl/threading in the master first.
preload_app = False
# Per server, not the shared default in $HOME: two servers on one host must not collide.
control_socket = os.path.join(_runtime_dir, "gunicorn.ctl")


def on_starting(server):
    for message in _config.warnings:
        server.log.warning("CONFIG WARNING: %s", message)
    os.environ["OPENAI_PROXY_CONFIG_REPORTED"] = "1"
    # Samples of an earlier server in the same runtime dir would be summed into this one's, and its
    # stop marker would make this one look like it is stopping.
    shutil.rmtree(_metrics_dir, ignore_errors=True)
    os.makedirs(_metrics_dir, exist_ok=True)
    clear_server_stopping(_runtime_dir)


def when_ready(server):
    # The listeners exist now: log what is really bound (`-b` on the command line wins over `bind`).
    server.log.info(
        "openai-proxy listening on %s with %d gevent workers, max %d parallel upstream requests "
        "%s (runtime dir %s)",
        ", ".join(str(listener) for listener in server.LISTENERS),
        server.cfg.workers,
        _config.max_parallel_requests,
        # The password never reaches a log line.
        f"fleet-wide (gate in {_config.public_view()['gate_uri']})" if _config.gate_uri else "server-wide",
        _runtime_dir,
    )
    # The arbiter's SIGTERM handler only queues the signal; the stop marker goes down first, in the
    # handler itself, so `/ready` says 503 before any worker or listener is touched. Installed here
    # because the arbiter sets its handlers after on_starting; a reload does not reinstall them.
    queue_signal = signal.getsignal(signal.SIGTERM)
    runtime_dir = _runtime_dir

    def on_sigterm(signum, frame):
        # No logging in a signal handler (gunicorn's rule too); the directory lives as long as the server.
        with contextlib.suppress(OSError):
            mark_server_stopping(runtime_dir)
        queue_signal(signum, frame)

    signal.signal(signal.SIGTERM, on_sigterm)


def on_reload(server):
    if _clients_problem:
        server.log.error("Clients file not reloaded, the previous clients stay in use: %s", _clients_problem)
    elif _config.clients_file:
        server.log.info("Clients file reloaded: %s", _config.clients_file)
    # Upstream keys taken out (401, 403, insufficient_quota) come back on a reload: workers started
    # from now on begin a fresh key state; the old ones finish their calls on the old one.
    forget_key_state(_runtime_dir)


def pre_exec(server):
    # SIGUSR2 starts a new master from the environment gunicorn saved; a directory this master made (and
    # removes when it exits) must not be handed to it: the new master makes its own.
    if _owns_runtime_dir:
        for name in (_OWNED_VAR, "OPENAI_PROXY_RUNTIME_DIR", "PROMETHEUS_MULTIPROC_DIR"):
            server.cfg.env_orig.pop(name, None)


def on_exit(server):
    if _owns_runtime_dir:
        shutil.rmtree(_runtime_dir, ignore_errors=True)
    else:
        clear_server_stopping(_runtime_dir)


def worker_exit(server, worker):
    # Records still queued in this worker reach the shared log store before the worker is gone.
    state = getattr(worker.wsgi, "extensions", {}).get("openai_proxy")
    if state is not None:
        state.log_store.close()


def child_exit(server, worker):
    # A dead worker's in-flight gauge must not be summed any more (its counters still count).
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(worker.pid, _metrics_dir)
