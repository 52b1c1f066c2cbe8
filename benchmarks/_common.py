"""Helpers shared by the cluster benchmarks: percentiles, Prometheus text, /proc readings."""

from __future__ import annotations

import argparse
import datetime
import math
import os
import platform
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

from anna_trio import testnet

_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
_SAMPLE_RE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})?\s+(\S+)")
_LABEL_RE = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


def progress(message: str) -> None:
    """Progress goes to stderr: stdout carries exactly one JSON document."""
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100) of a non-empty sample."""
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[rank - 1]


def summary_ms(seconds: Sequence[float]) -> dict[str, float]:
    """p50/p90/p99/max/mean of durations given in seconds, in milliseconds."""
    if not seconds:
        return {}
    return {
        "p50_ms": round(percentile(seconds, 50) * 1e3, 3),
        "p90_ms": round(percentile(seconds, 90) * 1e3, 3),
        "p99_ms": round(percentile(seconds, 99) * 1e3, 3),
        "max_ms": round(max(seconds) * 1e3, 3),
        "mean_ms": round(sum(seconds) / len(seconds) * 1e3, 3),
        "count": len(seconds),
    }


# --- Prometheus text format ---------------------------------------------------------------


def parse_samples(text: str) -> list[tuple[str, dict[str, str], float]]:
    """(name, labels, value) for every sample line of a Prometheus text exposition."""
    samples = []
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        match = _SAMPLE_RE.match(line)
        if match is None:
            continue
        name, raw_labels, value = match.groups()
        labels = dict(_LABEL_RE.findall(raw_labels or ""))
        samples.append((name, labels, float(value)))
    return samples


def sample_sum(samples: Iterable[tuple[str, dict[str, str], float]], name: str) -> float:
    return sum(value for sample_name, _, value in samples if sample_name == name)


def histogram_buckets(
    samples: Iterable[tuple[str, dict[str, str], float]], name: str
) -> dict[float, float]:
    """Cumulative bucket counts of histogram `name`, summed over every label set."""
    buckets: dict[float, float] = {}
    for sample_name, labels, value in samples:
        if sample_name == f"{name}_bucket":
            bound = float(labels["le"])
            buckets[bound] = buckets.get(bound, 0.0) + value
    return buckets


def bucket_delta(after: dict[float, float], before: dict[float, float]) -> dict[float, float]:
    return {bound: count - before.get(bound, 0.0) for bound, count in after.items()}


def histogram_quantile(q: float, buckets: dict[float, float]) -> float | None:
    """Like PromQL histogram_quantile: linear interpolation inside the bucket (q in 0..1)."""
    bounds = sorted(buckets)
    if not bounds or buckets[bounds[-1]] <= 0:
        return None
    total = buckets[bounds[-1]]
    rank = q * total
    lower_bound, lower_count = 0.0, 0.0
    for bound in bounds:
        count = buckets[bound]
        if count >= rank:
            if math.isinf(bound):
                return lower_bound
            if count == lower_count:
                return bound
            return lower_bound + (bound - lower_bound) * (rank - lower_count) / (
                count - lower_count
            )
        lower_bound, lower_count = bound, count
    return bounds[-1]


def histogram_summary_ms(buckets: dict[float, float]) -> dict[str, float | None]:
    def ms(q: float) -> float | None:
        value = histogram_quantile(q, buckets)
        return None if value is None else round(value * 1e3, 3)

    count = buckets.get(math.inf, 0.0)
    return {"p50_ms": ms(0.5), "p99_ms": ms(0.99), "count": int(count)}


# --- /proc ------------------------------------------------------------------------------


def rss_mib(pid: int) -> float | None:
    """Resident set size of a live process (VmRSS), in MiB."""
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        return None
    return None


def cpu_seconds(pid: int) -> float:
    """User + system CPU time a process has used so far (0 when it is gone)."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            fields = stat.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / _CLOCK_TICKS


def host_busy_seconds() -> float:
    """CPU seconds the whole machine has spent busy (all cores, from /proc/stat)."""
    with open("/proc/stat") as stat:
        fields = [int(x) for x in stat.readline().split()[1:]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = fields[:8]
    return (user + nice + system + irq + softirq + steal) / _CLOCK_TICKS


# --- reports --------------------------------------------------------------------------------


def report_header(benchmark: str, args: argparse.Namespace) -> dict[str, Any]:
    """What every benchmark's JSON starts with: which script, when, on what, how called."""
    return {
        "benchmark": benchmark,
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "host": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "loadavg_at_start": loadavg(),
        },
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
    }


def loadavg() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


# --- processes ------------------------------------------------------------------------------


def stop_processes(processes: Sequence[subprocess.Popen[bytes]], grace: float = 10.0) -> None:
    """SIGTERM every process, SIGKILL what is left after `grace` s; not interruptible."""
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM, signal.SIGINT})
    try:
        testnet.stop_processes(dict(enumerate(processes)), grace)
    finally:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM, signal.SIGINT})


def exit_on_sigterm(signum: int, frame: object) -> None:
    """`timeout` or a CI runner stopping a benchmark must still stop what it started."""
    raise KeyboardInterrupt(f"signal {signum}")


class CpuMeter:
    """Wall time and CPU over one phase: the measured processes', this script's, and the
    rest of the host's (other work skews every figure, so each phase reports it)."""

    def __init__(self, cpu: Callable[[], float], label: str, unit: str) -> None:
        self._cpu = cpu
        self._label = label
        self._unit = unit

    def __enter__(self) -> CpuMeter:
        self._start = (self._cpu(), time.process_time(), host_busy_seconds(), time.perf_counter())
        return self

    def __exit__(self, *exc: object) -> None:
        cpu, bench, host, wall = self._start
        self.wall = time.perf_counter() - wall
        self.cpu = self._cpu() - cpu
        self.bench_cpu = time.process_time() - bench
        self.host_busy = host_busy_seconds() - host

    def report(self, units: int) -> dict[str, Any]:
        label = self._label
        return {
            "wall_s": round(self.wall, 3),
            f"{label}_cpu_s": round(self.cpu, 3),
            f"{label}_cpu_ms_per_{self._unit}": round(self.cpu / max(units, 1) * 1e3, 3),
            f"{label}_cpu_cores_busy": round(self.cpu / self.wall, 2),
            "bench_cpu_s": round(self.bench_cpu, 3),
            "other_cpu_cores_busy": round(
                max(0.0, self.host_busy - self.cpu - self.bench_cpu) / self.wall, 2
            ),
        }
