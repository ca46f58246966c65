"""Configuration: one frozen object, built once from the environment, `.env.local` and `.env`."""

from __future__ import annotations

import dataclasses
import difflib
import logging
import math
import os
import re
import socket
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

from dotenv import dotenv_values

from openai_proxy.keys.specs import KeySpec, KeySpecError, parse_api_keys
from openai_proxy.log import url as logurl

log = logging.getLogger("openai_proxy.config")

MIB = 1024 * 1024
DEFAULT_BASE_URL = "https://api.openai.com/v1"
DEFAULT_LOG_DB = "var/openai-proxy.sqlite3"


class ConfigError(ValueError):
    """A setting the proxy cannot start with; the message names the variable and what is wrong."""


@dataclass(frozen=True)
class Config:
    """Effective settings of one proxy process. Never read `os.environ` elsewhere."""

    port: int = 3002
    openai_api_key: str | None = None
    openai_project: str | None = None
    openai_organization: str | None = None
    openai_base_url: str = DEFAULT_BASE_URL
    security_key: str | None = None
    access_token: str | None = None
    default_model: str = "gpt-4o-mini"
    prices_file: str | None = None
    # Under gunicorn, like the clients file: the master checks it at start and on every SIGHUP and
    # hands the workers a copy of the last good one, so a bad edit followed by a reload keeps the
    # prices that were working (and a worker restarted later still starts).
    prices_snapshot: str | None = None
    upstream_timeout_ms: int = 600_000
    upstream_max_timeout_ms: int = 900_000
    max_parallel_requests: int = 32
    sse_keepalive_interval_ms: int = 15_000
    max_body_bytes: int = 20 * MIB
    max_audio_bytes: int = 25 * MIB
    upload_idle_timeout_s: int = 30
    max_response_bytes: int = 128 * MIB
    max_sse_event_bytes: int = 16 * MIB
    runtime_dir: str | None = None
    outbound_proxy: str | None = None
    ca_bundle: str | None = None
    workers: int = 0
    graceful_timeout_s: int = 60
    drain_delay_s: float = 0.0
    keepalive_s: int = 5
    log_db: str = DEFAULT_LOG_DB
    log_retention: int = 10_000
    log_max_queue: int = 10_000
    # Names this server on the records of a log several servers share (OPENAI_PROXY_HOST_NAME).
    host_name: str = field(default_factory=socket.gethostname)
    pages_rate_limit: str = "60/minute"
    health2_rate_limit: str = "6/minute"
    ratelimit_storage_uri: str = "memory://"
    limits_uri: str | None = None
    # Named client keys (`openai_proxy.clients`). Under gunicorn the master checks the file at start and on every
    # SIGHUP, and hands the workers a copy of the last good one (`clients_snapshot`), so a bad edit
    # followed by a reload keeps the clients that were working.
    clients_file: str | None = None
    clients_snapshot: str | None = None
    gate_uri: str | None = None
    gate_lease_s: int = 10
    # Every Redis call of the gate, the client limits and the page limits: how long one may take
    # (connect, or wait for the answer) before that Redis counts as down, and, while it is down, how
    # often the gate and the client limits ask it again (`openai_proxy.redis_link`).
    redis_timeout_s: float = 0.25
    redis_retry_s: float = 1.0
    # `safety_identifier` on chat and Responses create calls (`openai_proxy.clients.safety`):
    # OPENAI_PROXY_SAFETY_IDENTIFIER=off turns it off; OPENAI_PROXY_SAFETY_SECRET keys its HMAC.
    safety_identifier: bool = True
    safety_secret: str | None = None
    # The upstream key pool (OPENAI_API_KEYS, with OPENAI_API_KEY): empty means no pool.
    upstream_keys: tuple[KeySpec, ...] = ()
    # OpenTelemetry's own `OTEL_*` variables, as (name, value) pairs from the same sources as every
    # other setting; tracing is on when an OTLP endpoint is among them (`openai_proxy.observe.tracing`).
    otel: tuple[tuple[str, str], ...] = ()
    warnings: tuple[str, ...] = field(default=(), compare=False)

    @property
    def tracing(self) -> bool:
        """Whether spans are exported: an OTLP endpoint is set and the SDK is not switched off."""
        values = dict(self.otel)
        if values.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
            return False
        return any(values.get(name) for name in OTEL_ENDPOINT_VARS)

    @property
    def effective_max_timeout_ms(self) -> int:
        """The cap for caller timeouts: a max below the default would make the default unreachable."""
        return max(self.upstream_max_timeout_ms, self.upstream_timeout_ms)

    def public_view(self) -> dict[str, object]:
        """Settings safe to show on a page: secrets only say whether they are set."""
        secret = {"openai_api_key", "security_key", "access_token", "safety_secret"}
        out: dict[str, object] = {}
        for f in dataclasses.fields(self):
            if f.name == "warnings":
                continue
            value = getattr(self, f.name)
            if f.name in secret:
                value = "set" if value else "unset"
            elif f.name in ("outbound_proxy", "ratelimit_storage_uri", "limits_uri", "gate_uri") and value:
                value = _without_userinfo(value)
            elif f.name == "log_db":
                value = logurl.shown(value)
            elif f.name == "otel":
                value = {name: _otel_shown(name, v) for name, v in value}
            elif f.name == "upstream_keys":
                value = [{"name": k.name, "weight": k.weight, "models": sorted(k.models) if k.models else None}
                         for k in value]  # fmt: skip
            out[f.name] = value
        out["effective_max_timeout_ms"] = self.effective_max_timeout_ms
        return out

    @property
    def shared_limits_uri(self) -> str | None:
        """The Redis that client limits share with other hosts: OPENAI_PROXY_LIMITS_URI, else a redis://
        OPENAI_PROXY_RATELIMIT_STORAGE_URI (contract §13); None counts on this host only."""
        if self.limits_uri:
            return self.limits_uri
        if self.ratelimit_storage_uri.startswith(("redis://", "rediss://")):
            return self.ratelimit_storage_uri
        return None

    @property
    def pages_limits_uri(self) -> str:
        """flask-limiter's storage for the page rate limits: OPENAI_PROXY_LIMITS_URI wins when set."""
        return self.limits_uri or self.ratelimit_storage_uri


def _otel_shown(name: str, value: str) -> str:
    """An `OTEL_*` value as a page may show it: headers (API keys, often) only as `set`."""
    if name.endswith("_HEADERS"):
        return "set"
    return _without_userinfo(value) if name.endswith("_ENDPOINT") else value


def _without_userinfo(url: str) -> str:
    parts = urlsplit(url)
    return urlunsplit(parts._replace(netloc=parts.netloc.rpartition("@")[2]))


# The grammar flask-limiter (the `limits` package) accepts, e.g. `60/minute` or `10 per 2 seconds;
# 1000/day`. Checked here, not with `limits` itself, so the gunicorn master (which reads this module)
# does not import `limits`, whose storage backends pull in ssl before the workers monkey-patch.
_RATE_LIMIT_ITEM = re.compile(
    r"\s*\d+\s*(?:/|\s+per\s+)\s*(?:\d+\s*)?(?:second|minute|hour|day|month|year)s?\s*", re.I
)


def is_rate_limit(value: str) -> bool:
    """Whether `value` is a flask-limiter rate limit string (items separated by `,`, `;` or `|`)."""
    return all(_RATE_LIMIT_ITEM.fullmatch(item) for item in re.split(r"[,;|]", value))


# Variable name -> (field, kind). Kinds: str (empty means unset), int (must be > 0).
_INT_VARS = {
    "PORT": "port",
    "OPENAI_PROXY_UPSTREAM_TIMEOUT_MS": "upstream_timeout_ms",
    "OPENAI_PROXY_UPSTREAM_MAX_TIMEOUT_MS": "upstream_max_timeout_ms",
    "OPENAI_PROXY_MAX_PARALLEL_REQUESTS": "max_parallel_requests",
    "OPENAI_PROXY_SSE_KEEPALIVE_INTERVAL_MS": "sse_keepalive_interval_ms",
    "OPENAI_PROXY_MAX_BODY_BYTES": "max_body_bytes",
    "OPENAI_PROXY_MAX_AUDIO_BYTES": "max_audio_bytes",
    "OPENAI_PROXY_UPLOAD_IDLE_TIMEOUT_S": "upload_idle_timeout_s",
    "OPENAI_PROXY_MAX_RESPONSE_BYTES": "max_response_bytes",
    "OPENAI_PROXY_MAX_SSE_EVENT_BYTES": "max_sse_event_bytes",
    "OPENAI_PROXY_WORKERS": "workers",
    "OPENAI_PROXY_GRACEFUL_TIMEOUT_S": "graceful_timeout_s",
    "OPENAI_PROXY_KEEPALIVE_S": "keepalive_s",
    "OPENAI_PROXY_LOG_RETENTION": "log_retention",
    "OPENAI_PROXY_LOG_MAX_QUEUE": "log_max_queue",
    "OPENAI_PROXY_GATE_LEASE_S": "gate_lease_s",
}
# The first name present wins, so the SDK's own variable names work as aliases.
_STR_VARS = {
    "openai_api_key": ("OPENAI_API_KEY",),
    "openai_project": ("OPENAI_PROJECT_KEY", "OPENAI_PROJECT_ID"),
    "openai_organization": ("OPENAI_ORG_ID", "OPENAI_ORGANIZATION"),
    "openai_base_url": ("OPENAI_BASE_URL",),
    "security_key": ("SECURITY_KEY",),
    "access_token": ("ACCESS_TOKEN",),
    "default_model": ("DEFAULT_MODEL",),
    "prices_file": ("OPENAI_PROXY_PRICES_FILE",),
    "prices_snapshot": ("OPENAI_PROXY_PRICES_SNAPSHOT",),
    "runtime_dir": ("OPENAI_PROXY_RUNTIME_DIR",),
    "ca_bundle": ("OPENAI_PROXY_CA_BUNDLE", "SSL_CERT_FILE"),
    "log_db": ("OPENAI_PROXY_LOG_DB",),
    "host_name": ("OPENAI_PROXY_HOST_NAME",),
    "pages_rate_limit": ("OPENAI_PROXY_PAGES_RATE_LIMIT",),
    "health2_rate_limit": ("OPENAI_PROXY_HEALTH2_RATE_LIMIT",),
    "ratelimit_storage_uri": ("OPENAI_PROXY_RATELIMIT_STORAGE_URI",),
    "limits_uri": ("OPENAI_PROXY_LIMITS_URI",),
    "clients_file": ("OPENAI_PROXY_CLIENTS_FILE",),
    "clients_snapshot": ("OPENAI_PROXY_CLIENTS_SNAPSHOT",),
    "gate_uri": ("OPENAI_PROXY_GATE_URI",),
    "safety_secret": ("OPENAI_PROXY_SAFETY_SECRET",),
}
# Seconds, fractions allowed; a value that is not a number > 0 stops the server.
_SECONDS_VARS = {
    "OPENAI_PROXY_REDIS_TIMEOUT_S": "redis_timeout_s",
    "OPENAI_PROXY_REDIS_RETRY_S": "redis_retry_s",
}
_RATE_LIMIT_VARS = {
    "pages_rate_limit": "OPENAI_PROXY_PAGES_RATE_LIMIT",
    "health2_rate_limit": "OPENAI_PROXY_HEALTH2_RATE_LIMIT",
}
# Read elsewhere in this module, or set by the proxy itself for its workers.
_OTHER_VARS = (
    "OPENAI_API_KEYS",
    "OPENAI_PROXY_SAFETY_IDENTIFIER",
    "OPENAI_PROXY_DRAIN_DELAY_S",
    "OPENAI_PROXY_OUTBOUND_PROXY",
    "HTTPS_PROXY",
    "HTTP_PROXY",
    "NO_PROXY",
    "OPENAI_PROXY_CONFIG_REPORTED",
    "OPENAI_PROXY_OWNED_RUNTIME_DIR",
)
# Tracing: OpenTelemetry's standard variables. Any `OTEL_*` variable is handed to the SDK (the names
# below are the ones the proxy itself looks at); an endpoint switches tracing on.
OTEL_PREFIX = "OTEL_"
OTEL_ENDPOINT_VARS = ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
OTEL_HEADER_VARS = ("OTEL_EXPORTER_OTLP_HEADERS", "OTEL_EXPORTER_OTLP_TRACES_HEADERS")
_OTEL_PROTOCOL_VARS = ("OTEL_EXPORTER_OTLP_PROTOCOL", "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL")
_OTEL_VARS = (*OTEL_ENDPOINT_VARS, *OTEL_HEADER_VARS, *_OTEL_PROTOCOL_VARS, "OTEL_SDK_DISABLED")
# Every variable the proxy reads: settings may be given under these names in the environment, the
# dotenv files, or a host app's `app.config` (there any `OTEL_*` name too).
KNOWN_VARIABLES = frozenset(
    [
        *_INT_VARS,
        *_SECONDS_VARS,
        *(name for names in _STR_VARS.values() for name in names),
        *_OTHER_VARS,
        *_OTEL_VARS,
    ]
)
PREFIX = "OPENAI_PROXY_"


def unknown_variable_warnings(values: Mapping[str, str]) -> list[str]:
    """A warning for each `OPENAI_PROXY_*` variable the proxy does not know (a misspelling is
    otherwise ignored in silence), naming the closest known one."""
    out = []
    for name in sorted(values):
        if not name.startswith(PREFIX) or name in KNOWN_VARIABLES:
            continue
        # Compared without the shared prefix, which would make every name look close.
        suffixes = sorted(k.removeprefix(PREFIX) for k in KNOWN_VARIABLES if k.startswith(PREFIX))
        close = difflib.get_close_matches(name.removeprefix(PREFIX), suffixes, n=1, cutoff=0.75)
        hint = f" (did you mean {PREFIX}{close[0]}?)" if close else ""
        out.append(f"{name} is not a setting of the proxy{hint}; it is ignored")
    return out


def available_cpus() -> int:
    """The CPUs this process may really use: its affinity mask, capped by a cgroup CPU quota (a
    container's `--cpus`), at least 1. `os.cpu_count()` counts the host's CPUs instead."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    quota = _cgroup_cpu_quota()
    if quota is not None:
        cpus = min(cpus, max(1, math.ceil(quota)))
    return max(1, cpus)


def _cgroup_cpu_quota(root: str = "/sys/fs/cgroup") -> float | None:
    """CPUs allowed by the cgroup quota (v2 `cpu.max`, else v1 `cpu.cfs_quota_us`); None when unlimited."""
    try:
        with open(os.path.join(root, "cpu.max")) as f:
            quota, period = f.read().split()[:2]
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        pass
    try:
        with open(os.path.join(root, "cpu", "cpu.cfs_quota_us")) as f:
            quota_us = int(f.read())
        with open(os.path.join(root, "cpu", "cpu.cfs_period_us")) as f:
            period_us = int(f.read())
    except (OSError, ValueError):
        return None
    return quota_us / period_us if quota_us > 0 and period_us > 0 else None


def _base_url(raw: str) -> str:
    url = urlsplit(raw)
    if url.scheme not in ("http", "https") or not url.hostname or url.query or url.fragment:
        raise ConfigError(
            f"OPENAI_BASE_URL={raw!r} is not an http:// or https:// URL like {DEFAULT_BASE_URL}"
        )
    try:
        url.port  # noqa: B018 - raises on a port that is not a number
    except ValueError:
        raise ConfigError(f"OPENAI_BASE_URL={raw!r} has an invalid port") from None
    return raw.rstrip("/")


# (variable, applies to an https upstream, applies to an http upstream); the first one set wins.
_PROXY_VARS = (
    ("OPENAI_PROXY_OUTBOUND_PROXY", True, True),
    ("HTTPS_PROXY", True, False),
    ("https_proxy", True, False),
    ("HTTP_PROXY", False, True),
    ("http_proxy", False, True),
)


def outbound_proxy(values: Mapping[str, str], base_url: str) -> str | None:
    """The forward proxy for `base_url`, or None (no proxy set, or the host is in NO_PROXY).

    Only `http://[user:password@]host:port` is supported: anything else stops the server at start.
    """
    https = base_url.startswith("https:")
    for name, for_https, for_http in _PROXY_VARS:
        raw = (values.get(name) or "").strip()
        if raw and (for_https if https else for_http):
            break
    else:
        return None
    parts = urlsplit(raw if "://" in raw else f"http://{raw}")
    if parts.scheme != "http":
        raise ConfigError(
            f"{name}={_without_userinfo(raw)!r}: only http://[user:password@]host:port proxies are "
            f"supported (HTTPS upstreams go through it with CONNECT); {parts.scheme}:// is not"
        )
    try:
        port = parts.port
    except ValueError:
        port = None
        bad_port = True
    else:
        bad_port = False
    if not parts.hostname or bad_port or parts.path not in ("", "/"):
        raise ConfigError(f"{name}={_without_userinfo(raw)!r} is not a proxy URL like http://host:3128")
    no_proxy = values.get("NO_PROXY") or values.get("no_proxy") or ""
    host = urlsplit(base_url).hostname or ""
    if no_proxy:
        # urllib.request loads ssl, which the gunicorn master must not import before workers patch it.
        from urllib.request import proxy_bypass_environment

        if proxy_bypass_environment(host, {"no": no_proxy}):
            return None
    netloc = parts.netloc if port else f"{parts.netloc}:80"
    return f"http://{netloc}"


def _log_db(raw: str) -> str:
    """OPENAI_PROXY_LOG_DB: a SQLite file path or a postgresql:// URL (`openai_proxy.log.url`)."""
    try:
        return logurl.check(raw)
    except ValueError as exc:
        raise ConfigError(f"OPENAI_PROXY_LOG_DB={logurl.shown(raw)!r}: {exc}") from None


_HOST_NAME = re.compile(r"[A-Za-z0-9._:@/+-]{1,200}")


def _host_name(raw: str) -> str:
    """OPENAI_PROXY_HOST_NAME names this server on every record: 1 to 200 printable characters, no spaces."""
    if not _HOST_NAME.fullmatch(raw):
        raise ConfigError(
            f"OPENAI_PROXY_HOST_NAME={raw[:60]!r} must be 1 to 200 letters, digits or . _ : @ / + - "
            "(no spaces); it names this server on the records of a shared log"
        )
    return raw


def _redis_uri(var: str, raw: str) -> str:
    """A Redis URL (`redis[s]://[[user]:password@]host[:port][/db]`) and nothing else, so a typo stops
    the server instead of quietly counting per host (N hosts would make N x a limit)."""
    shown = _without_userinfo(raw)
    parts = urlsplit(raw)
    if parts.scheme.lower() not in ("redis", "rediss"):
        raise ConfigError(
            f"{var}={shown!r}: only redis:// or rediss:// URLs such as redis://host:6379/0 are supported"
        )
    try:
        parts.port  # noqa: B018 - raises on a port that is not a number
    except ValueError:
        raise ConfigError(f"{var}={shown!r} has an invalid port") from None
    if not parts.hostname:
        raise ConfigError(f"{var}={shown!r} has no host (redis://host:6379/0)")
    if not re.fullmatch(r"/?(\d+)?", parts.path) or parts.query or parts.fragment:
        raise ConfigError(
            f"{var}={shown!r}: after the host only a database number may follow (redis://host:6379/0)"
        )
    return raw


def _seconds(var: str, raw: str) -> float:
    """A number of seconds > 0 (fractions allowed). No fallback: a Redis timeout or retry interval is
    set on purpose, for a network the default does not fit, so a typo must not quietly undo it."""
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if not (0 < value < math.inf):
        raise ConfigError(f"{var}={raw!r} is not a number of seconds > 0 (such as 0.25)")
    return value


def _drain_delay(values: Mapping[str, str], graceful_timeout_s: int, warnings: list[str]) -> float:
    """OPENAI_PROXY_DRAIN_DELAY_S: seconds (fractions too) >= 0 and below the graceful timeout, which
    it is part of; anything else is 0 with a warning."""
    raw = (values.get("OPENAI_PROXY_DRAIN_DELAY_S") or "").strip()
    if not raw:
        return 0.0
    try:
        value = float(raw)
    except ValueError:
        value = float("nan")
    if 0 <= value < graceful_timeout_s:
        return value
    warnings.append(
        f"OPENAI_PROXY_DRAIN_DELAY_S={raw!r} is not a number of seconds >= 0 and below "
        f"OPENAI_PROXY_GRACEFUL_TIMEOUT_S ({graceful_timeout_s}); using 0"
    )
    return 0.0


_SWITCH = {
    "on": True,
    "true": True,
    "1": True,
    "yes": True,
    "off": False,
    "false": False,
    "0": False,
    "no": False,
}


def _switch(values: Mapping[str, str], var: str, default: bool, warnings: list[str]) -> bool:
    """An on/off variable (`on`/`off`, `true`/`false`, `1`/`0`, `yes`/`no`); anything else is the
    default, with a warning."""
    raw = (values.get(var) or "").strip()
    if not raw:
        return default
    value = _SWITCH.get(raw.lower())
    if value is None:
        warnings.append(f"{var}={raw!r} is not on or off; using {'on' if default else 'off'}")
        return default
    return value


def _otel(values: Mapping[str, str], warnings: list[str]) -> tuple[tuple[str, str], ...]:
    """The `OTEL_*` variables that are set; an endpoint that is not a URL stops the server, and a
    protocol other than OTLP/HTTP with protobuf (the only one shipped) is named in a warning."""
    found = tuple(
        sorted(
            (name, value.strip())
            for name, value in values.items()
            if name.startswith(OTEL_PREFIX) and value.strip()
        )
    )
    settings = dict(found)
    for name in OTEL_ENDPOINT_VARS:
        raw = settings.get(name)
        if raw is None:
            continue
        parts = urlsplit(raw)
        try:
            parts.port  # noqa: B018 - raises on a port that is not a number
        except ValueError:
            parts = parts._replace(scheme="")
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ConfigError(
                f"{name}={_without_userinfo(raw)!r} is not an http:// or https:// URL like http://collector:4318"
            )
    for name in _OTEL_PROTOCOL_VARS:
        protocol = settings.get(name)
        if protocol is not None and protocol != "http/protobuf":
            warnings.append(f"{name}={protocol!r}: spans are only sent as OTLP over HTTP (http/protobuf)")
    return found


def read_environment(
    environ: Mapping[str, str] | None = None, directory: str | os.PathLike[str] | None = None
) -> dict[str, str]:
    """Merge `.env`, then `.env.local`, then the real environment (later wins)."""
    base = Path(directory) if directory is not None else Path.cwd()
    merged: dict[str, str] = {}
    for name in (".env", ".env.local"):
        path = base / name
        if path.is_file():
            merged.update({k: v for k, v in dotenv_values(path).items() if v is not None})
    merged.update(os.environ if environ is None else environ)
    return merged


def _parse_port(raw: str) -> int:
    """PORT has no safe fallback: a server on another port than the one asked for is unreachable."""
    text = raw.strip()
    if text.isascii() and text.isdigit() and 1 <= int(text) <= 65535:
        return int(text)
    raise ConfigError(f"PORT={raw!r} is not a port number (1-65535)")


def _default_words(attr: str, default: int) -> str:
    """What a setting falls back to, in words the operator can check."""
    if attr == "workers":
        return f"one worker per available CPU ({available_cpus()})"
    return f"the default {default}"


def _parse_positive_int(name: str, raw: str, default: int, warnings: list[str], attr: str = "") -> int:
    text = raw.strip()
    try:
        value = int(text)
    except ValueError:
        try:
            as_float = float(text)
        except ValueError:
            as_float = float("nan")
        value = int(as_float) if as_float.is_integer() else 0
    if value > 0:
        return value
    warnings.append(f"{name}={raw!r} is not an integer > 0; using {_default_words(attr, default)}")
    return default


def build_config(values: Mapping[str, str]) -> Config:
    """Build a validated Config from a flat mapping of variables (see `read_environment`)."""
    defaults = Config()
    kwargs: dict[str, object] = {}
    warnings: list[str] = unknown_variable_warnings(values)
    for var, attr in _INT_VARS.items():
        raw = values.get(var)
        if raw is None or raw.strip() == "":
            continue
        if attr == "port":
            kwargs[attr] = _parse_port(raw)
        else:
            kwargs[attr] = _parse_positive_int(var, raw, getattr(defaults, attr), warnings, attr)
    for var, attr in _SECONDS_VARS.items():
        raw = values.get(var)
        if raw is not None and raw.strip() != "":
            kwargs[attr] = _seconds(var, raw)
    for attr, names in _STR_VARS.items():
        for name in names:
            raw = values.get(name)
            if raw is not None and raw.strip() != "":
                kwargs[attr] = raw.strip()
                break
    kwargs["openai_base_url"] = base_url = _base_url(str(kwargs.get("openai_base_url", DEFAULT_BASE_URL)))
    kwargs["outbound_proxy"] = outbound_proxy(values, base_url)
    ca_bundle = kwargs.get("ca_bundle")
    if isinstance(ca_bundle, str) and not os.path.isfile(ca_bundle):
        raise ConfigError(f"OPENAI_PROXY_CA_BUNDLE / SSL_CERT_FILE: no such PEM file {ca_bundle!r}")
    gate_uri = kwargs.get("gate_uri")
    if isinstance(gate_uri, str):
        kwargs["gate_uri"] = _redis_uri("OPENAI_PROXY_GATE_URI", gate_uri)
    single = kwargs.get("openai_api_key")
    try:
        kwargs["upstream_keys"] = parse_api_keys(
            single if isinstance(single, str) else None, values.get("OPENAI_API_KEYS")
        )
    except KeySpecError as exc:
        raise ConfigError(str(exc)) from None
    log_db = kwargs.get("log_db")
    if isinstance(log_db, str):
        kwargs["log_db"] = _log_db(log_db)
    limits_uri = kwargs.get("limits_uri")
    if isinstance(limits_uri, str):
        kwargs["limits_uri"] = _redis_uri("OPENAI_PROXY_LIMITS_URI", limits_uri)
    if isinstance(kwargs.get("host_name"), str):
        kwargs["host_name"] = _host_name(str(kwargs["host_name"]))
    for attr, var in _RATE_LIMIT_VARS.items():
        raw = kwargs.get(attr)
        if isinstance(raw, str) and not is_rate_limit(raw):
            default = getattr(defaults, attr)
            warnings.append(
                f"{var}={raw!r} is not a rate limit like '60/minute'; using the default {default}"
            )
            del kwargs[attr]

    kwargs["safety_identifier"] = _switch(
        values, "OPENAI_PROXY_SAFETY_IDENTIFIER", defaults.safety_identifier, warnings
    )
    kwargs["otel"] = _otel(values, warnings)
    config = Config(**kwargs)  # type: ignore[arg-type]
    drain_delay_s = _drain_delay(values, config.graceful_timeout_s, warnings)
    config = dataclasses.replace(config, drain_delay_s=drain_delay_s)
    if config.upstream_max_timeout_ms < config.upstream_timeout_ms:
        warnings.append(
            f"OPENAI_PROXY_UPSTREAM_MAX_TIMEOUT_MS ({config.upstream_max_timeout_ms}) is below the default "
            f"timeout ({config.upstream_timeout_ms}); the effective max is {config.effective_max_timeout_ms}"
        )
    if not config.security_key and not config.clients_file:
        warnings.append(
            "SECURITY_KEY is not set: every API route answers 403 until it is configured (never open)"
        )
    if not config.openai_api_key and not config.upstream_keys:
        warnings.append(
            "OPENAI_API_KEY is not set: upstream calls only work with a per-request openai_api_key"
        )
    if not config.access_token:
        warnings.append("ACCESS_TOKEN is not set: the health, log, metrics and debug pages answer 403")
    return dataclasses.replace(config, warnings=tuple(warnings))


def load_config(directory: str | os.PathLike[str] | None = None, *, warn: bool = True) -> Config:
    """Read the process environment and the dotenv files once, and log what needs attention."""
    config = build_config(read_environment(directory=directory))
    if warn:
        for message in config.warnings:
            log.warning("CONFIG WARNING: %s", message)
    return config
