"""The server's runtime directory, shared by its workers: gate slots, key state, Prometheus samples, the
clients snapshot and the stop marker. gunicorn's master makes it before forking (`gunicorn.conf.py`) and
exports it; a lone process (tests, `flask run`, a host's own server without the variable) gets a
private one. Stdlib only: the gunicorn master imports this module."""

from __future__ import annotations

import contextlib
import os
import tempfile

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
