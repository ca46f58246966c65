"""The server's runtime directory, shared by its workers: gate slots, key state, Prometheus samples, the
clients snapshot and the stop marker. gunicorn's master makes it before forking (`ServerRuntime`, from
`gunicorn.conf.py` or a host's own config through `openai_proxy.worker.gunicorn_hooks`) and exports it;
a lone process (tests, `flask run`, a host's own server without the variable) gets a private one.
Stdlib only: the gunicorn master imports this module."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import tempfile
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from openai_proxy.config import Config

STOPPING_MARKER = "stopping"


def open_runtime_dir(configured: str | None) -> str:
    """The configured directory (made if missing), else a new private one for this process."""
    path = configured or tempfile.mkdtemp(prefix="openai-proxy-")
    os.makedirs(path, exist_ok=True)
    return path


def mark_server_stopping(runtime_dir: str) -> None:
    """Say, for every worker's `/ready` and `/health`, that the server was told to stop."""
    with open(os.path.join(runtime_dir, STOPPING_MARKER), "w") as marker:
        marker.write(str(os.getpid()))


def clear_server_stopping(runtime_dir: str) -> None:
    """Forget a stop marker (a server starting in a runtime dir that an earlier one left behind)."""
    with contextlib.suppress(FileNotFoundError):
        os.unlink(os.path.join(runtime_dir, STOPPING_MARKER))


def server_stopping(runtime_dir: str) -> bool:
    """Whether the server using `runtime_dir` was told to stop (SIGTERM); a stat, cheap enough per request."""
    return os.path.exists(os.path.join(runtime_dir, STOPPING_MARKER))


# What the master's last reload (SIGHUP) made of the clients and prices files, for `/health`.
RELOAD_STATUS = "reload.json"


def write_reload_status(runtime_dir: str, problems: list[dict[str, str]], at: float | None = None) -> None:
    """Record, for every worker's `/health`, what the reload that just ran made of the files it checks
    (`problems`: `{"file", "problem"}` for each file refused, its previous version kept)."""
    status = {"at": time.time() if at is None else at, "ok": not problems, "problems": problems}
    path = os.path.join(runtime_dir, RELOAD_STATUS)
    temporary = f"{path}.{os.getpid()}.new"
    with open(temporary, "w", encoding="utf-8") as f:
        json.dump(status, f)
    os.replace(temporary, path)  # a reader sees the old status or the new one, never half of one


def clear_reload_status(runtime_dir: str) -> None:
    """A server starting knows of no reload yet (an earlier server may have left one behind)."""
    with contextlib.suppress(FileNotFoundError):
        os.unlink(os.path.join(runtime_dir, RELOAD_STATUS))


def reload_status(runtime_dir: str) -> dict[str, Any] | None:
    """The last reload's `{"at", "ok", "problems"}`, or None when there was none (or it is unreadable)."""
    try:
        with open(os.path.join(runtime_dir, RELOAD_STATUS), encoding="utf-8") as f:
            status = json.load(f)
    except (OSError, ValueError):
        return None
    return status if isinstance(status, dict) else None


# -- the gunicorn master's side (`openai_proxy.worker.gunicorn_hooks` hands these to gunicorn) ------

# The master remembers in its environment which directory it made ("<pid>:<path>"): gunicorn runs its
# config file again on every SIGHUP (a reload), so old and new workers share one directory and it is
# still removed at exit, never one more per reload.
_OWNED_VAR = "OPENAI_PROXY_OWNED_RUNTIME_DIR"
_CLIENTS_SNAPSHOT = "OPENAI_PROXY_CLIENTS_SNAPSHOT"
_PRICES_SNAPSHOT = "OPENAI_PROXY_PRICES_SNAPSHOT"
_REPORTED_VAR = "OPENAI_PROXY_CONFIG_REPORTED"


class ServerRuntime:
    """What a gunicorn master keeps for its workers: one runtime directory (gate slots, Prometheus
    samples, key state, the stop marker, the control socket), the last clients file that passed its
    check, and the stop marker set the moment SIGTERM arrives. Made when the config file is read, at
    start and on every reload; each gunicorn hook calls one method."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.runtime_dir, self.owns_runtime_dir = self._choose_runtime_dir()
        os.makedirs(self.runtime_dir, exist_ok=True)
        os.environ["OPENAI_PROXY_RUNTIME_DIR"] = self.runtime_dir
        # Prometheus multiprocess mode: each worker writes its samples here and any worker serves the
        # sum. prometheus_client reads the variable when a worker first imports it: set before the fork.
        self.metrics_dir = os.path.join(self.runtime_dir, "metrics")
        os.makedirs(self.metrics_dir, exist_ok=True)
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = self.metrics_dir
        # The clients and prices files are checked here, at start and on every SIGHUP. Workers read a
        # copy of the last file that passed, so a bad edit followed by a reload keeps what was working
        # (`on_reload` says why, and so does every worker's `/health` until a reload succeeds); at
        # start, a bad file stops the server.
        self.reloading = bool(os.environ.get(_REPORTED_VAR))
        self.reload_problems: list[dict[str, str]] = []
        self._publish(config.clients_file, _CLIENTS_SNAPSHOT, "clients", self._check_clients)
        self._publish(config.prices_file, _PRICES_SNAPSHOT, "prices", _check_prices)
        if self.reloading:
            write_reload_status(self.runtime_dir, self.reload_problems)
        else:
            clear_reload_status(self.runtime_dir)

    def _choose_runtime_dir(self) -> tuple[str, bool]:
        """(the directory, whether this server made it)."""
        pid, _, made = os.environ.get(_OWNED_VAR, "").partition(":")
        if pid == str(os.getpid()) and made == self.config.runtime_dir and os.path.isdir(made):
            return made, True  # a reload of the master that made it
        if self.config.runtime_dir:
            return self.config.runtime_dir, False
        made = tempfile.mkdtemp(prefix="openai-proxy-")
        os.environ[_OWNED_VAR] = f"{os.getpid()}:{made}"
        return made, True

    def _check_clients(self, path: str) -> None:
        from openai_proxy.clients import ClientsFileError, load_clients
        from openai_proxy.config import ConfigError

        config = self.config
        try:
            load_clients(path, config.security_key, config.upstream_keys, config.openai_api_key)
        except ClientsFileError as exc:
            raise ConfigError(str(exc)) from None

    def _publish(self, path: str | None, snapshot_var: str, what: str, check: Callable[[str], Any]) -> None:
        """Check the file at `path` and hand the workers a copy of it, or keep the last good copy.

        At start a bad file stops the server (SystemExit); on a reload the last good copy stays."""
        from openai_proxy.config import ConfigError

        if not path:
            os.environ.pop(snapshot_var, None)
            return
        snapshot = os.path.join(self.runtime_dir, f"{what}.toml")
        try:
            with open(path, "rb") as f:
                content: bytes | None = f.read()
        except OSError as exc:
            content = None
            problem = f"{path}: cannot read the {what} file: {exc.strerror or exc}"
        if content is not None:
            # Judge exactly the bytes that will be published: the file may change while we look.
            candidate = f"{snapshot}.{os.getpid()}.new"
            fd = os.open(candidate, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(content)
            try:
                check(candidate)
                os.replace(candidate, snapshot)
                os.environ[snapshot_var] = snapshot
                return
            except ConfigError as exc:
                problem = str(exc).replace(candidate, path)
            os.unlink(candidate)
        if not self.reloading:
            raise SystemExit(f"openai-proxy cannot start: {problem}")
        self.reload_problems.append({"file": what, "problem": problem})
        if not os.environ.get(snapshot_var):
            # The file is new since the last good load, when there was none: keep it so (an empty file
            # means no named clients, and no prices beyond the shipped table).
            with open(snapshot, "wb"):
                pass
            os.environ[snapshot_var] = snapshot

    # -- hooks ---------------------------------------------------------------------------------------
    def on_starting(self, server: Any) -> None:
        for message in self.config.warnings:
            server.log.warning("CONFIG WARNING: %s", message)
        os.environ[_REPORTED_VAR] = "1"
        # Samples of an earlier server in the same runtime dir would be summed into this one's, and
        # its stop marker would make this one look like it is stopping.
        shutil.rmtree(self.metrics_dir, ignore_errors=True)
        os.makedirs(self.metrics_dir, exist_ok=True)
        clear_server_stopping(self.runtime_dir)

    def when_ready(self, server: Any) -> None:
        config = self.config
        # The listeners exist now: log what is really bound (`-b` on the command line wins over `bind`).
        server.log.info(
            "openai-proxy listening on %s with %d gevent workers, max %d parallel upstream requests "
            "%s (runtime dir %s)",
            ", ".join(str(listener) for listener in server.LISTENERS),
            server.cfg.workers,
            config.max_parallel_requests,
            # The password never reaches a log line.
            f"fleet-wide (gate in {config.public_view()['gate_uri']})" if config.gate_uri else "server-wide",
            self.runtime_dir,
        )
        # The arbiter's SIGTERM handler only queues the signal; the stop marker goes down first, in the
        # handler itself, so `/ready` says 503 before any worker or listener is touched. Installed here
        # because the arbiter sets its handlers after on_starting; a reload does not reinstall them.
        queue_signal = signal.getsignal(signal.SIGTERM)
        runtime_dir = self.runtime_dir

        def on_sigterm(signum: int, frame: Any) -> None:
            # No logging in a signal handler (gunicorn's rule too); the directory lives as long as the server.
            with contextlib.suppress(OSError):
                mark_server_stopping(runtime_dir)
            if callable(queue_signal):
                queue_signal(signum, frame)

        signal.signal(signal.SIGTERM, on_sigterm)

    def on_reload(self, server: Any) -> None:
        from openai_proxy.keys.state import forget as forget_key_state

        refused = {p["file"]: p["problem"] for p in self.reload_problems}
        for what, path in (("clients", self.config.clients_file), ("prices", self.config.prices_file)):
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
        forget_key_state(self.runtime_dir)

    def pre_exec(self, server: Any) -> None:
        # SIGUSR2 starts a new master from the environment gunicorn saved; a directory this master made
        # (and removes when it exits) must not be handed to it: the new master makes its own.
        if self.owns_runtime_dir:
            for name in (_OWNED_VAR, "OPENAI_PROXY_RUNTIME_DIR", "PROMETHEUS_MULTIPROC_DIR",
                         _CLIENTS_SNAPSHOT, _PRICES_SNAPSHOT):  # fmt: skip
                server.cfg.env_orig.pop(name, None)

    def on_exit(self, server: Any) -> None:
        if self.owns_runtime_dir:
            shutil.rmtree(self.runtime_dir, ignore_errors=True)
        else:
            clear_server_stopping(self.runtime_dir)

    def worker_exit(self, server: Any, worker: Any) -> None:
        # Records still queued in this worker reach the shared log store before the worker is gone.
        state = getattr(worker.wsgi, "extensions", {}).get("openai_proxy")
        if state is not None:
            state.metrics.tally.flush()  # this turn's counts, before the worker's files are final
            state.log_store.close()
            if state.tracing is not None:
                state.tracing.close()  # spans still queued in this worker go out too

    def child_exit(self, server: Any, worker: Any) -> None:
        # A dead worker's in-flight gauge must not be summed any more (its counters still count).
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(worker.pid, self.metrics_dir)

    def hooks(self) -> dict[str, Callable[..., None]]:
        """The gunicorn server hooks, by their setting names."""
        return {name: getattr(self, name) for name in HOOKS}


HOOKS = ("on_starting", "when_ready", "on_reload", "pre_exec", "on_exit", "worker_exit", "child_exit")


def server_runtime(config: Config | None = None) -> ServerRuntime:
    """Read the settings (environment, dotenv files), check what must be right before any worker
    starts (settings, the prices file, the clients file), and make the server's runtime directory.
    A problem stops the server naming the setting, file and line."""
    from openai_proxy.config import ConfigError, load_config

    try:
        config = config or load_config(warn=False)
    except ConfigError as exc:
        raise SystemExit(f"openai-proxy cannot start: {exc}") from None
    return ServerRuntime(config)


def gunicorn_hooks(config: Config | None = None) -> dict[str, Callable[..., None]]:
    """The proxy's gunicorn server hooks for a host's own `gunicorn.conf.py`:
    `globals().update(gunicorn_hooks())` (docs/mounting.md says what each one gives)."""
    return server_runtime(config).hooks()


def _check_prices(path: str) -> None:
    from openai_proxy.observe.prices import load_prices

    load_prices(path)  # each worker then reads the published copy once, when it builds the app
