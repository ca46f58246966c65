"""What one worker owns for the app's lifetime: config, upstream client, gate, completion log, log
store, metrics, the stored objects' owners and the pages' rate limiter."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from flask.ctx import AppContext
from flask.globals import _cv_app
from flask_limiter import Limiter

from openai_proxy.clients import ClientBook
from openai_proxy.config import Config
from openai_proxy.gate import SlotGate
from openai_proxy.limits import LimitStore
from openai_proxy.log import RequestLog
from openai_proxy.objects import ObjectBook
from openai_proxy.observe.completion import CompletionLog
from openai_proxy.observe.metrics import Metrics
from openai_proxy.observe.prices import PriceTable
from openai_proxy.runtime import server_stopping
from openai_proxy.upstream import Upstream

if TYPE_CHECKING:
    from openai_proxy.observe.tracing import Tracing

# The proxy's blueprint in an app: its endpoints are `openai_proxy.api.chat.<view>`, `openai_proxy.pages.<view>`,
# ..., clear of a host app's own blueprints (a host's `api` or `pages` is common).
ROOT_BLUEPRINT = "openai_proxy"
API_ENDPOINTS = f"{ROOT_BLUEPRINT}.api."


@dataclass
class ProxyState:
    config: Config
    upstream: Upstream
    gate: SlotGate
    completion_log: CompletionLog
    runtime_dir: str
    log_store: RequestLog
    metrics: Metrics
    clients: ClientBook
    limits: LimitStore
    objects: ObjectBook
    limiter: Limiter | None = None
    # Where the proxy is mounted in its app ("/ai"); "" when it is the whole app.
    url_prefix: str = ""
    prices: PriceTable | None = None
    # Set only when tracing is on (OTEL_EXPORTER_OTLP_ENDPOINT): None costs a request one `if`.
    tracing: Tracing | None = None
    started_at: float = field(default_factory=time.time)

    def draining(self) -> bool:
        """Whether the server was told to stop (SIGTERM): in-flight work finishes, new work goes elsewhere."""
        return server_stopping(self.runtime_dir)


def app_context() -> AppContext:
    """The current Flask application context, read from its context variable itself, not through
    the `current_app` / `g` proxies: the hot path asks for it about a dozen times a request, and
    each trip through a proxy costs ~3 us."""
    ctx = _cv_app.get(None)
    if ctx is None:
        raise RuntimeError("working outside of a Flask application context")
    return ctx


def state() -> ProxyState:
    """The state of the app serving the current request."""
    return app_context().app.extensions["openai_proxy"]
