"""gunicorn settings: gevent workers, bind from PORT, long requests, a runtime dir shared by workers.

Settings come from the same place as the app's (environment, `.env.local`, `.env`).
"""

from __future__ import annotations

import multiprocessing
import os
import shutil
import sys
import tempfile

from app.config import ConfigError, load_config

try:
    _config = load_config(warn=False)
except ConfigError as exc:
    # A setting the proxy cannot run with (an unsupported proxy scheme, a missing CA file, ...):
    # say which and stop, rather than start and fail every request.
    sys.exit(f"openai-proxy cannot start: {exc}")

# One directory per server, shared by its workers (gate slots, the control socket). Created here,
# in the master, so every worker inherits the path; removed when the server exits.
_owned_runtime_dir = None if _config.runtime_dir else tempfile.mkdtemp(prefix="openai-proxy-")
_runtime_dir = _config.runtime_dir or _owned_runtime_dir
os.makedirs(_runtime_dir, exist_ok=True)
os.environ["OPENAI_PROXY_RUNTIME_DIR"] = _runtime_dir
# Prometheus multiprocess mode: each worker writes its samples under this directory and any worker
# serves the sum. prometheus_client reads the variable when a worker first imports it, so it is set
# here, before the fork, and always to this server's own directory.
_metrics_dir = os.path.join(_runtime_dir, "metrics")
os.makedirs(_metrics_dir, exist_ok=True)
os.environ["PROMETHEUS_MULTIPROC_DIR"] = _metrics_dir

bind = f"0.0.0.0:{_config.port}"
worker_class = "gevent"
workers = _config.workers or multiprocessing.cpu_count()
# Concurrent connections per worker (streams included); the gate bounds upstream work separately.
worker_connections = 2000
# gevent workers heartbeat from their own greenlet, so this only fires for a truly stuck worker;
# long upstream calls and 15-minute streams are not affected by it.
timeout = 30
# On SIGTERM, in-flight requests and streams get this long to finish before workers are killed.
graceful_timeout = _config.graceful_timeout_s
# Idle keep-alive connections are held this long; a graceful stop waits for them too, so it stays
# short. Behind a load balancer that reuses connections, set it above the balancer's idle timeout.
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
    # Samples of an earlier server in the same runtime dir would be summed into this one's.
    shutil.rmtree(_metrics_dir, ignore_errors=True)
    os.makedirs(_metrics_dir, exist_ok=True)
    server.log.info(
        "openai-proxy on %s: %d gevent workers, max %d parallel upstream requests server-wide (runtime dir %s)",
        bind,
        workers,
        _config.max_parallel_requests,
        _runtime_dir,
    )


def on_exit(server):
    if _owned_runtime_dir:
        shutil.rmtree(_owned_runtime_dir, ignore_errors=True)


def worker_exit(server, worker):
    # Records still queued in this worker reach the shared log store before the worker is gone.
    state = getattr(worker.wsgi, "extensions", {}).get("openai_proxy")
    if state is not None:
        state.log_store.close()


def child_exit(server, worker):
    # A dead worker's in-flight gauge must not be summed any more (its counters still count).
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(worker.pid, _metrics_dir)
