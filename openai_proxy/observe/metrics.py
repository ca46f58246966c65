"""Prometheus metrics, correct across gunicorn workers (prometheus_client's multiprocess mode).

Each worker writes its samples to its own files in one directory (`PROMETHEUS_MULTIPROC_DIR`, inside
the runtime dir); `/metrics`, served by any worker, merges them all. prometheus_client reads that
variable once, when first imported, to choose where values live: gunicorn.conf.py sets it in the
master before forking; a lone process (tests, a dev server) sets it here, before the first import.
Request metrics are fed from the completion record (one sink), so routes never touch them.

A request changes about ten values; in multiprocess mode each change is a locked write to the
worker's memory-mapped file. They are added up in memory instead and written once per turn of the
event loop (`Tally`): the requests a turn finishes cost one write per value they touched, and a
reader in this worker (`exposition`, `key_calls_by_key`) writes what is pending first. Nothing waits
longer than the worker's current turn, so a scrape that follows an answer still counts it.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from typing import Any

from openai_proxy.gate import SlotGate
from openai_proxy.keys import UpstreamKeys
from openai_proxy.observe.prices import PriceTable

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
# LLM calls take from tens of milliseconds to the 15-minute stream cap.
LATENCY_BUCKETS = (0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120, 300, 600, 900)
MAX_MODELS = 100
MAX_TOKENS = 2**53
# The attempt outcomes that were a 429 from upstream (openai_proxy.keys.pool's names).
KEY_429_OUTCOMES = ("rate_limited", "insufficient_quota")


def multiprocess_dir(runtime_dir: str) -> str:
    """The directory prometheus_client writes to in this process, chosen now if nobody has yet."""
    # prometheus_client's own process-wide switch (not a proxy setting): whatever is set when it is
    # first imported is where every value of this process goes.
    path = os.environ.get(MULTIPROC_ENV)
    if not path:
        path = os.path.join(runtime_dir, "metrics")
        os.environ[MULTIPROC_ENV] = path
    os.makedirs(path, exist_ok=True)
    return path


class Tally:
    """Pending increments of prometheus_client values, written once per turn of the event loop.

    Keys are the value objects behind metric children (a counter's or gauge's value, a histogram's
    sum and bucket values): adding to them is what `inc`, `dec` and `observe` do, one lock and one
    file write each. Here a request's changes are summed in a dict, and `flush` (scheduled on the
    gevent loop at the first change of a turn, and called by readers) writes each once.
    """

    def __init__(self) -> None:
        self._pending: dict[Any, float] = {}
        self._armed = False
        # The thread whose event loop writes the pending values (the worker's, where requests run);
        # a change made in any other thread is written at once.
        self._thread = threading.get_ident()

    def add(self, value: Any, amount: float) -> None:
        if threading.get_ident() != self._thread:
            value.inc(amount)
            return
        pending = self._pending
        pending[value] = pending.get(value, 0.0) + amount
        if not self._armed:
            self._armed = True
            import gevent

            gevent.get_hub().loop.run_callback(self.flush)

    def flush(self) -> None:
        self._armed = False
        pending, self._pending = self._pending, {}
        for value, amount in pending.items():
            if amount:
                value.inc(amount)


class GateCollector:
    """Slots in use across the whole server (the whole fleet with the Redis gate), counted by whichever
    worker is scraped."""

    def __init__(self, gate: SlotGate) -> None:
        self.gate = gate

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import GaugeMetricFamily

        yield GaugeMetricFamily(
            "openai_proxy_gate_slots_in_use",
            "Upstream calls in flight, all workers (all servers sharing the Redis gate)",
            value=self.gate.in_use(),
        )
        yield GaugeMetricFamily(
            "openai_proxy_gate_slots_limit", "OPENAI_PROXY_MAX_PARALLEL_REQUESTS", value=self.gate.limit
        )
        status = self.gate.status()
        if "fallback" in status:  # the fleet-wide gate (Redis): is this worker on the host's own gate?
            yield GaugeMetricFamily(
                "openai_proxy_gate_fallback",
                "1 while Redis does not answer and the host's own gate stands in for the fleet's",
                value=int(bool(status["fallback"])),
            )


class KeyPoolCollector:
    """Each upstream key's state on the host, read from the pool's shared table when scraped."""

    def __init__(self, pool: UpstreamKeys) -> None:
        self.pool = pool

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import GaugeMetricFamily

        keys = self.pool.describe()
        families = (
            ("openai_proxy_upstream_key_in_flight", "Calls in flight per upstream key, all workers",
             lambda k: k["inFlight"]),
            ("openai_proxy_upstream_key_resting_seconds", "Seconds until a key rested after a 429 is used again",
             lambda k: k.get("restingForS") or 0.0),
            ("openai_proxy_upstream_key_revoked", "1 for a key out of use until restart or reload (401, 403, "
             "insufficient_quota)", lambda k: 1 if k["state"] == "revoked" else 0),
        )  # fmt: skip
        for name, doc, value in families:
            family = GaugeMetricFamily(name, doc, labels=["key"])
            for key in keys:
                family.add_metric([key["name"]], value(key))
            yield family


class Metrics:
    """The proxy's metrics for one worker, and the exposition of the whole server's."""

    def __init__(self, runtime_dir: str, gate: SlotGate, prices: PriceTable | None = None) -> None:
        self.dir = multiprocess_dir(runtime_dir)
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, values

        # If prometheus_client was imported before the directory was set (only possible in a process
        # that imported it early on purpose), values live in memory: expose this process's own.
        self.multiprocess = bool(getattr(values.ValueClass, "_multiprocess", False))
        self._own = None if self.multiprocess else CollectorRegistry()
        if self._own is not None:
            self._own.register(GateCollector(gate))
        self.gate = gate
        self.prices = prices
        self._collectors: list[Any] = []
        self._models: set[str] = set()
        self._children: dict[tuple[Any, tuple[str, ...]], Any] = {}
        self.tally = Tally()
        reg = self._own
        route = ["route"]
        self.requests = Counter("openai_proxy_requests", "API requests by route, method, HTTP status and result",
                                ["route", "method", "status", "result", "client"], registry=reg)  # fmt: skip
        self.duration = Histogram("openai_proxy_request_duration_seconds", "Whole request, as the client saw it",
                                  route, buckets=LATENCY_BUCKETS, registry=reg)  # fmt: skip
        self.upstream_duration = Histogram("openai_proxy_upstream_duration_seconds",
                                           "Upstream: until its answer (JSON) or its headers (streams)",
                                           route, buckets=LATENCY_BUCKETS, registry=reg)  # fmt: skip
        self.in_flight = Gauge("openai_proxy_requests_in_flight", "API requests being served",
                               multiprocess_mode="livesum", registry=reg)  # fmt: skip
        self.overloads = Counter(
            "openai_proxy_overloads", "Requests refused with 503 (gate full)", route, registry=reg
        )
        self.cancellations = Counter(
            "openai_proxy_cancellations", "Requests the client gave up on", route, registry=reg
        )
        self.retries = Counter(
            "openai_proxy_upstream_retries", "Upstream attempts retried", route, registry=reg
        )
        self.limit_rejections = Counter("openai_proxy_limit_rejections",
                                        "Requests refused because a client is past one of its limits",
                                        ["client", "limit"], registry=reg)  # fmt: skip
        self.tokens = Counter("openai_proxy_tokens", "Token usage reported by upstream",
                              ["model", "kind", "client"], registry=reg)  # fmt: skip
        # Model labels here are rows of the price table (or "other"), so the series stay bounded.
        self.cost = Counter("openai_proxy_cost_usd", "USD spent, at the price table's prices",
                            ["client", "model"], registry=reg)  # fmt: skip
        self.unpriced = Counter("openai_proxy_unpriced_requests", "Requests with usage but no price",
                                ["client", "model"], registry=reg)  # fmt: skip
        self.log_dropped = Counter(
            "openai_proxy_log_dropped", "Request log records dropped from a full queue", registry=reg
        )
        self.log_rejected = Counter(
            "openai_proxy_log_rejected_records",
            "Request log records the database refused as they were (a value too large, a NUL...): "
            "written without the refused values, or skipped",
            registry=reg,
        )
        self.key_calls = Counter("openai_proxy_upstream_key_calls", "Upstream attempts per pool key and outcome",
                                 ["key", "outcome"], registry=reg)  # fmt: skip

    def add_collector(self, collector: Any) -> None:
        """Another collector read at each scrape (it sees the whole server by itself, like the gate's)."""
        self._collectors.append(collector)
        if self._own is not None:
            self._own.register(collector)

    def limit_rejected(self, client: str, limit: str) -> None:
        """A client's request was refused by its own limit (names come from the clients file only)."""
        self._inc(self.limit_rejections, (client, limit))

    def request_started(self) -> None:
        """An API request began (its completion record will end it in `observe`)."""
        self.tally.add(self._in_flight_value, 1.0)

    def observe(self, entry: dict[str, Any]) -> None:
        """Completion sink: count one finished API request."""
        add = self.tally.add
        add(self._in_flight_value, -1.0)
        route = entry.get("endpoint") or "unknown"
        status = str(entry.get("status") or 0)
        client = entry.get("client") or "none"
        self._inc(
            self.requests,
            (route, entry.get("method") or "", status, entry.get("result") or "unknown", client),
        )
        self._observe(self.duration, route, (entry.get("durationMs") or 0.0) / 1000.0)
        if entry.get("upstreamMs") is not None:
            self._observe(self.upstream_duration, route, entry["upstreamMs"] / 1000.0)
        if entry.get("overloaded"):
            self._inc(self.overloads, (route,))
        if entry.get("cancelled"):
            self._inc(self.cancellations, (route,))
        if entry.get("retries"):
            self._inc(self.retries, (route,), entry["retries"])
        for attempt in entry.get("attempts") or ():
            self._inc(self.key_calls, (attempt["key"], attempt["outcome"]))
        # Usage of calls that name a model: a retrieved response's usage was counted when it was made.
        usage, model = entry.get("usage"), entry.get("model")
        if usage and model:
            model = self._model_label(model[:200])
            for kind in ("prompt", "completion", "cached"):
                tokens = usage.get(f"{kind}_tokens")
                # A count past 2**53 (upstream nonsense) would leave the series a float that no
                # later count can move: left out, like the log's aggregates leave it out.
                if isinstance(tokens, int) and 0 < tokens < MAX_TOKENS:
                    self._inc(self.tokens, (model, kind, client), tokens)
        if usage:
            self._count_cost(entry, client)

    def _count_cost(self, entry: dict[str, Any], client: str) -> None:
        cost = entry.get("costUsd")
        name = entry.get("upstreamModel") or entry.get("model")
        priced = self.prices.row_name(name) if self.prices else None
        if cost is None:
            self._inc(self.unpriced, (client, priced or "other"))
        elif cost > 0:
            self._inc(self.cost, (client, priced or "other"), cost)

    def log_record_dropped(self) -> None:
        """The log store's queue was full (its database slow or unreachable): one record lost."""
        self.tally.add(self.log_dropped._value, 1.0)

    def log_records_rejected(self, n: int) -> None:
        """The log's database refused `n` records of a batch as they were (the rest was written)."""
        self.tally.add(self.log_rejected._value, float(n))

    def _child(self, metric: Any, labels: tuple[str, ...]) -> Any:
        # `labels()` locks and builds its key on every call; this runs once per request, so reuse.
        key = (metric, labels)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*labels)
        return child

    # Children's value objects (`_value`; a histogram's `_sum`, `_buckets` and `_upper_bounds`) are
    # what their own `inc` and `observe` add to; the tally adds to them once per loop turn instead.
    def _inc(self, metric: Any, labels: tuple[str, ...], amount: float = 1.0) -> None:
        self.tally.add(self._child(metric, labels)._value, amount)

    def _observe(self, metric: Any, route: str, seconds: float) -> None:
        child = self._child(metric, (route,))
        add = self.tally.add
        add(child._sum, seconds)
        for bound, bucket in zip(child._upper_bounds, child._buckets, strict=True):
            if seconds <= bound:
                add(bucket, 1.0)
                break

    def _model_label(self, model: str) -> str:
        # Model names come from clients: cap the series a worker can create.
        if model not in self._models:
            if len(self._models) >= MAX_MODELS:
                return "other"
            self._models.add(model)
        return model

    @property
    def _in_flight_value(self) -> Any:
        return self.in_flight._value

    def key_calls_by_key(self) -> dict[str, dict[str, int]]:
        """Per pool key: upstream attempts and the 429s among them (rate limited or out of quota),
        every worker of this server since it started (`openai_proxy_upstream_key_calls_total`)."""
        self.tally.flush()
        if self._own is not None:
            metrics = self._own.collect()
        else:
            import glob

            from prometheus_client.multiprocess import MultiProcessCollector

            # Counters only: the histograms' files are most of the directory and say nothing here.
            metrics = MultiProcessCollector.merge(glob.glob(os.path.join(self.dir, "counter_*.db")))
        out: dict[str, dict[str, int]] = {}
        for metric in metrics:
            if metric.name != "openai_proxy_upstream_key_calls":
                continue
            for sample in metric.samples:
                if not sample.name.endswith("_total"):
                    continue
                counts = out.setdefault(sample.labels["key"], {"calls": 0, "rateLimited": 0})
                counts["calls"] += int(sample.value)
                if sample.labels["outcome"] in KEY_429_OUTCOMES:
                    counts["rateLimited"] += int(sample.value)
        return out

    def exposition(self) -> tuple[bytes, str]:
        """The Prometheus text of every worker's metrics, and its content type."""
        from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
        from prometheus_client.multiprocess import MultiProcessCollector

        self.tally.flush()
        registry = self._own
        if registry is None:
            registry = CollectorRegistry()
            MultiProcessCollector(registry, path=self.dir)
            registry.register(GateCollector(self.gate))
            for collector in self._collectors:
                registry.register(collector)
        return generate_latest(registry), CONTENT_TYPE_LATEST
