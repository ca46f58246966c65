"""Who used the CPU during one run, and how much memory the proxy held: read from /proc and getrusage."""

from __future__ import annotations

import resource
import threading
import time
from dataclasses import dataclass

from bench.procs import children_cpu, cpu_by_pid, cpu_of, machine_cpu, rss_bytes


def _self_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


@dataclass
class CpuUse:
    """CPU seconds over one run's wall time, by owner. `other` is everything else on the machine."""

    wall_s: float
    proxy_s: float
    workers_s: list[float]  # each gunicorn worker (the master is in proxy_s only)
    fake_s: float
    client_s: float  # load tools (wrk, stream clients) started and reaped during the run
    bench_s: float  # this process (sampling threads included)
    machine_busy_s: float
    machine_total_s: float
    redis_s: float = 0.0  # the redis-server of the Redis gate scenarios: part of what the gate costs

    @property
    def other_s(self) -> float:
        mine = self.proxy_s + self.fake_s + self.client_s + self.bench_s + self.redis_s
        return max(self.machine_busy_s - mine, 0.0)

    def cores(self, seconds: float) -> float:
        """CPU seconds per wall second: 1.0 is one core kept busy."""
        return seconds / self.wall_s if self.wall_s else 0.0

    @property
    def machine_busy_pct(self) -> float:
        return 100.0 * self.machine_busy_s / self.machine_total_s if self.machine_total_s else 0.0


class Meter:
    """Snapshot at start, difference at `stop()`; samples the proxy tree's RSS in a thread meanwhile."""

    def __init__(
        self, proxy_pid: int | None, fake_pid: int, rss_every_s: float = 0.25, redis_pid: int | None = None
    ) -> None:
        self.proxy_pid = proxy_pid
        self.fake_pid = fake_pid
        self.redis_pid = redis_pid
        self.rss_peak = 0
        self._stop = threading.Event()
        self._sampler: threading.Thread | None = None
        if proxy_pid is not None:
            self.rss_peak = rss_bytes(proxy_pid)
            self._sampler = threading.Thread(target=self._sample, args=(rss_every_s,), daemon=True)
        self._t0 = time.monotonic()
        self._proxy0 = cpu_by_pid(proxy_pid) if proxy_pid is not None else {}
        self._fake0 = sum(cpu_by_pid(fake_pid).values())
        self._redis0 = cpu_of(redis_pid) if redis_pid is not None else 0.0
        self._children0 = children_cpu()
        self._self0 = _self_cpu()
        self._machine0 = machine_cpu()
        if self._sampler is not None:
            self._sampler.start()

    def _sample(self, every_s: float) -> None:
        while not self._stop.wait(every_s):
            self.rss_peak = max(self.rss_peak, rss_bytes(self.proxy_pid))

    def stop(self) -> CpuUse:
        self._stop.set()
        if self._sampler is not None:
            self._sampler.join()
            self.rss_peak = max(self.rss_peak, rss_bytes(self.proxy_pid))
        busy, total = machine_cpu()
        proxy1 = cpu_by_pid(self.proxy_pid) if self.proxy_pid is not None else {}
        delta = {pid: cpu - self._proxy0.get(pid, 0.0) for pid, cpu in proxy1.items()}
        return CpuUse(
            wall_s=time.monotonic() - self._t0,
            proxy_s=sum(delta.values()),
            workers_s=[cpu for pid, cpu in delta.items() if pid != self.proxy_pid],
            fake_s=sum(cpu_by_pid(self.fake_pid).values()) - self._fake0,
            client_s=children_cpu() - self._children0,
            bench_s=_self_cpu() - self._self0,
            machine_busy_s=busy - self._machine0[0],
            machine_total_s=total - self._machine0[1],
            redis_s=cpu_of(self.redis_pid) - self._redis0 if self.redis_pid is not None else 0.0,
        )
