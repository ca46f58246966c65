"""The benchmark suite: the proxy under real gunicorn against a fast fake upstream, vs the fake alone.

    ./bench/run.sh                          # every scenario, 3 runs each after a warm-up
    ./bench/run.sh --only c1 streams_steady --json /tmp/bench.json
    ./bench/run.sh --soak-minutes 10        # adds the memory soak
    ./bench/run.sh --original ../chatgpt-proxy --features   # beside the original, every feature on

Each scenario sends the same load twice per run: through the proxy and directly to the fake
upstream, so every figure has its baseline from the same minute on the same machine (three times
with --original: also through the original Node proxy, built by the user, against the same fake).
Load comes from wrk (JSON scenarios) and bench/sse_load.py (streams). CPU is read from /proc for
the gunicorn tree, the fake and the rest of the machine. Everything stays on 127.0.0.1 and every
run is bounded in time. See bench/README.md for the methodology.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path

from bench import report, wrk
from bench.meter import Meter
from bench.procs import (
    ORIGINAL_PORT,
    FakeSettings,
    node_version,
    original_entry,
    port_taken,
    raise_open_files_limit,
    start_upstream,
)
from bench.scenarios import (
    FEATURE_CLIENTS,
    MIB,
    Scenario,
    ScenarioResult,
    chat_body,
    median_metrics,
    run_scenario,
    stream_plan,
)
from bench.soak import run_soak
from bench.sse_load import run_streams


def scenarios(opts: argparse.Namespace) -> list[Scenario]:
    n, small = opts.streams, opts.compare_streams
    each = f"x {opts.events} events {opts.gap_ms:g} ms apart"
    return [
        Scenario("c1", "small /openai chat, c=1", "json", connections=1),
        Scenario("c64_50ms", "/openai c=64, upstream 50 ms", "json", connections=64, latency_ms=50.0),
        # The same load waiting 500 ms upstream: CPU per request should not depend on the wait (see the
        # "Waiting" line: c64_0ms, c64_50ms and this one side by side).
        Scenario("c64_500ms", "/openai c=64, upstream 500 ms", "json", connections=64, latency_ms=500.0),
        Scenario("c64_0ms", "/openai c=64, upstream 0 ms", "json", connections=64),
        Scenario(
            "streams_steady", f"/openai2 {n} streams {each}, steady", "stream", streams=n, mode="steady"
        ),
        Scenario("streams_burst", f"/openai2 {n} streams {each}, burst", "stream", streams=n, mode="burst"),
        Scenario(
            "streams200_steady", f"/openai2 {small} streams, steady", "stream", streams=small, mode="steady"
        ),
        Scenario(
            "streams200_burst", f"/openai2 {small} streams, burst", "stream", streams=small, mode="burst"
        ),
        Scenario("body_1mib", "1 MiB /openai body, c=1", "json", connections=1, body_bytes=MIB),
        # The same loads as c1 and c64_0ms with the upstream on HTTPS (direct: wrk over HTTPS to the
        # fake). Last, so the plain scenarios run exactly as before.
        Scenario("c1_tls", "small /openai chat, c=1, HTTPS upstream", "json", connections=1, tls=True),
        Scenario("c64_0ms_tls", "/openai c=64, upstream 0 ms, HTTPS", "json", connections=64, tls=True),
        # c1 and c64_0ms with the fleet-wide gate (OPENAI_PROXY_GATE_URI) in a redis-server of the run's:
        # what a Redis round trip to take and one to give back each slot cost, beside the local gate.
        Scenario("c1_redis", "small /openai chat, c=1, Redis gate", "json", connections=1, redis_gate=True),
        # c64_0ms as one of 1,000 named clients, every limit on (rpm, tpm, both budgets): what looking the
        # key up, admitting and charging cost per request, beside SECURITY_KEY alone.
        Scenario(
            "c64_0ms_clients",
            "/openai c=64, upstream 0 ms, 1,000 clients with limits",
            "json",
            connections=64,
            clients=1000,
        ),
        Scenario(
            "c64_0ms_redis",
            "/openai c=64, upstream 0 ms, Redis gate",
            "json",
            connections=64,
            redis_gate=True,
        ),
    ]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    keys = [s.key for s in scenarios(argparse.Namespace(streams=0, compare_streams=0, events=0, gap_ms=0))]
    p = argparse.ArgumentParser(prog="bench/run.sh", description="openai-proxy benchmark suite")
    p.add_argument("--only", nargs="+", choices=keys, metavar="SCENARIO", help=f"of: {', '.join(keys)}")
    p.add_argument("--runs", type=int, default=3, help="measured runs per scenario (default 3; medians)")
    p.add_argument("--seconds", type=float, default=5.0, help="wrk duration of each JSON run (default 5)")
    p.add_argument("--warmup-seconds", type=float, default=2.0, help="wrk warm-up per side (default 2)")
    p.add_argument("--streams", type=int, default=1000, help="concurrent streams of the target rows")
    p.add_argument("--compare-streams", type=int, default=200, help="the smaller stream rows (default 200)")
    p.add_argument("--events", type=int, default=50, help="events per stream (default 50)")
    p.add_argument("--gap-ms", type=float, default=20.0, help="upstream event spacing (default 20)")
    p.add_argument(
        "--ramp-s",
        type=float,
        default=None,
        help="steady: spread of stream starts (default: one stream's duration)",
    )
    p.add_argument(
        "--hold-s",
        type=float,
        default=3.0,
        help="steady: how long slots keep reopening streams after the ramp",
    )
    p.add_argument(
        "--client-procs",
        type=int,
        default=0,
        help="stream client processes (default: 1 per 500 streams, at most one per core)",
    )
    p.add_argument(
        "--fresh-connections", action="store_true", help="steady: a new connection for every stream"
    )
    p.add_argument(
        "--poll-ms", type=float, default=1.0, help="stream clients read every this often (0: on every event)"
    )
    p.add_argument("--upstream-procs", type=int, default=1, help="fake upstream processes (default 1)")
    p.add_argument("--soak-minutes", type=float, default=0.0, help="also run the memory soak this long")
    p.add_argument("--skip-ceilings", action="store_true", help="do not measure the fake's own ceilings")
    p.add_argument("--json", type=Path, help="also write every figure to this file")
    p.add_argument(
        "--original",
        type=Path,
        metavar="DIR",
        help="also measure the original Node proxy from this built checkout (node DIR/build/index.js, "
        f"port {ORIGINAL_PORT}) as a third side of every scenario",
    )
    p.add_argument(
        "--features",
        action="store_true",
        help=f"every proxy run with every feature on: {FEATURE_CLIENTS:,} clients with limits (the load is "
        "one of them), 3 upstream keys, the request log",
    )
    return p.parse_args(argv)


def machine_line() -> str:
    model = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return (f"{os.cpu_count()} CPUs (nproc {len(os.sched_getaffinity(0))}), {model}, "
            f"Linux {platform.release()}, {platform.python_implementation()} {platform.python_version()}")  # fmt: skip


def original_info(directory: Path) -> dict:
    """What the original is: where, which node, which commit (when the checkout is a git one)."""
    node, entry = original_entry(directory)
    commit = ""
    if (directory / ".git").exists():
        out = subprocess.run(["git", "-C", str(directory), "rev-parse", "--short", "HEAD"],
                             capture_output=True, text=True, timeout=10, check=False)  # fmt: skip
        commit = out.stdout.strip()
    return {"dir": str(directory.resolve()), "entry": str(entry), "node": node_version(node), "commit": commit,
            "port": ORIGINAL_PORT}  # fmt: skip


def ceilings(opts: argparse.Namespace, workdir: Path, log) -> dict:
    """The fake's own limits, measured directly: JSON requests/s under wrk, SSE events/s it can emit."""
    out: dict = {}
    if wrk.available():
        with start_upstream(workdir, FakeSettings(procs=opts.upstream_procs)) as fake:
            body = json.dumps(chat_body()).encode()
            wrk.wrk(workdir, fake.port, "/v1/chat/completions", body, connections=64, seconds=1)
            meter = Meter(None, fake.pid)
            r = wrk.wrk(
                workdir, fake.port, "/v1/chat/completions", body, connections=64, seconds=opts.seconds
            )
            cpu = meter.stop()
        out["json"] = {
            "rps": r.rps, "p99_ms": r.p99_ms, "errors": r.errors, "fake_cores": cpu.cores(cpu.fake_s),
            "fake_cpu_us_per_req": cpu.fake_s * 1e6 / max(r.requests, 1), "wrk_cores": cpu.cores(cpu.client_s),
            "machine_busy_pct": cpu.machine_busy_pct,
        }  # fmt: skip
        log(f"  fake JSON ceiling: {r.rps:,.0f} req/s")
    # SSE: as many streams as the target rows, events 1 ms apart: far more than the fake can send.
    events, gap = 200, 1.0
    with start_upstream(workdir, FakeSettings(events=events, gap_ms=gap, procs=opts.upstream_procs)) as fake:
        sc = Scenario("ceiling", "", "stream", streams=opts.streams, mode="burst")
        plan = stream_plan(
            sc, argparse.Namespace(**{**vars(opts), "events": events, "gap_ms": gap}), fake.port, "direct"
        )
        meter = Meter(None, fake.pid)
        run = run_streams(plan, workdir)
        cpu = meter.stop()
    got = sum(r.events for r in run.records)
    span = max(r.end or 0 for r in run.records) - min(r.start for r in run.records)
    out["sse"] = {
        "streams": opts.streams, "events_per_stream": events, "gap_ms": gap,
        "events_per_s": got / span if span > 0 else 0.0, "lost": sum(1 for r in run.records if not r.complete),
        "fake_cores": cpu.cores(cpu.fake_s), "fake_cpu_us_per_event": cpu.fake_s * 1e6 / max(got, 1),
        "client_cores": cpu.cores(cpu.client_s), "client_cpu_us_per_event": run.cpu_s * 1e6 / max(got, 1),
        "machine_busy_pct": cpu.machine_busy_pct,
    }  # fmt: skip
    log(f"  fake SSE ceiling: {out['sse']['events_per_s']:,.0f} events/s")
    return out


def print_ceilings(c: dict, results: dict[str, ScenarioResult]) -> None:
    print("\n## The instrument's own ceilings (fake upstream alone, same machine)\n")
    if "json" in c:
        j = c["json"]
        print(f"- JSON: **{j['rps']:,.0f} req/s** (wrk c=64 straight to the fake; p99 {j['p99_ms']:.2f} ms). "
              f"Fake {j['fake_cpu_us_per_req']:.0f} µs CPU/request ({j['fake_cores']:.2f} cores), "
              f"wrk {j['wrk_cores']:.2f} cores, machine {j['machine_busy_pct']:.0f} % busy.")  # fmt: skip
    s = c["sse"]
    print(f"- SSE: **{s['events_per_s']:,.0f} events/s** delivered ({s['streams']} streams x "
          f"{s['events_per_stream']} events {s['gap_ms']:g} ms apart, asking for far more; {s['lost']} lost). "
          f"Fake {s['fake_cpu_us_per_event']:.1f} µs CPU/event ({s['fake_cores']:.2f} cores), "
          f"client {s['client_cpu_us_per_event']:.1f} µs/event ({s['client_cores']:.2f} cores), "
          f"machine {s['machine_busy_pct']:.0f} % busy. Events this close together leave in batches; "
          "see the next line for their cost one at a time.")  # fmt: skip
    for key, res in results.items():
        if res.scenario.kind == "stream":
            d = median_metrics(res.runs, "direct")
            fake, client = d["fake_cpu_us_per_event"], d["client_cpu_us_per_event"]
            print(f"- SSE at the scenarios' spacing ({key}, direct): fake {fake:.1f} µs CPU/event "
                  f"(one fake process: at most ~{1e6 / fake:,.0f} events/s), stream client "
                  f"{client:.1f} µs/event (~{1e6 / client:,.0f} events/s per client process).")  # fmt: skip
            break


def main(argv: list[str] | None = None) -> int:
    opts = parse_args(argv)
    chosen = [s for s in scenarios(opts) if not opts.only or s.key in opts.only]
    if not wrk.available() and any(s.kind == "json" for s in chosen):
        sys.exit("wrk is needed for the JSON scenarios (Debian/Ubuntu: apt-get install wrk); "
                 "or choose only stream scenarios with --only")  # fmt: skip
    # Twice the most requests the run ever has in flight: never a 503, and the gate's own work (its
    # slot scans grow with the limit) stays what an operator sizing the limit for this load would see.
    opts.max_parallel = 2 * max(64, opts.streams, opts.compare_streams, 164 if opts.soak_minutes else 0)
    original = None
    if opts.original:
        try:
            original = original_info(opts.original)
        except RuntimeError as exc:
            sys.exit(str(exc))
        if port_taken(ORIGINAL_PORT):
            sys.exit(f"port {ORIGINAL_PORT} is taken: the original listens there (hard-coded in it); "
                     "stop whatever holds it and run again")  # fmt: skip
    before, after = raise_open_files_limit()
    log = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
    command = "./bench/run.sh" + "".join(
        " " + shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:])
    )
    header = {
        "command": command,
        "machine": machine_line(),
        "started": time.strftime("%Y-%m-%d %H:%M:%S %z"),
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(opts).items()},
        "open_files_limit": [before, after],
        "max_parallel_requests": opts.max_parallel,
        "features": "on" if opts.features else "off",
        "original": original,
    }
    print(f"# openai-proxy bench\n\n`{command}`\n\nmachine: {header['machine']}; started {header['started']}")
    print(f"open-files limit {before} → {after}; OPENAI_PROXY_MAX_PARALLEL_REQUESTS={opts.max_parallel} "
          "(twice the most requests in flight: the gate is a policy, not a speed limit)")  # fmt: skip
    if opts.features:
        print(f"features: on (every proxy run: {FEATURE_CLIENTS:,} clients with rpm, tpm, daily and monthly "
              "limits, the load sending one's key; 3 upstream keys in OPENAI_API_KEYS; the request log)")  # fmt: skip
    else:
        print("features: off (SECURITY_KEY, one upstream key; the request log is on in every run)")
    if original:
        print(f"original: node {original['node']} {original['entry']}"
              f"{' at ' + original['commit'] if original['commit'] else ''}, port {ORIGINAL_PORT}, "
              f"OPENAI_PROXY_MAX_PARALLEL_REQUESTS={opts.max_parallel}, SECURITY_KEY alone; a third side "
              "of every scenario (the fake then sends full Responses streams to all three)")  # fmt: skip
    started = time.monotonic()
    results: dict[str, ScenarioResult] = {}
    ceiling: dict = {}
    soak = None
    with ExitStack() as stack:
        workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="openai-proxy-bench-")))
        if not opts.skip_ceilings:
            log("ceilings ...")
            ceiling = ceilings(opts, workdir, log)
        for sc in chosen:
            log(f"{sc.key}: {sc.title} ...")
            results[sc.key] = run_scenario(sc, opts, workdir, log)
        if opts.soak_minutes > 0:
            log(f"soak for {opts.soak_minutes:g} min ...")
            soak = run_soak(opts, workdir, log)
    found = report.verdicts(results, soak)
    print(
        f"\n## Results (median of {opts.runs} runs after a warm-up; direct = same load straight to the fake)\n"
    )
    print(report.main_table(results, found))
    for res in results.values():
        for note in res.notes:
            print(f"\n- {res.scenario.key}: {note}")
    if report.waiting(results):
        print(f"\n{report.waiting_line(report.waiting(results))}")
    tls_rows = report.tls_comparison(results)
    if tls_rows:
        print(
            "\n## HTTPS upstream vs plain HTTP (same load; each figure against its own run's direct baseline)\n"
        )
        print(report.tls_table(tls_rows))
    redis_rows = report.redis_comparison(results)
    if redis_rows:
        print(
            "\n## Redis gate vs local gate (same load; each figure against its own run's direct baseline)\n"
        )
        print(report.twin_table(redis_rows, "local gate", "Redis gate"))
    client_rows = report.clients_comparison(results)
    if client_rows and not opts.features:  # with --features every proxy run has the clients
        print(
            "\n## 1,000 clients with limits vs SECURITY_KEY alone (same load; each against its own direct run)\n"
        )
        print(
            report.twin_table(client_rows, "SECURITY_KEY", "1,000 clients", ("SECURITY_KEY", "1,000 clients"))
        )
    original_rows = report.original_comparison(results, opts.events)
    if original_rows:
        print("\n## Against the original (same load, same fake, same run)\n")
        print(report.original_table(original_rows))
        print("\nCPU: the proxy's gunicorn tree against the original's node process, each over its own runs. "
              "Ratios are proxy / original: below 1, the proxy used less CPU, answered sooner or held less "
              "memory; for throughput, above 1 is the proxy relaying more. Added p50 is each side's p50 minus "
              f"the direct p50 of the same runs. CPU per stream is CPU per event x {opts.events} events.")  # fmt: skip
    if soak:
        print(f"\n## Memory soak ({soak['minutes']:g} min: {soak['load']})\n")
        print(f"RSS of the gunicorn tree: start {soak['start_mib']:.1f} MiB, middle {soak['middle_mib']:.1f} MiB, "
              f"end {soak['end_mib']:.1f} MiB, max {soak['max_mib']:.1f} MiB; slope {soak['slope_mib_per_min']:+.2f} "
              f"MiB/min overall, {soak['late_slope_mib_per_min']:+.2f} MiB/min over the second half. "
              f"{soak['requests']:,} requests ({soak['errors']} errors), {soak['streams']:,} streams "
              f"({soak['lost_streams']} lost).")  # fmt: skip
    print("\n## Targets\n")
    print(report.verdict_table(found))
    if ceiling:
        print_ceilings(ceiling, results)
    print(
        "\n## Where the CPU went (cores = CPU seconds per wall second, medians; the machine has "
        f"{os.cpu_count()})\n"
    )
    print(report.instrument_table(results))
    if original_rows:
        print("\nOn the original's rows, the proxy column is the original's node process.")
    for warning in report.disturbed(results) + report.not_reused(results):
        print(f"\n**Warning**: {warning}")
    print(f"\ntotal time {time.monotonic() - started:.0f} s")
    if opts.json:
        doc = report.document(header, ceiling, results, found, soak, opts.events)
        opts.json.write_text(json.dumps(doc, indent=1))
        log(f"wrote {opts.json}")
    return 0  # a FAIL is a finding about the proxy, not a failure of the run


if __name__ == "__main__":
    sys.exit(main())
