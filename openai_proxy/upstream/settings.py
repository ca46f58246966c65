"""How the upstream is reached: origin, TLS trust, outbound proxy, timeouts. Built once from Config."""

from __future__ import annotations

import os
import ssl
from dataclasses import dataclass
from urllib.parse import unquote, urlsplit

from openai_proxy.config import Config

# Reads may pause for as long as a caller is allowed to wait, plus a margin.
READ_MARGIN_S = 60.0
CONNECT_TIMEOUT_S = 10.0
# Connections one worker may have open to upstream at once. The gate bounds upstream calls server-wide,
# so a worker never needs more than the gate's limit (plus a few for calls racing to release).
SPARE_CONNECTIONS = 8


@dataclass(frozen=True)
class ProxySettings:
    """An outbound `http://[user:password@]host:port` proxy (Config has checked the scheme)."""

    host: str
    port: int
    user: str | None
    password: str | None

    @classmethod
    def from_url(cls, url: str) -> ProxySettings:
        parts = urlsplit(url)
        user = unquote(parts.username) if parts.username is not None else None
        password = unquote(parts.password) if parts.password is not None else None
        return cls(parts.hostname or "", parts.port or 80, user, password)

    def __str__(self) -> str:  # never the credentials
        return f"http://{self.host}:{self.port}"


# Contexts made in this process, by bundle (path and the file's size and change time, so an edited
# bundle makes a new one). Loading the system's CAs takes tens of milliseconds, and every app a process
# builds (a host's app factory, tests) would pay it again for the same context; a context is safe to
# share between connections and clients.
_contexts: dict[tuple[str | None, int, int], ssl.SSLContext] = {}


def ssl_context(ca_bundle: str | None) -> ssl.SSLContext:
    """The system's trusted CAs, plus an extra PEM bundle (a corporate or test CA) when configured."""
    try:
        seen = os.stat(ca_bundle) if ca_bundle else None
    except OSError:
        seen = None  # load_verify_locations says what is wrong with it
    key = (ca_bundle, seen.st_size if seen else -1, seen.st_mtime_ns if seen else -1)
    context = _contexts.get(key)
    if context is None:
        context = ssl.create_default_context()
        if ca_bundle:
            context.load_verify_locations(cafile=ca_bundle)
        _contexts[key] = context
    return context


@dataclass(frozen=True)
class ClientSettings:
    origin: str
    tls: bool
    host: str
    port: int
    base_path: str
    ssl_context: ssl.SSLContext | None
    proxy: ProxySettings | None
    connect_timeout: float
    read_timeout: float
    max_connections: int
    user_agent: str

    @classmethod
    def from_config(cls, config: Config, user_agent: str) -> ClientSettings:
        url = urlsplit(config.openai_base_url)
        tls = url.scheme == "https"
        port = url.port or (443 if tls else 80)
        return cls(
            origin=f"{url.scheme}://{url.hostname}:{port}",
            tls=tls,
            host=url.hostname or "",
            port=port,
            base_path=url.path.rstrip("/"),
            ssl_context=ssl_context(config.ca_bundle) if tls else None,
            proxy=ProxySettings.from_url(config.outbound_proxy) if config.outbound_proxy else None,
            connect_timeout=CONNECT_TIMEOUT_S,
            read_timeout=config.effective_max_timeout_ms / 1000.0 + READ_MARGIN_S,
            max_connections=config.max_parallel_requests + SPARE_CONNECTIONS,
            user_agent=user_agent,
        )
