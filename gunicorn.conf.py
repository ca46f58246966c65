"""gunicorn settings: gevent workers, bind from PORT, long requests, a runtime dir shared by workers.

Settings come from the same place as the app's (environment, `.env.local`, `.env`). gunicorn runs this
file in the master at start, and again on every SIGHUP (a reload) in the same master process.
"""

from __future__ import annotations

import os

from openai_proxy.config import available_cpus
from openai_proxy.runtime import server_runtime

# Settings, the prices file and the clients file are checked here, in the master, before any worker
# starts: a problem stops the server naming the setting, file and line. On SIGHUP gunicorn runs this
# file again: a bad clients file then keeps the clients that were working (`on_reload` says why).
# The runtime directory (gate slots, Prometheus samples, key state, the stop marker, the control
# socket) is made once per server and shared by its workers.
_runtime = server_runtime()
_config = _runtime.config
# on_starting, when_ready (the stop marker at SIGTERM), on_reload, pre_exec, on_exit, worker_exit (the
# log store's last records), child_exit (a dead worker's gauges): each calls one method of the library.
globals().update(_runtime.hooks())

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
control_socket = os.path.join(_runtime.runtime_dir, "gunicorn.ctl")
