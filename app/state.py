"""What one worker owns for the app's lifetime: config, upstream client, gate, completion log."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from flask import current_app

from app.completion_log import CompletionLog
from app.config import Config
from app.gate import Gate
from app.upstream import Upstream


@dataclass
class ProxyState:
    config: Config
    upstream: Upstream
    gate: Gate
    completion_log: CompletionLog
    runtime_dir: str
    started_at: float = field(default_factory=time.time)


def state() -> ProxyState:
    """The state of the app serving the current request."""
    return current_app.extensions["openai_proxy"]
