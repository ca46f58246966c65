"""What one worker owns for the app's lifetime: config, upstream client, gate, completion log, log
store, metrics and the pages' rate limiter."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from flask import current_app
from flask_limiter import Limiter

from openai_proxy.clients import ClientBook
from openai_proxy.config import Config
from openai_proxy.gate.local import SlotGate
from openai_proxy.limits import LimitStore
from openai_proxy.log.store import LogStore
from openai_proxy.observe.completion import CompletionLog
from openai_proxy.observe.metrics import Metrics
from openai_proxy.observe.prices import PriceTable
from openai_proxy.upstream import Upstream
from openai_proxy.worker import server_stopping


@dataclass
class ProxyState:
    config: Config
    upstream: Upstream
    gate: SlotGate
    completion_log: CompletionLog
    runtime_dir: str
    log_store: LogStore
    metrics: Metrics
    clients: ClientBook
    limits: LimitStore
    limiter: Limiter | None = None
    prices: PriceTable | None = None
    started_at: float = field(default_factory=time.time)

    def draining(self) -> bool:
        """Whether the server was told to stop (SIGTERM): in-flight work finishes, new work goes elsewhere."""
        return server_stopping(self.runtime_dir)


def state() -> ProxyState:
    """The state of the app serving the current request."""
    return current_app.extensions["openai_proxy"]
