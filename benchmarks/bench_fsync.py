"""What durability costs a round (issue 13): one fsync on this disk, and the 3-node round
with every fsync on against the same cluster with the logs' fsyncs skipped.

1. `fsync`: append a record of about one observation (600 bytes) to a file in a
   directory on the benchmark's filesystem and fsync it, `--fsyncs` times; what one
   fsync on the round's critical path costs here.
2. `rounds`: bench_cluster.py --nodes 3 (mTLS, latency phase) twice, durable and with
   ANNA_UNSAFE_NO_FSYNC=1 (the WAL's fsync skipped: the test-only switch; audit
   entries are not written on a round's path), alternating `--pairs` times so drift in the machine's load falls on both.
   The difference in round p50/p99 is what the fsyncs add to a round.

Prints one JSON document.

    python benchmarks/bench_fsync.py [--fsyncs 500] [--pairs 2] [--rounds 300]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from _common import exit_on_sigterm, progress, summary_ms

HERE = Path(__file__).resolve().parent
RECORD = b"x" * 600


def fsync_cost(directory: Path, count: int) -> dict[str, Any]:
    """Wall time of append + fsync, `count` times, on a file in `directory`."""
    path = directory / "fsync.bench"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        os.write(fd, RECORD)
        os.fsync(fd)  # the file's first fsync also writes its inode: not a steady one
        took = []
        for _ in range(count):
            began = time.perf_counter()
            os.write(fd, RECORD)
            os.fsync(fd)
            took.append(time.perf_counter() - began)
    finally:
        os.close(fd)
        path.unlink()
    return summary_ms(took)


def cluster_rounds(rounds: int, durable: bool) -> dict[str, Any]:
    """bench_cluster.py's 3-node latency phase; its round figures."""
    env = dict(os.environ)
    env.pop("ANNA_UNSAFE_NO_FSYNC", None)
    if not durable:
        env["ANNA_UNSAFE_NO_FSYNC"] = "1"
    command = [
        sys.executable,
        str(HERE / "bench_cluster.py"),
        "--nodes",
        "3",
        "--rounds",
        str(rounds),
        "--phases",
        "latency",
    ]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    if done.returncode != 0:
        raise SystemExit(f"bench_cluster failed ({done.returncode}): {done.stderr[-2000:]}")
    result: dict[str, Any] = json.loads(done.stdout)
    return result


def round_figures(result: dict[str, Any]) -> dict[str, float]:
    """Round start to Complete on all three (probes), p50/p99, of the latency phase."""
    probes = result["runs"][0]["round_latency"]["start_to_complete_everywhere"]
    return {"p50_ms": float(probes["p50_ms"]), "p99_ms": float(probes["p99_ms"])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fsyncs", type=int, default=500)
    parser.add_argument("--pairs", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=300)
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, exit_on_sigterm)
    with tempfile.TemporaryDirectory(prefix="anna-fsync-") as tmp:
        progress(f"{args.fsyncs} fsyncs in {tmp}")
        one = fsync_cost(Path(tmp), args.fsyncs)
    runs: dict[str, list[dict[str, float]]] = {"durable": [], "no_fsync": []}
    for pair in range(args.pairs):
        for name, durable in (("durable", True), ("no_fsync", False)):
            progress(f"pair {pair + 1}/{args.pairs}: 3-node rounds, {name}")
            runs[name].append(round_figures(cluster_rounds(args.rounds, durable)))
    median = {
        name: {q: statistics.median(r[q] for r in results) for q in ("p50_ms", "p99_ms")}
        for name, results in runs.items()
    }
    print(
        json.dumps(
            {
                "fsync": one,
                "rounds": runs,
                "median": median,
                "fsyncs_add_p50_ms": round(
                    median["durable"]["p50_ms"] - median["no_fsync"]["p50_ms"], 3
                ),
                "fsyncs_add_p99_ms": round(
                    median["durable"]["p99_ms"] - median["no_fsync"]["p99_ms"], 3
                ),
            }
        )
    )


if __name__ == "__main__":
    main()
