"""gunicorn settings: gevent workers, bind from PORT, long requests, a runtime dir shared by workers.

Settings come from the same place as the app's (environment, `.env.local`, `.env`). gunicorn runs this
file in the master at start, and again on every SIGHUP (a reload) in the same master process.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import shutil
import signal
import sys
import tempfile

from openai_proxy.clients import ClientsFileError, load_clients
from openai_proxy.config import ConfigError, load_config
from openai_proxy.keys.state import forget as forget_key_state
from openai_proxy.observe.prices import load_prices
from openai_proxy.worker import (
    clear_reload_status,
    clear_server_stopping,
    mark_server_stopping,
    write_reload_status,
)

try:
    _config = load_config(warn=False)
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

# The clients file and the prices file are checked here, in the master, at start and on every SIGHUP
# (gunicorn runs this file again then). Workers read a copy of the last file that passed, so a bad
# edit followed by a reload keeps what was working (`on_reload` says why, and so does every worker's
# `/health` until a reload succeeds: the master writes the outcome to the runtime dir); at start, a
# bad file stops the server.
_reloading = bool(os.environ.get("OPENAI_PROXY_CONFIG_REPORTED"))
_reload_problems: list[dict[str, str]] = []  # {"file": "clients" or "prices", "problem": why refused}


def _check_clients(path: str) -> None:
    try:
        load_clients(path, _config.security_key, _config.upstream_keys, _config.openai_api_key)
    except ClientsFileError as exc:
        raise ConfigError(str(exc)) from None


def _publish(path: str | None, snapshot_var: str, what: str, check) -> None:
    """Check the file at `path` and hand the workers a copy of it, or keep the last good copy."""
    if not path:
        os.environ.pop(snapshot_var, None)
        return
    snapshot = os.path.join(_runtime_dir, f"{what}.toml")
    try:
        with open(path, "rb") as f:
            content = f.read()
    except OSError as exc:
        content, problem = None, f"{path}: cannot read the {what} file: {exc.strerror or exc}"
    if content is not None:
        # Judge exactly the bytes that will be published: the file may change while we look.
        candidate = f"{snapshot}.{os.getpid()}.new"
        fd = os.open(candidate, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(content)
        try:
            check(candidate)
            problem = None
        except ConfigError as exc:
            problem = str(exc).replace(candidate, path)
        if problem is None:
            os.replace(candidate, snapshot)
            os.environ[snapshot_var] = snapshot
            return
        os.unlink(candidate)
    if not _reloading:
        sys.exit(f"openai-proxy cannot start: {problem}")
    _reload_problems.append({"file": what, "problem": problem})
    if not os.environ.get(snapshot_var):
        # The file is new since the last good load, when there was none: keep it so (an empty file
        # means no named clients, and no prices beyond the shipped table).
        with open(snapshot, "wb"):
            pass
        os.environ[snapshot_var] = snapshot


_SNAPSHOT_VARS = ("OPENAI_PROXY_CLIENTS_SNAPSHOT", "OPENAI_PROXY_PRICES_SNAPSHOT")
_publish(_config.clients_file, _SNAPSHOT_VARS[0], "clients", _check_clients)
_publish(_config.prices_file, _SNAPSHOT_VARS[1], "prices", load_prices)
if _reloading:
    write_reload_status(_runtime_dir, _reload_problems)
else:
    clear_reload_status(_runtime_dir)

# `gunicorn -c gunicorn.conf.py` alone serves the proxy; an app named on the command line still wins.
wsgi_app = "app.wsgi:app"
# `-b`/`--bind` on the command line wins over this; when_ready logs what is really bound.
bind = f"0.0.0.0:{_config.port}"
# gunicorn's gevent worker, plus: `/ready` turns 503 and idle connections close as soon as the server
# is told to stop, `OPENAI_PROXY_DRAIN_DELAY_S`, and JSON instead of gunicorn's HTML error pages.
worker_class = "openai_proxy.worker.ProxyWorker"
workers = _config.workers or multiprocessing.cpu_count()
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
    refused = {p["file"]: p["problem"] for p in _reload_problems}
    for what, path in (("clients", _config.clients_file), ("prices", _config.prices_file)):
        if what in refused:
            server.log.error(
                "%s file not reloaded, the previous %s stay in use: %s",
                what.capitalize(),
                what,
                refused[what],
            )
        elif path:
            server.log.info("%s file reloaded: %s", what.capitalize(), path)
    # Upstream keys taken out (401, 403, insufficient_quota) come back on a reload: workers started
    # from now on begin a fresh key state; the old ones finish their calls on the old one.
    forget_key_state(_runtime_dir)


def pre_exec(server):
    # SIGUSR2 starts a new master from the environment gunicorn saved; a directory this master made (and
    # removes when it exits) must not be handed to it: the new master makes its own.
    if _owns_runtime_dir:
        for name in (_OWNED_VAR, "OPENAI_PROXY_RUNTIME_DIR", "PROMETHEUS_MULTIPROC_DIR", *_SNAPSHOT_VARS):
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
