"""The scenarios: each starts its own fake upstream and proxy, warms up, then runs the same load through
the proxy and directly against the fake, `runs` times, alternating which goes first. With --original,
the original Node proxy runs beside them against the same fake, a third side in the same rotation.

Every run of every side yields a flat dict of metrics (see `json_metrics`, `stream_metrics`); the
report takes medians over runs. CPU is per owner (proxy tree, fake, load tools, this process, the
rest of the machine), so a reader can see when the instrument rather than the proxy used the cores.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import statistics
import time
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass, replace
from pathlib import Path

from bench.meter import CpuUse, Meter
from bench.procs import (
    KEY,
    ORIGINAL_PORT,
    FakeProc,
    FakeSettings,
    Proc,
    fake_lateness,
    pss_bytes,
    start_original,
    start_proxy,
    start_redis,
    start_upstream,
)
from bench.sse_load import ClientRun, StreamPlan, run_streams
from bench.wrk import WrkResult, wrk

Metrics = dict[str, float]
SIDES = ("proxy", "direct")
ORIGINAL = "original"  # the third side with --original: the Node proxy this project replaces
MIB = 2**20
LATE_STEP_MS = 0.25  # bench.fake_upstream.LATE_STEP_MS (not imported: that module is the fake's)


def chat_body(total_bytes: int = 0) -> dict:
    """A small chat request, or one padded so that its JSON is exactly `total_bytes` long."""
    body = {
        "model": "gpt-4o-mini",
        "messages": [{"role": "user", "content": "What is TypeScript?"}],
        "max_tokens": 50,
    }
    if total_bytes:
        body["messages"][0]["content"] = ""
        body["messages"][0]["content"] = "x" * (total_bytes - len(json.dumps(body)))
    return body


STREAM_BODY = {"model": "gpt-4o-mini", "input": "Write a poem.", "stream": True}


@dataclass(frozen=True)
class Scenario:
    key: str
    title: str
    kind: str  # "json" or "stream"
    connections: int = 1  # json
    latency_ms: float = 0.0  # json
    body_bytes: int = 0  # json: 0 = the small chat body
    streams: int = 0  # stream
    mode: str = ""  # stream: "steady" or "burst"
    tls: bool = False  # json: the fake serves HTTPS (the proxy's upstream leg, and wrk's direct runs)
    redis_gate: bool = False  # json: the proxy's gate is the fleet-wide one, in a redis-server of the run's
    clients: int = 0  # json: a clients file of this many clients, all with limits; the load is one of them

    @property
    def plain_twin(self) -> str | None:
        """The key of the same load with a plain-HTTP upstream, for an HTTPS scenario."""
        return self.key.removesuffix("_tls") if self.tls else None

    @property
    def unnamed_twin(self) -> str | None:
        """The key of the same load with SECURITY_KEY alone, for a scenario with a clients file."""
        return self.key.removesuffix("_clients") if self.clients else None

    @property
    def local_twin(self) -> str | None:
        """The key of the same load with the default (local) gate, for a Redis gate scenario."""
        return self.key.removesuffix("_redis") if self.redis_gate else None


@dataclass
class ScenarioResult:
    scenario: Scenario
    runs: list[dict[str, Metrics]]  # per run: side -> metrics
    notes: list[str]


def median_metrics(runs: list[dict[str, Metrics]], side: str) -> Metrics:
    """Median of each metric over runs; counts of failures are summed instead (one lost stream is a loss)."""
    out: Metrics = {}
    for key in runs[0][side]:
        values = [r[side][key] for r in runs if not math.isnan(r[side].get(key, math.nan))]
        if not values:
            out[key] = math.nan
        elif key in ("errors", "lost"):
            out[key] = sum(values)
        else:
            out[key] = statistics.median(values)
    return out


def pct(values: list[float], q: float) -> float:
    """The q-th percentile (nearest rank) of `values`; NaN when empty."""
    if not values:
        return math.nan
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q / 100.0 * len(ordered)) - 1))]


def lateness_pct(before: list[int], after: list[int], q: float) -> float:
    """Percentile of the fake's write lateness (ms) between two readings of its histogram."""
    counts = [b - a for a, b in zip(before, after, strict=True)]
    total = sum(counts)
    if not total:
        return math.nan
    rank, seen = q / 100.0 * total, 0
    for bucket, count in enumerate(counts):
        seen += count
        if seen >= rank:
            return (bucket + 1) * LATE_STEP_MS
    return len(counts) * LATE_STEP_MS


def cpu_metrics(cpu: CpuUse) -> Metrics:
    workers = sorted(cpu.workers_s, reverse=True)
    busiest = 100.0 * workers[0] / sum(workers) if workers and sum(workers) else math.nan
    return {
        "proxy_cores": cpu.cores(cpu.proxy_s),
        "busiest_worker_pct": busiest,
        "fake_cores": cpu.cores(cpu.fake_s),
        "client_cores": cpu.cores(cpu.client_s),
        "bench_cores": cpu.cores(cpu.bench_s),
        "other_cores": cpu.cores(cpu.other_s),
        "machine_busy_pct": cpu.machine_busy_pct,
    }


# ---- JSON scenarios (wrk) ---------------------------------------------------------------------------


def json_metrics(
    result: WrkResult, cpu: CpuUse, meter: Meter, proxy: Proc | None, fake_conns: int, redis: bool = False
) -> Metrics:
    requests = max(result.requests, 1)
    metrics: Metrics = {
        "rps": result.rps,
        "requests": float(result.requests),
        # Connections opened to the fake during the run (those that carried a request): wrk's own on
        # the direct side; on the proxy side the proxy's new upstream connections (0 when the pool it
        # filled during the warm-up is reused).
        "fake_conns": float(fake_conns),
        "p50_ms": result.p50_ms,
        "p99_ms": result.p99_ms,
        "max_ms": result.max_ms,
        "errors": float(result.errors),
        "proxy_cpu_ms_per_req": cpu.proxy_s * 1000.0 / requests if proxy else math.nan,
        # The Redis gate's server-side cost, and the proxy's CPU with it (with the local gate: the same).
        "redis_cpu_us_per_req": cpu.redis_s * 1e6 / requests if proxy and redis else math.nan,
        "proxy_redis_cpu_ms_per_req": (cpu.proxy_s + cpu.redis_s) * 1000.0 / requests if proxy else math.nan,
        "fake_cpu_us_per_req": cpu.fake_s * 1e6 / requests,
        "client_cpu_us_per_req": result.cpu_s * 1e6 / requests,
        **cpu_metrics(cpu),
        "rss_peak_mib": meter.rss_peak / MIB if proxy else math.nan,
        "pss_mib": pss_bytes(proxy.pid) / MIB if proxy else math.nan,
    }
    return metrics


def sides(opts: argparse.Namespace) -> tuple[str, ...]:
    return (*SIDES, ORIGINAL) if getattr(opts, "original", None) else SIDES


def rotated(order: tuple[str, ...], i: int) -> tuple[str, ...]:
    """Run i's order: each side goes first in turn (with two sides: alternating)."""
    k = i % len(order)
    return order[k:] + order[:k]


def clients_file(workdir: Path, count: int) -> tuple[dict[str, str], str]:
    """A clients file of `count` clients, each with every limit set (high enough never to refuse the
    load, so each request pays for admitting and charging), keys as SHA-256 as operators would store
    them; the load sends the key of one in the middle. Returns the proxy's env and that key."""
    lines = []
    for i in range(count):
        digest = hashlib.sha256(f"bench-client-{i}-key".encode()).hexdigest()
        lines.append(f'[[client]]\nname = "client-{i}"\nkey_sha256 = "{digest}"\nrpm = 100000000\n'
                     f"tpm = 1000000000000\ndaily_usd = 1000000\nmonthly_usd = 10000000\n")  # fmt: skip
    path = workdir / f"clients-{count}.toml"
    path.write_text("\n".join(lines))
    env = {
        "OPENAI_PROXY_CLIENTS_FILE": str(path),
        "OPENAI_PROXY_LOG_DB": str(workdir / f"log-{count}.sqlite3"),
    }
    return env, f"bench-client-{count // 2}-key"


FEATURE_CLIENTS = 1000
# Three upstream keys, distinct names (OPENAI_API_KEY is left out, so the pool is exactly these).
UPSTREAM_KEYS = ",".join(f"k{c}=sk-bench-{c}{'0' * 16}" for c in "abc")


def features_env(workdir: Path, opts: argparse.Namespace) -> tuple[dict[str, str | None], str]:
    """--features: the proxy's extra environment (a clients file of 1,000 clients with every limit,
    a pool of 3 upstream keys; the request log is on in every run) and the key the load sends (one
    of the clients). Without --features: nothing, and SECURITY_KEY."""
    if not getattr(opts, "features", False):
        return {}, KEY
    env, key = clients_file(workdir, FEATURE_CLIENTS)
    return {**env, "OPENAI_API_KEYS": UPSTREAM_KEYS, "OPENAI_API_KEY": None}, key


def run_json(
    sc: Scenario, opts: argparse.Namespace, workdir: Path, log: Callable[[str], None]
) -> ScenarioResult:
    settings = FakeSettings(latency_ms=sc.latency_ms, procs=opts.upstream_procs, tls=sc.tls)
    body = chat_body(sc.body_bytes)
    client_env, key = features_env(workdir, opts)
    if sc.clients:
        scenario_env, key = clients_file(workdir, sc.clients)
        client_env = {**client_env, **scenario_env}
    payloads = {
        "proxy": json.dumps({**body, "security_key": key}).encode(),
        "direct": json.dumps(body).encode(),
        ORIGINAL: json.dumps({**body, "security_key": KEY}).encode(),  # it has SECURITY_KEY alone
    }
    with ExitStack() as stack:
        fake = stack.enter_context(start_upstream(workdir, settings))
        redis = stack.enter_context(start_redis(workdir)) if sc.redis_gate else None
        # The Redis gate scenarios: the same proxy with OPENAI_PROXY_GATE_URI (default lease).
        gate_env = {"OPENAI_PROXY_GATE_URI": f"redis://127.0.0.1:{redis.port}/0"} if redis else {}
        proxy = stack.enter_context(start_proxy(workdir, fake, opts.max_parallel, {**gate_env, **client_env}))
        # The proxy always listens on plain HTTP; with sc.tls its upstream leg and the direct runs are HTTPS.
        targets = {
            "proxy": (proxy.port, "/openai", False),
            "direct": (fake.port, "/v1/chat/completions", sc.tls),
            ORIGINAL: (ORIGINAL_PORT, "/openai", False),
        }
        conns_start = fake.stats()["connections"]  # the proxy's start-up check
        original = start_original_beside(stack, workdir, fake, opts)
        servers = {"proxy": proxy, ORIGINAL: original}
        conns_original = fake.stats()["connections"] - conns_start if original else 0

        def once(side: str, seconds: float) -> Metrics:
            port, path, tls = targets[side]
            server = servers.get(side)
            conns0 = fake.stats()["connections"]
            meter = Meter(
                server.pid if server else None,
                fake.pid,
                redis_pid=redis.pid if redis and side != ORIGINAL else None,
            )
            result = wrk(
                workdir, port, path, payloads[side], connections=sc.connections, seconds=seconds, tls=tls
            )
            cpu = meter.stop()
            conns = fake.stats()["connections"] - conns0
            return json_metrics(
                result, cpu, meter, server, conns, redis=redis is not None and side == "proxy"
            )

        warm = {side: once(side, opts.warmup_seconds) for side in sides(opts)}
        runs = []
        for i in range(opts.runs):
            runs.append({side: once(side, opts.seconds) for side in rotated(sides(opts), i)})
            p, d = runs[-1]["proxy"], runs[-1]["direct"]
            log(f"  {sc.key} run {i + 1}/{opts.runs}: proxy {p['rps']:,.0f} req/s p50 {p['p50_ms']:.2f} ms, "
                f"direct {d['rps']:,.0f} req/s p50 {d['p50_ms']:.2f} ms; connections opened to the fake: "
                f"{p['fake_conns']:.0f} by the proxy, {d['fake_conns']:.0f} by wrk direct")  # fmt: skip
            if original:
                o = runs[-1][ORIGINAL]
                log(f"  {sc.key} run {i + 1}/{opts.runs}: original {o['rps']:,.0f} req/s p50 "
                    f"{o['p50_ms']:.2f} ms, errors {o['errors']:.0f}, CPU {o['proxy_cpu_ms_per_req']:.3f} "
                    f"ms/req (proxy {p['proxy_cpu_ms_per_req']:.3f})")  # fmt: skip
        notes = (
            [tls_note(fake, conns_start, warm, runs, conns_original if original else None)] if sc.tls else []
        )
        if redis:
            notes.append(
                f"gate in Redis (OPENAI_PROXY_GATE_URI=redis://127.0.0.1:{redis.port}/0, a redis-server "
                "started by the bench on loopback, default 10 s lease); its CPU is reported apart, not as "
                "'other'"
            )
    return ScenarioResult(sc, runs, notes)


def start_original_beside(
    stack: ExitStack, workdir: Path, fake: FakeProc, opts: argparse.Namespace
) -> Proc | None:
    """With --original: the original on port 3002 against the scenario's fake, stopped with it."""
    if not getattr(opts, "original", None):
        return None
    return stack.enter_context(start_original(workdir, fake, opts.max_parallel, opts.original))


def tls_note(
    fake: FakeProc,
    conns_start: int,
    warm: dict[str, Metrics],
    runs: list[dict[str, Metrics]],
    original_start: int | None = None,
) -> str:
    """What TLS the fake negotiated, and how many connections were opened to it in the whole scenario.
    `original_start`: with --original, the connections its start-up check opened."""
    time.sleep(0.2)  # the last wrk has just closed its connections: let the fake see them go
    stats = fake.stats()
    seen = ", ".join(f"{n} x {what}" for what, n in sorted(stats["tls"].items())) or "none"
    in_runs = {side: sum(int(r[side]["fake_conns"]) for r in runs) for side in SIDES}
    proxy_total = conns_start + int(warm["proxy"]["fake_conns"]) + in_runs["proxy"]
    original = ""
    pools = "the proxy's pool"
    if original_start is not None:
        in_runs_o = sum(int(r[ORIGINAL]["fake_conns"]) for r in runs)
        total_o = original_start + int(warm[ORIGINAL]["fake_conns"]) + in_runs_o
        original = (
            f"; by the original {total_o} (start-up check {original_start}, warm-up "
            f"{warm[ORIGINAL]['fake_conns']:.0f}, measured runs {in_runs_o} for "
            f"{sum(r[ORIGINAL]['requests'] for r in runs):,.0f} requests, trusting the CA through "
            "NODE_EXTRA_CA_CERTS)"
        )
        pools = "the proxy's and the original's pools"
    return (
        f"upstream over HTTPS (certificate for 127.0.0.1 from a throwaway trustme CA, trusted by the proxy "
        f"through OPENAI_PROXY_CA_BUNDLE; TLS negotiated: {seen}). Connections opened to the fake in the "
        f"whole scenario: {stats['connections']}; by the proxy {proxy_total} (start-up check {conns_start}, "
        f"warm-up {warm['proxy']['fake_conns']:.0f}, measured runs {in_runs['proxy']} for "
        f"{sum(r['proxy']['requests'] for r in runs):,.0f} requests); by wrk direct "
        f"{int(warm['direct']['fake_conns']) + in_runs['direct']} (warm-up included){original}; still open "
        f"at the end (wrk's are closed, so: {pools}): {stats['connections_open']}"
    )


# ---- stream scenarios ---------------------------------------------------------------------------------


def open_streams(run: ClientRun, start: float, end: float, step: float = 0.05) -> float:
    """Median number of streams open at `step`-spaced instants in [start, end) (seconds after t0)."""
    spans = [(r.start, r.end if r.end is not None else math.inf) for r in run.records]
    counts = []
    t = start
    while t < end:
        counts.append(sum(1 for a, b in spans if a <= t < b))
        t += step
    return statistics.median(counts) if counts else math.nan


def stream_metrics(
    run: ClientRun, cpu: CpuUse, meter: Meter, proxy: Proc | None, late: float, gap_ms: float
) -> Metrics:
    plan = run.plan
    measured = run.measured()
    firsts = [r.first_s * 1000.0 for r in measured if r.first_s is not None]
    gaps = [g * 1000.0 - gap_ms for r in measured if (g := r.worst_gap_s()) is not None]
    events = sum(r.events for r in run.records)
    ends = [r.end for r in run.records if r.end is not None]
    span = max(ends) - min(r.start for r in run.records) if ends else math.nan
    started_late = [
        (r.start - r.scheduled) * 1000.0
        for r in run.records
        if plan.mode == "burst" or r.scheduled < plan.ramp_s
    ]
    window_end = plan.ramp_s + plan.hold_s if plan.mode == "steady" else plan.events * gap_ms / 1000.0
    return {
        "streams": float(len(run.records)),
        "measured": float(len(measured)),
        "lost": float(sum(1 for r in run.records if not r.complete)),
        "open_streams": open_streams(run, plan.ramp_s if plan.mode == "steady" else 0.0, window_end),
        "first_p50_ms": pct(firsts, 50),
        "first_p99_ms": pct(firsts, 99),
        "gap_p50_ms": pct(gaps, 50),
        "gap_p99_ms": pct(gaps, 99),
        "events_per_s": events / span if span and span > 0 else math.nan,
        "proxy_cpu_us_per_event": cpu.proxy_s * 1e6 / max(events, 1) if proxy else math.nan,
        "fake_cpu_us_per_event": cpu.fake_s * 1e6 / max(events, 1),
        "client_cpu_us_per_event": run.cpu_s * 1e6 / max(events, 1),
        **cpu_metrics(cpu),
        "client_lag_p99_ms": pct(run.loop_lag_ms, 99),
        "late_start_p99_ms": pct(started_late, 99),
        "fake_late_p99_ms": late,
        "rss_peak_mib": meter.rss_peak / MIB if proxy else math.nan,
    }


def stream_plan(sc: Scenario, opts: argparse.Namespace, port: int, side: str, key: str = KEY) -> StreamPlan:
    """The load of one side. The proxy and the original both relay on `/openai2` and both end a stream
    with `data: [DONE]` (the original writes it after the upstream's last event, then ends the body)."""
    duration = opts.events * opts.gap_ms / 1000.0
    relayed = side != "direct"
    return StreamPlan(
        port=port,
        path="/openai2" if relayed else "/v1/responses",
        body={**STREAM_BODY, "security_key": key} if relayed else dict(STREAM_BODY),
        streams=sc.streams,
        mode=sc.mode,
        ramp_s=opts.ramp_s if opts.ramp_s is not None else duration,
        hold_s=opts.hold_s,
        events=opts.events,
        want_done=relayed,
        timeout_s=duration + 30.0,
        procs=opts.client_procs or max(1, min(os.cpu_count() or 1, math.ceil(sc.streams / 500))),
        fresh_connections=opts.fresh_connections,
        poll_ms=opts.poll_ms,
    )


def run_stream(
    sc: Scenario, opts: argparse.Namespace, workdir: Path, log: Callable[[str], None]
) -> ScenarioResult:
    # With the original, the fake sends full Responses streams (to all three sides): the openai Node
    # SDK's stream helper the original relays through cannot rebuild the short ones.
    settings = FakeSettings(
        events=opts.events,
        gap_ms=opts.gap_ms,
        procs=opts.upstream_procs,
        full_stream=bool(getattr(opts, "original", None)),
    )
    extra_env, key = features_env(workdir, opts)
    with ExitStack() as stack:
        fake = stack.enter_context(start_upstream(workdir, settings))
        proxy = stack.enter_context(start_proxy(workdir, fake, opts.max_parallel, extra_env))
        original = start_original_beside(stack, workdir, fake, opts)
        ports = {"proxy": proxy.port, "direct": fake.port, ORIGINAL: ORIGINAL_PORT}
        servers = {"proxy": proxy, ORIGINAL: original}

        def once(side: str, hold_s: float | None = None) -> Metrics:
            plan = stream_plan(sc, opts, ports[side], side, key if side == "proxy" else KEY)
            if hold_s is not None:
                plan = replace(plan, hold_s=hold_s)
            server = servers.get(side)
            late0 = fake_lateness(fake)
            meter = Meter(server.pid if server else None, fake.pid)
            run = run_streams(plan, workdir)
            cpu = meter.stop()
            late = lateness_pct(late0, fake_lateness(fake), 99)
            return stream_metrics(run, cpu, meter, server, late, opts.gap_ms)

        for side in sides(opts):
            once(side, hold_s=0.0)
        runs = []
        for i in range(opts.runs):
            runs.append({side: once(side) for side in rotated(sides(opts), i)})
            p, d = runs[-1]["proxy"], runs[-1]["direct"]
            log(f"  {sc.key} run {i + 1}/{opts.runs}: proxy first-event p99 {p['first_p99_ms']:.1f} ms, "
                f"lost {p['lost']:.0f}; direct first-event p99 {d['first_p99_ms']:.1f} ms, lost {d['lost']:.0f}")  # fmt: skip
            if original:
                o = runs[-1][ORIGINAL]
                log(f"  {sc.key} run {i + 1}/{opts.runs}: original first-event p99 {o['first_p99_ms']:.1f} ms, "
                    f"lost {o['lost']:.0f}, CPU {o['proxy_cpu_us_per_event']:.1f} µs/event "
                    f"(proxy {p['proxy_cpu_us_per_event']:.1f})")  # fmt: skip
        plan = stream_plan(sc, opts, 0, "proxy")
        notes = [
            f"{sc.mode}: {sc.streams} slots, {plan.procs} client process(es), "
            + (
                f"starts spread over {plan.ramp_s:g} s then each slot reopens at once for {plan.hold_s:g} s "
                f"({'new connection' if plan.fresh_connections else 'keep-alive connection'} per stream)"
                if sc.mode == "steady"
                else "all opened at t0 on new connections"
            )
        ]
        if original:
            notes.append(
                "with the original, the fake sends full Responses streams to all three sides (the output "
                "item and its content part announced before the deltas, the whole response in "
                "response.completed), as the openai Node SDK's stream helper the original relays through "
                "needs; its streams end, like the proxy's, with data: [DONE]"
            )
    return ScenarioResult(sc, runs, notes)


def run_scenario(
    sc: Scenario, opts: argparse.Namespace, workdir: Path, log: Callable[[str], None]
) -> ScenarioResult:
    return (run_json if sc.kind == "json" else run_stream)(sc, opts, workdir, log)
