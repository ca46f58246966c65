"""SSE load: N concurrent streams from several client processes, every event timed on arrival.

The parent (`run_streams`) writes a plan, starts `procs` client processes (`python -m
bench.sse_client`), each owning every procs-th stream slot, and gathers their per-stream records.
A slot is one concurrent stream:

- burst: every slot opens a new connection and its stream at t0, once. First-event times then
  include the queueing of N connection setups at the same instant.
- steady: slot i opens its first stream at t0 + i * ramp / N and the next one as soon as the
  previous ended, until t0 + ramp + hold. With ramp = one stream's duration, about N streams are
  open at any moment after the ramp, and streams start at an even rate of N per stream duration.
  A slot keeps its connection between streams (HTTP keep-alive, as SDK clients do) unless
  `fresh_connections`. Only streams started after the ramp are "measured" (they ran at full
  concurrency); every stream counts for completeness.

The clients (bench/sse_client.py) timestamp events with the kernel's receive time, so a busy
client cannot inflate a latency; each also reports how late its own loop ran.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from bench.sse_client import StreamPlan, StreamRecord

__all__ = ["ClientRun", "StreamPlan", "StreamRecord", "run_streams"]


@dataclass
class ClientRun:
    plan: StreamPlan
    records: list[StreamRecord]
    cpu_s: float  # all client processes, user + system, during the run
    loop_lag_ms: list[float]  # how late every client's 10 ms ticker ran, pooled
    wall_s: float

    def measured(self) -> list[StreamRecord]:
        if self.plan.mode == "burst":
            return self.records
        return [r for r in self.records if r.scheduled >= self.plan.ramp_s]


def run_streams(plan: StreamPlan, workdir: Path) -> ClientRun:
    """Run `plan` from `plan.procs` client processes and gather every stream's record."""
    plan.procs = max(1, min(plan.procs, plan.streams))
    # Every client must be up and idle before the first stream is due.
    plan.t0 = time.time() + 0.5 + 0.2 * plan.procs
    plan_file = workdir / "sse-plan.json"
    plan_file.write_text(json.dumps(asdict(plan)))
    outs = [workdir / f"sse-client-{i}.json" for i in range(plan.procs)]
    for out in outs:
        out.unlink(missing_ok=True)
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "bench.sse_client",
                "--plan",
                str(plan_file),
                "--index",
                str(i),
                "--out",
                str(out),
            ],
            cwd=Path(__file__).resolve().parent.parent,
        )
        for i, out in enumerate(outs)
    ]
    bound = plan.t0 - time.time() + plan.ramp_s + plan.hold_s + plan.timeout_s + 30
    deadline = time.monotonic() + bound
    try:
        for p in procs:
            p.wait(max(deadline - time.monotonic(), 0.1))
    except subprocess.TimeoutExpired:
        pass
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    wall = time.time() - plan.t0
    records: list[StreamRecord] = []
    lags: list[float] = []
    cpu = 0.0
    for p, out in zip(procs, outs, strict=True):
        if p.returncode != 0 or not out.exists():
            raise RuntimeError(f"SSE client {out.name} failed (exit {p.returncode})")
        data = json.loads(out.read_text())
        cpu += data["cpu_s"]
        lags.extend(data["lags_ms"])
        for slot, scheduled, start, status, events, complete, error, end, arrivals in data["records"]:
            records.append(
                StreamRecord(slot, scheduled, start, status, events, complete, error, end, arrivals)
            )
    return ClientRun(plan, records, cpu, lags, wall)
