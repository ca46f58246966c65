"""Targets, PASS/FAIL, and the markdown tables and JSON document of a run."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace

from bench.scenarios import ORIGINAL, Scenario, ScenarioResult, median_metrics

IDEAL_C64_RPS = 64 / 0.050  # 64 connections, each waiting 50 ms upstream per request
MEMORY_LIMIT_MIB = 200.0
MEMORY_SCENARIOS = ("c64_50ms", "c64_0ms", "c64_0ms_tls")
TLS_TWINS = ("c1", "c64_0ms")  # the HTTPS scenarios (key + "_tls") share their plain twin's targets


@dataclass(frozen=True)
class Target:
    scenario: str
    metric: str
    basis: str  # "proxy": the proxy's own figure; "added": proxy minus direct
    op: str  # "<=", ">=" or "=="
    limit: float
    label: str


TARGETS = (
    Target("c1", "p50_ms", "added", "<=", 0.5, "added p50 ≤ 0.5 ms"),
    Target("c1", "p99_ms", "added", "<=", 3.0, "added p99 ≤ 3 ms"),
    Target("c64_50ms", "rps", "proxy", ">=", 0.95 * IDEAL_C64_RPS, f"≥ 95 % of {IDEAL_C64_RPS:,.0f} req/s"),
    Target("c64_50ms", "p99_ms", "proxy", "<=", 70.0, "p99 ≤ 70 ms"),
    Target("c64_0ms", "proxy_cpu_ms_per_req", "proxy", "<=", 0.4, "proxy CPU ≤ 0.4 ms/req"),
    Target("streams_steady", "lost", "proxy", "==", 0, "all complete"),
    Target("streams_steady", "first_p99_ms", "proxy", "<=", 50.0, "first event p99 ≤ 50 ms"),
    Target("streams_steady", "gap_p99_ms", "proxy", "<=", 10.0, "worst added gap p99 ≤ 10 ms"),
    Target("streams_steady", "proxy_cpu_us_per_event", "proxy", "<=", 20.0, "proxy CPU ≤ 20 µs/event"),
    Target("body_1mib", "p50_ms", "added", "<=", 3.0, "added p50 ≤ 3 ms"),
)
TARGETS += tuple(replace(t, scenario=f"{t.scenario}_tls") for t in TARGETS if t.scenario in TLS_TWINS)

# What the main table shows for each kind of scenario (all metrics go to the JSON).
JSON_ROWS = ("rps", "p50_ms", "p99_ms", "proxy_cpu_ms_per_req", "errors", "rss_peak_mib", "fake_conns")
STREAM_ROWS = (
    "lost", "open_streams", "first_p50_ms", "first_p99_ms", "gap_p50_ms", "gap_p99_ms",
    "events_per_s", "proxy_cpu_us_per_event",
)  # fmt: skip
UNITS = {
    "rps": "req/s", "p50_ms": "ms", "p99_ms": "ms", "proxy_cpu_ms_per_req": "ms", "errors": "",
    "rss_peak_mib": "MiB", "lost": "streams", "open_streams": "", "first_p50_ms": "ms",
    "first_p99_ms": "ms", "gap_p50_ms": "ms", "gap_p99_ms": "ms", "events_per_s": "events/s",
    "proxy_cpu_us_per_event": "µs", "fake_conns": "",
}  # fmt: skip
NAMES = {
    "rps": "throughput", "p50_ms": "latency p50", "p99_ms": "latency p99",
    "proxy_cpu_ms_per_req": "proxy CPU per request", "errors": "errors (all runs)",
    "rss_peak_mib": "gunicorn tree RSS peak", "lost": "lost streams (all runs)",
    "open_streams": "streams open (median)", "first_p50_ms": "first event p50",
    "first_p99_ms": "first event p99", "gap_p50_ms": "worst added gap p50",
    "gap_p99_ms": "worst added gap p99", "events_per_s": "events relayed",
    "proxy_cpu_us_per_event": "proxy CPU per event",
    "fake_conns": "connections opened to the fake, per run",
}  # fmt: skip


@dataclass
class Verdict:
    scenario: str
    label: str
    value: float
    passed: bool


def judge(op: str, value: float, limit: float) -> bool:
    if math.isnan(value):
        return False
    return {"<=": value <= limit, ">=": value >= limit, "==": value == limit}[op]


def verdicts(results: dict[str, ScenarioResult], soak: dict | None) -> list[Verdict]:
    out = []
    medians = {
        k: (median_metrics(r.runs, "proxy"), median_metrics(r.runs, "direct")) for k, r in results.items()
    }
    for t in TARGETS:
        if t.scenario not in medians:
            continue
        proxy, direct = medians[t.scenario]
        value = proxy[t.metric] - direct[t.metric] if t.basis == "added" else proxy[t.metric]
        out.append(Verdict(t.scenario, t.label, value, judge(t.op, value, t.limit)))
    for key, (proxy, _direct) in medians.items():  # a failed request is never a speed
        if "errors" in proxy:
            out.append(Verdict(key, "no errors", proxy["errors"], proxy["errors"] == 0))
        elif key != "streams_steady":
            out.append(Verdict(key, "all complete", proxy["lost"], proxy["lost"] == 0))
    peaks = [
        max(r["proxy"]["rss_peak_mib"] for r in results[k].runs) for k in MEMORY_SCENARIOS if k in results
    ]
    if peaks:
        out.append(Verdict("memory", f"RSS ≤ {MEMORY_LIMIT_MIB:.0f} MiB at 64 concurrent", max(peaks),
                           max(peaks) <= MEMORY_LIMIT_MIB))  # fmt: skip
    if soak:
        out.append(
            Verdict(
                "soak",
                f"RSS ≤ {MEMORY_LIMIT_MIB:.0f} MiB",
                soak["max_mib"],
                soak["max_mib"] <= MEMORY_LIMIT_MIB,
            )
        )
        out.append(Verdict("soak", soak["flat_label"], soak["late_slope_mib_per_min"], soak["flat"]))
    return out


def fmt(value: float | None, digits: int = 2) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—"
    if abs(value) >= 1000:
        return f"{value:,.0f}"
    if abs(value) >= 100:
        return f"{value:.0f}"
    return f"{value:.{digits}f}"


def main_table(results: dict[str, ScenarioResult], found: list[Verdict]) -> str:
    lines = [
        "| scenario | metric | proxy | direct | added | target | result |",
        "|---|---|---:|---:|---:|---|---|",
    ]
    by_metric = {(t.scenario, t.metric): t for t in TARGETS}
    checks = {(v.scenario, v.label): v for v in found}
    for key, res in results.items():
        sc = res.scenario
        proxy, direct = median_metrics(res.runs, "proxy"), median_metrics(res.runs, "direct")
        for metric in JSON_ROWS if sc.kind == "json" else STREAM_ROWS:
            p, d = proxy.get(metric, math.nan), direct.get(metric, math.nan)
            added = p - d if metric.endswith("_ms") and not math.isnan(d) else None
            target = by_metric.get((key, metric))
            label, result = "", ""
            if target is not None:
                label = target.label
                result = "PASS" if checks[(key, target.label)].passed else "**FAIL**"
            elif metric in ("errors", "lost"):
                label = "none"
                result = "PASS" if p == 0 else "**FAIL**"
            elif metric == "rss_peak_mib" and key in MEMORY_SCENARIOS:
                label = f"≤ {MEMORY_LIMIT_MIB:.0f} MiB"
                result = "PASS" if p <= MEMORY_LIMIT_MIB else "**FAIL**"
            unit = UNITS.get(metric, "")
            digits = 0 if metric == "fake_conns" else 2
            lines.append(
                f"| {sc.title} | {NAMES.get(metric, metric)}{f' ({unit})' if unit else ''} | {fmt(p, digits)} | "
                f"{fmt(d, digits)} | {fmt(added)} | {label} | {result} |"
            )
    return "\n".join(lines)


def sides_of(res: ScenarioResult) -> tuple[str, ...]:
    """proxy, direct, and original when the run measured it (--original)."""
    return ("proxy", "direct", ORIGINAL) if ORIGINAL in res.runs[0] else ("proxy", "direct")


def instrument_table(results: dict[str, ScenarioResult]) -> str:
    """Cores by owner. On an original row the "proxy" column is the original's node process."""
    lines = [
        "| scenario | side | proxy | busiest worker | fake | load tool | bench | other | machine busy "
        "| fake late p99 | client lag p99 |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for res in results.values():
        for side in sides_of(res):
            m = median_metrics(res.runs, side)
            lines.append(
                f"| {res.scenario.key} | {side} | {fmt(m['proxy_cores']) if side != 'direct' else '—'} | "
                f"{fmt(m['busiest_worker_pct'], 0) + ' %' if side == 'proxy' else '—'} | "
                f"{fmt(m['fake_cores'])} | {fmt(m['client_cores'])} | {fmt(m['bench_cores'])} | "
                f"{fmt(m['other_cores'])} | {fmt(m['machine_busy_pct'], 0)} % | "
                f"{fmt(m.get('fake_late_p99_ms'))} | {fmt(m.get('client_lag_p99_ms'))} |"
            )
    return "\n".join(lines)


def disturbed(results: dict[str, ScenarioResult], limit_cores: float = 0.2) -> list[str]:
    """Warnings for runs during which processes outside the bench used more than `limit_cores`."""
    out = []
    for key, res in results.items():
        worst = max(run[side]["other_cores"] for run in res.runs for side in run)
        if worst > limit_cores:
            out.append(
                f"{key}: other processes on the machine used up to {worst:.2f} cores during its runs; "
                f"its figures may be disturbed: run it again (--only {key})"
            )
    return out


def not_reused(results: dict[str, ScenarioResult], share: float = 0.1) -> list[str]:
    """Warnings for runs in which the proxy opened new upstream connections for more than `share` of
    its requests. A pool still growing toward the load's concurrency opens a few (the table shows how
    many); a proxy that does not reuse them opens about one per request, and then (over TLS above all)
    its rows measure connection setups rather than relaying. Up to one per wrk connection is not held
    against it: the requests wrk cuts off at the end of a run cost the proxy those connections, which
    at a slow upstream (c64_500ms: ~600 requests a run, 64 cut off) is itself ~10 %."""
    out = []
    for key, res in results.items():
        if res.scenario.kind != "json":
            continue
        worst = max(run["proxy"]["fake_conns"] / max(run["proxy"]["requests"], 1.0) for run in res.runs)
        cut = res.scenario.connections
        beyond = max(
            (run["proxy"]["fake_conns"] - cut) / max(run["proxy"]["requests"], 1.0) for run in res.runs
        )
        if beyond > share:
            out.append(
                f"{key}: the proxy opened a new upstream connection for up to {100 * worst:.1f} % of its "
                "requests in a run: it is not reusing its connections to the fake"
            )
    return out


# The HTTPS scenarios beside their plain twins: (label, side, metric); side "added" is proxy minus
# direct of the same scenario's medians, as in the main table.
TLS_ROWS = (
    ("added latency p50 (ms)", "added", "p50_ms"),
    ("added latency p99 (ms)", "added", "p99_ms"),
    ("proxy CPU per request (ms)", "proxy", "proxy_cpu_ms_per_req"),
    ("proxy cores", "proxy", "proxy_cores"),
    ("throughput through the proxy (req/s)", "proxy", "rps"),
    ("fake CPU per request, proxy side (µs)", "proxy", "fake_cpu_us_per_req"),
    ("connections the proxy opened to the fake, per run", "proxy", "fake_conns"),
    ("direct: throughput (req/s)", "direct", "rps"),
    ("direct: latency p50 (ms)", "direct", "p50_ms"),
    ("direct: fake CPU per request (µs)", "direct", "fake_cpu_us_per_req"),
    ("direct: wrk CPU per request (µs)", "direct", "client_cpu_us_per_req"),
)


# The Redis gate scenarios beside the same load with the local gate.
REDIS_ROWS = (
    ("added latency p50 (ms)", "added", "p50_ms"),
    ("added latency p99 (ms)", "added", "p99_ms"),
    ("proxy CPU per request (ms)", "proxy", "proxy_cpu_ms_per_req"),
    ("redis-server CPU per request (µs)", "proxy", "redis_cpu_us_per_req"),
    ("proxy + redis-server CPU per request (ms)", "proxy", "proxy_redis_cpu_ms_per_req"),
    ("proxy cores", "proxy", "proxy_cores"),
    ("throughput through the proxy (req/s)", "proxy", "rps"),
    ("errors (all runs)", "proxy", "errors"),
    ("direct: throughput (req/s)", "direct", "rps"),
    ("direct: latency p50 (ms)", "direct", "p50_ms"),
    ("other processes (cores)", "proxy", "other_cores"),
)


def tls_comparison(results: dict[str, ScenarioResult]) -> dict[str, dict[str, dict[str, float]]]:
    """For each HTTPS scenario whose plain twin also ran: {label: {plain, tls, ratio}} (ratio = tls / plain)."""
    return twin_comparison(results, lambda sc: sc.plain_twin, TLS_ROWS, ("plain", "tls"))


def redis_comparison(results: dict[str, ScenarioResult]) -> dict[str, dict[str, dict[str, float]]]:
    """For each Redis gate scenario whose local-gate twin also ran: {label: {local, redis, ratio}}."""
    return twin_comparison(results, lambda sc: sc.local_twin, REDIS_ROWS, ("local", "redis"))


def clients_comparison(results: dict[str, ScenarioResult]) -> dict[str, dict[str, dict[str, float]]]:
    """For each clients-file scenario whose SECURITY_KEY twin also ran: {label: {key, clients, ratio}}."""
    rows = tuple(r for r in REDIS_ROWS if "redis" not in r[2])
    return twin_comparison(results, lambda sc: sc.unnamed_twin, rows, ("SECURITY_KEY", "1,000 clients"))


def twin_comparison(
    results: dict[str, ScenarioResult],
    twin_of: Callable[[Scenario], str | None],
    table: tuple[tuple[str, str, str], ...],
    names: tuple[str, str],
) -> dict[str, dict[str, dict[str, float]]]:
    """Each scenario whose twin (the same load without its variation) also ran, figure by figure:
    {label: {base name: value, variant name: value, "ratio": variant / base}}."""
    out: dict[str, dict[str, dict[str, float]]] = {}
    for key, res in results.items():
        twin = twin_of(res.scenario)
        if twin is None or twin not in results:
            continue
        rows: dict[str, dict[str, float]] = {}
        for label, side, metric in table:
            pair = []
            for r in (results[twin], res):
                proxy, direct = median_metrics(r.runs, "proxy"), median_metrics(r.runs, "direct")
                pair.append(proxy[metric] - direct[metric] if side == "added" else
                            (proxy if side == "proxy" else direct)[metric])  # fmt: skip
            base, variant = pair
            ratio = variant / base if base and not math.isnan(base) and not math.isnan(variant) else math.nan
            rows[label] = {names[0]: base, names[1]: variant, "ratio": ratio}
        out[key] = rows
    return out


def tls_table(comparison: dict[str, dict[str, dict[str, float]]]) -> str:
    return twin_table(comparison, "plain HTTP", "HTTPS", ("plain", "tls"))


def twin_table(
    comparison: dict[str, dict[str, dict[str, float]]],
    base_title: str,
    variant_title: str,
    names: tuple[str, str] = ("local", "redis"),
) -> str:
    lines = [
        f"| scenario | figure (median of runs) | {base_title} | {variant_title} | {variant_title} / {base_title.split()[0]} |",
        "|---|---|---:|---:|---:|",
    ]
    for key, rows in comparison.items():
        for label, v in rows.items():
            digits = 0 if "connections" in label or "errors" in label else 2
            ratio = "—" if math.isnan(v["ratio"]) else f"{v['ratio']:.2f}x"
            lines.append(
                f"| {key} | {label} | {fmt(v[names[0]], digits)} | {fmt(v[names[1]], digits)} | {ratio} |"
            )
    return "\n".join(lines)


# The proxy against the original Node proxy, same scenario, same fake, same runs: (label, metric, how),
# how = "median" (of runs), "added" (side minus direct, medians), "sum" (failures, all runs), "max"
# (the highest run) or "per_stream" (median CPU per event x the events of a stream).
ORIGINAL_JSON_ROWS = (
    ("CPU per request (ms)", "proxy_cpu_ms_per_req", "median"),
    ("throughput (req/s)", "rps", "median"),
    ("added latency p50 (ms, side - direct)", "p50_ms", "added"),
    ("latency p99 (ms)", "p99_ms", "median"),
    ("errors (all runs)", "errors", "sum"),
    ("peak RSS (MiB, highest run)", "rss_peak_mib", "max"),
)
ORIGINAL_STREAM_ROWS = (
    ("CPU per stream (ms; CPU per event x events per stream)", "proxy_cpu_us_per_event", "per_stream"),
    ("CPU per event (µs)", "proxy_cpu_us_per_event", "median"),
    ("first event p50 (ms)", "first_p50_ms", "median"),
    ("first event p99 (ms)", "first_p99_ms", "median"),
    ("lost streams (all runs)", "lost", "sum"),
    ("peak RSS (MiB, highest run)", "rss_peak_mib", "max"),
)


def original_comparison(
    results: dict[str, ScenarioResult], events_per_stream: int
) -> dict[str, dict[str, dict[str, float]]]:
    """Each scenario that measured the original: {label: {proxy, original, ratio}} (ratio = proxy /
    original; none for counts of failures). CPU is the proxy's gunicorn tree against the original's
    node process, each measured like the other (bench.meter.Meter with the server's pid)."""
    out: dict[str, dict[str, dict[str, float]]] = {}
    for key, res in results.items():
        if ORIGINAL not in sides_of(res):
            continue
        direct = median_metrics(res.runs, "direct")
        rows: dict[str, dict[str, float]] = {}
        table = ORIGINAL_JSON_ROWS if res.scenario.kind == "json" else ORIGINAL_STREAM_ROWS
        for label, metric, how in table:
            pair = []
            for side in ("proxy", ORIGINAL):
                m = median_metrics(res.runs, side)
                if how == "added":
                    pair.append(m[metric] - direct[metric])
                elif how == "max":
                    pair.append(max(r[side][metric] for r in res.runs))
                elif how == "per_stream":
                    pair.append(m[metric] * events_per_stream / 1000.0)
                else:  # "median", and "sum" (median_metrics sums errors and lost)
                    pair.append(m[metric])
            proxy, original = pair
            usable = how != "sum" and original and not math.isnan(original) and not math.isnan(proxy)
            rows[label] = {
                "proxy": proxy,
                ORIGINAL: original,
                "ratio": proxy / original if usable else math.nan,
            }
        out[key] = rows
    return out


def original_table(comparison: dict[str, dict[str, dict[str, float]]]) -> str:
    lines = [
        "| scenario | figure (median of runs) | proxy | original | proxy / original |",
        "|---|---|---:|---:|---:|",
    ]
    for key, rows in comparison.items():
        for label, v in rows.items():
            digits = 0 if "errors" in label or "lost" in label else 2
            ratio = "—" if math.isnan(v["ratio"]) else f"{v['ratio']:.2f}x"
            lines.append(
                f"| {key} | {label} | {fmt(v['proxy'], digits)} | {fmt(v[ORIGINAL], digits)} | {ratio} |"
            )
    return "\n".join(lines)


WAITING = (("c64_0ms", 0), ("c64_50ms", 50), ("c64_500ms", 500))  # the same c=64 load, upstream latency


def waiting(results: dict[str, ScenarioResult]) -> dict[str, dict[str, float]]:
    """CPU per request with the upstream taking 0, 50 and 500 ms, for each side that ran all three
    (a request waiting upstream should cost no more CPU than one answered at once), and the spread
    (max / min - 1). Empty unless all three scenarios ran."""
    if not all(key in results for key, _ in WAITING):
        return {}
    out: dict[str, dict[str, float]] = {}
    for side in ("proxy", ORIGINAL):
        if not all(side in results[key].runs[0] for key, _ in WAITING):
            continue
        cpu = {
            f"{ms}ms": median_metrics(results[key].runs, side)["proxy_cpu_ms_per_req"] for key, ms in WAITING
        }
        low, high = min(cpu.values()), max(cpu.values())
        out[side] = {**cpu, "spread_pct": 100.0 * (high / low - 1.0) if low > 0 else math.nan}
    return out


def waiting_line(found: dict[str, dict[str, float]]) -> str:
    parts = []
    for side, v in found.items():
        ms = " / ".join(fmt(v[f"{ms}ms"], 3) for _, ms in WAITING)
        parts.append(f"{side} {ms} ms (spread {fmt(v['spread_pct'], 0)} %)")
    return ("Waiting: CPU per request with the upstream taking 0 / 50 / 500 ms (c=64; spread = max / min - 1): "
            + "; ".join(parts))  # fmt: skip


def verdict_table(found: list[Verdict]) -> str:
    lines = ["| scenario | target | value | result |", "|---|---|---:|---|"]
    for v in found:
        lines.append(f"| {v.scenario} | {v.label} | {fmt(v.value)} | {'PASS' if v.passed else '**FAIL**'} |")
    return "\n".join(lines)


def document(
    header: dict,
    ceilings: dict,
    results: dict[str, ScenarioResult],
    found: list[Verdict],
    soak: dict | None,
    events_per_stream: int = 0,
) -> dict:
    """Everything as JSON. With --original: each scenario's medians and runs have an "original" side
    (its "proxy_*" figures are the original's node process), and "against_original" has the table.
    With --features, "clients_vs_security_key" is empty: both scenarios then ran with the clients."""
    features = header.get("features") == "on"
    doc = {
        **header,
        "ceilings": ceilings,
        "scenarios": {
            key: {
                "scenario": asdict(res.scenario),
                "notes": res.notes,
                "median": {side: median_metrics(res.runs, side) for side in sides_of(res)},
                "runs": res.runs,
            }
            for key, res in results.items()
        },
        "verdicts": [asdict(v) for v in found],
        "tls_vs_plain": tls_comparison(results),
        "redis_gate_vs_local": redis_comparison(results),
        "clients_vs_security_key": {} if features else clients_comparison(results),
        "soak": soak,
    }
    if header.get("original"):
        doc["against_original"] = original_comparison(results, events_per_stream)
    if waiting(results):
        doc["waiting"] = waiting(results)
    return doc
