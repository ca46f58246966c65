"""The memory soak: the 64-concurrency chat load (upstream 50 ms) plus 100 steady streams, for minutes,
with the gunicorn tree's RSS sampled every few seconds. Memory is "flat" when the second half of
the soak grows by no more than FLAT_MIB_PER_MIN: the first minutes legitimately fill caches, pools
and the log store up to its retention."""

from __future__ import annotations

import argparse
import json
import threading
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

from bench.procs import FakeSettings, rss_bytes, start_proxy, start_upstream
from bench.scenarios import MIB, Scenario, chat_body, features_env, stream_plan
from bench.sse_load import run_streams
from bench.wrk import wrk

FLAT_MIB_PER_MIN = 0.5
SAMPLE_EVERY_S = 5.0


def slope_per_min(samples: list[tuple[float, float]]) -> float:
    """Least-squares slope of (seconds, MiB) samples, in MiB per minute."""
    if len(samples) < 2:
        return 0.0
    n = len(samples)
    mean_t = sum(t for t, _ in samples) / n
    mean_m = sum(m for _, m in samples) / n
    var = sum((t - mean_t) ** 2 for t, _ in samples)
    cov = sum((t - mean_t) * (m - mean_m) for t, m in samples)
    return 60.0 * cov / var if var else 0.0


def run_soak(opts: argparse.Namespace, workdir: Path, log: Callable[[str], None]) -> dict:
    seconds = opts.soak_minutes * 60.0
    extra_env, key = features_env(workdir, opts)  # --features: as one of 1,000 clients, 3 upstream keys
    payload = json.dumps({**chat_body(), "security_key": key}).encode()
    settings = FakeSettings(
        latency_ms=50.0, events=opts.events, gap_ms=opts.gap_ms, procs=opts.upstream_procs
    )
    samples: list[tuple[float, float]] = []
    requests = errors = streams = lost = 0
    with (
        start_upstream(workdir, settings) as fake,
        start_proxy(workdir, fake, opts.max_parallel, extra_env) as proxy,
    ):
        start = time.monotonic()
        end = start + seconds
        stop = threading.Event()

        def sample() -> None:
            while True:
                samples.append((time.monotonic() - start, rss_bytes(proxy.pid) / MIB))
                if stop.wait(SAMPLE_EVERY_S):
                    return

        def stream_load() -> None:
            nonlocal streams, lost
            sc = Scenario("soak", "soak streams", "stream", streams=100, mode="steady")
            while not stop.is_set() and end - time.monotonic() > 10:
                plan = replace(
                    stream_plan(sc, opts, proxy.port, "proxy", key),
                    hold_s=min(50.0, end - time.monotonic() - 8),
                )
                run = run_streams(plan, workdir / "soak")
                streams += len(run.records)
                lost += sum(1 for r in run.records if not r.complete)

        (workdir / "soak").mkdir(exist_ok=True)
        threads = [
            threading.Thread(target=sample, daemon=True),
            threading.Thread(target=stream_load, daemon=True),
        ]
        for t in threads:
            t.start()
        try:
            while (left := end - time.monotonic()) > 1:
                result = wrk(workdir, proxy.port, "/openai", payload, connections=64, seconds=min(60.0, left))
                requests += result.requests
                errors += result.errors
                log(f"  soak {(time.monotonic() - start) / 60:.1f}/{opts.soak_minutes:g} min: "
                    f"{result.rps:,.0f} req/s, RSS {samples[-1][1]:.1f} MiB")  # fmt: skip
        finally:
            stop.set()
            for t in threads:
                t.join(120)
        samples.append((time.monotonic() - start, rss_bytes(proxy.pid) / MIB))
    half = samples[-1][0] / 2
    late = [s for s in samples if s[0] >= half]
    middle = min(samples, key=lambda s: abs(s[0] - half))
    late_slope = slope_per_min(late)
    return {
        "minutes": opts.soak_minutes,
        "load": "wrk c64 /openai (upstream 50 ms) + 100 steady /openai2 streams",
        "requests": requests,
        "errors": errors,
        "streams": streams,
        "lost_streams": lost,
        "start_mib": samples[0][1],
        "middle_mib": middle[1],
        "end_mib": samples[-1][1],
        "max_mib": max(m for _, m in samples),
        "slope_mib_per_min": slope_per_min(samples),
        "late_slope_mib_per_min": late_slope,
        "flat": late_slope <= FLAT_MIB_PER_MIN,
        "flat_label": f"flat: second-half RSS slope ≤ {FLAT_MIB_PER_MIN} MiB/min",
        "samples": [(round(t, 1), round(m, 2)) for t, m in samples],
    }
