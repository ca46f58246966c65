"""wrk as the load for the JSON scenarios: a POST body from a file, latency percentiles from its histogram."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from bench.procs import children_cpu

# wrk's `done` hook prints one JSON line: its latency histogram is exact to the microsecond.
_SCRIPT = """\
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
local f = io.open("{body}", "rb")
wrk.body = f:read("*a")
f:close()
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    "WRKJSON {{\\"p50\\": %d, \\"p99\\": %d, \\"max\\": %d, \\"requests\\": %d, \\"status\\": %d, " ..
    "\\"socket\\": %d}}\\n",
    latency:percentile(50), latency:percentile(99), latency.max, summary.requests, e.status,
    e.connect + e.read + e.write + e.timeout))
end
"""


@dataclass
class WrkResult:
    rps: float
    p50_ms: float
    p99_ms: float
    max_ms: float
    requests: int
    errors: int  # non-2xx/3xx answers plus connect/read/write errors and timeouts
    seconds: float
    cpu_s: float  # wrk's own CPU


def available() -> bool:
    return shutil.which("wrk") is not None


def wrk(
    workdir: Path,
    port: int,
    path: str,
    body: bytes,
    *,
    connections: int,
    seconds: float,
    threads: int = 1,
    tls: bool = False,
) -> WrkResult:
    """POST `body` to 127.0.0.1:`port``path` from `connections` keep-alive connections for `seconds`.

    With `tls`, over HTTPS: wrk makes one TLS handshake per connection (before its first request, so
    outside its latency figures) and does not verify the certificate.
    """
    body_file = workdir / f"wrk-body-{len(body)}.json"
    if not body_file.exists() or body_file.read_bytes() != body:
        body_file.write_bytes(body)
    script = workdir / f"wrk-{len(body)}.lua"
    script.write_text(_SCRIPT.format(body=body_file))
    cpu0 = children_cpu()
    out = subprocess.run(
        [
            "wrk",
            f"-t{threads}",
            f"-c{connections}",
            f"-d{max(int(seconds), 1)}s",
            "--timeout",
            "10s",
            "-s",
            str(script),
            f"{'https' if tls else 'http'}://127.0.0.1:{port}{path}",
        ],
        capture_output=True,
        text=True,
        timeout=seconds + 30,
        check=True,
    ).stdout
    cpu = children_cpu() - cpu0
    stats = json.loads(out[out.index("WRKJSON ") + 8 :].splitlines()[0])
    took = re.search(r"requests in ([\d.]+)(us|ms|s|m)", out)
    scale = {"us": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0}[took.group(2)] if took else 1.0
    elapsed = float(took.group(1)) * scale if took else seconds
    requests = stats["requests"]
    return WrkResult(
        rps=requests / elapsed,
        p50_ms=stats["p50"] / 1000.0,
        p99_ms=stats["p99"] / 1000.0,
        max_ms=stats["max"] / 1000.0,
        requests=requests,
        errors=stats["status"] + stats["socket"],
        seconds=elapsed,
        cpu_s=cpu,
    )
