"""What the metrics listener costs (issue 17): idle CPU, a scrape's latency and CPU, and
the round's latency with and without scrapes. One JSON document on stdout.

    python benchmarks/bench_console.py [--nodes 3] [--idle 20] [--scrapes 300] [--rounds 300]

Phases, on a local mTLS cluster on free ports:
  start    seconds from starting annad to its /ready answering 200, per node.
  idle     the daemons' CPU over --idle seconds with no traffic at all, and again with a
           kept-alive connection open on every metrics listener (Prometheus keeps one).
  scrape   GET /metrics on node 1, --scrapes times over one kept-alive connection and
           --scrapes times on a fresh connection each: the client's latency and node 1's
           CPU per request; the same for the console page, GET / (when it is served).
  rounds   bench_cluster's latency phase (sequential rounds started on node 1, completion
           polled on every node), once with the listeners quiet and once while every
           node's /metrics is scraped --scrape-rate times a second and its console page
           loaded --page-rate times a second.

Run it against another checkout (`PYTHONPATH=/path/to/checkout`) for an A/B: the
script talks to annad over HTTP only, and skips the console page where there is none.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import trio
from _common import (
    CpuMeter,
    cpu_seconds,
    exit_on_sigterm,
    progress,
    report_header,
    summary_ms,
)
from bench_cluster import LocalCluster, phase_latency

from anna_trio import testnet
from anna_trio.transport.client import HttpClient


async def phase_start(cluster: LocalCluster) -> dict[str, Any]:
    """Start every node; seconds until each one's /ready is 200."""
    began = time.perf_counter()
    cluster.start()
    ready: dict[str, float] = {}
    for ep in cluster.endpoints:
        while True:
            client = HttpClient(ep.host, ep.metrics_port)
            try:
                with trio.move_on_after(1):
                    if (await client.request("GET", "/ready")).status == 200:
                        break
            except OSError:
                pass
            finally:
                await client.aclose()
            await trio.sleep(0.01)
        ready[ep.node_id] = round(time.perf_counter() - began, 3)
    return {"seconds_to_ready": ready}


async def phase_idle(cluster: LocalCluster, seconds: float) -> dict[str, Any]:
    """The daemons' CPU with nothing to do, without and with idle kept-alive scrapers."""
    result: dict[str, Any] = {}
    for shape in ("no_connection", "kept_alive_connection"):
        clients = []
        if shape == "kept_alive_connection":
            for ep in cluster.endpoints:
                client = HttpClient(ep.host, ep.metrics_port)
                await client.request("GET", "/metrics")
                clients.append(client)
        await trio.sleep(1.0)
        with CpuMeter(cluster.cpu, "daemon", "s") as meter:
            await trio.sleep(seconds)
        for client in clients:
            await client.aclose()
        per_node = meter.cpu / len(cluster.endpoints) / meter.wall
        result[shape] = {
            **meter.report(round(meter.wall)),
            "daemon_cpu_ms_per_s_per_node": round(per_node * 1e3, 3),
        }
    return result


async def timed_requests(
    cluster: LocalCluster, path: str, count: int, *, fresh: bool
) -> dict[str, Any] | None:
    """`count` sequential GETs of `path` on node 1; None when node 1 does not serve it."""
    ep = cluster.endpoints[0]
    pid = cluster.processes[1].pid
    latencies: list[float] = []
    client = HttpClient(ep.host, ep.metrics_port)
    try:
        first = await client.request("GET", path)
        if first.status != 200:
            return None
        size = len(first.body)
        cpu = cpu_seconds(pid)
        for _ in range(count):
            if fresh:
                await client.aclose()
                client = HttpClient(ep.host, ep.metrics_port)
            started = time.perf_counter()
            response = await client.request("GET", path)
            latencies.append(time.perf_counter() - started)
            assert response.status == 200, response.status
        cpu = cpu_seconds(pid) - cpu
    finally:
        await client.aclose()
    return {
        "latency": summary_ms(latencies),
        "daemon_cpu_ms_per_request": round(cpu / count * 1e3, 3),
        "answer_bytes": size,
    }


async def phase_scrape(cluster: LocalCluster, count: int) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for path, name in (("/metrics", "metrics"), ("/", "console_page")):
        for fresh in (False, True):
            shape = f"{name}_{'fresh_connection' if fresh else 'kept_alive'}"
            result[shape] = await timed_requests(cluster, path, count, fresh=fresh)
    return result


async def scrape_forever(
    cluster: LocalCluster, ep: testnet.NodeEndpoint, path: str, rate: float
) -> None:
    client = HttpClient(ep.host, ep.metrics_port)
    try:
        while True:
            await client.request("GET", path)
            await trio.sleep(1 / rate)
    finally:
        await client.aclose()


async def phase_rounds(cluster: LocalCluster, args: argparse.Namespace) -> dict[str, Any]:
    """The latency phase quiet, then under scrapes and page loads on every node."""

    async def latency(prefix: str) -> dict[str, Any]:
        return await phase_latency(cluster, args.rounds, prefix, 0.001, 0.0, 120.0)

    result: dict[str, Any] = {"quiet": await latency("quiet")}
    page = (await timed_requests(cluster, "/", 1, fresh=False)) is not None
    async with trio.open_nursery() as nursery:
        for ep in cluster.endpoints:
            nursery.start_soon(scrape_forever, cluster, ep, "/metrics", args.scrape_rate)
            if page:
                nursery.start_soon(scrape_forever, cluster, ep, "/", args.page_rate)
        result["scraped"] = await latency("scraped")
        nursery.cancel_scope.cancel()
    result["scraped"]["load"] = {
        "metrics_per_s_per_node": args.scrape_rate,
        "console_pages_per_s_per_node": args.page_rate if page else 0,
    }
    return result


async def run(args: argparse.Namespace, root: Path) -> dict[str, Any]:
    cluster = LocalCluster(
        root, "console", validators=args.nodes, running=args.nodes, use_tls=True, round_timeout=2.0
    )
    report: dict[str, Any] = report_header("bench_console", args)
    try:
        progress("start")
        report["start"] = await phase_start(cluster)
        await trio.sleep(2.0)
        progress(f"idle {args.idle:.0f} s, twice")
        report["idle"] = await phase_idle(cluster, args.idle)
        progress(f"scrape x {args.scrapes}")
        report["scrape"] = await phase_scrape(cluster, args.scrapes)
        progress(f"rounds x {args.rounds}, quiet then scraped")
        report["rounds"] = await phase_rounds(cluster, args)
    finally:
        cluster.stop()
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nodes", type=int, default=3)
    parser.add_argument("--idle", type=float, default=20.0, help="s of each idle measurement")
    parser.add_argument("--scrapes", type=int, default=300, help="requests per scrape shape")
    parser.add_argument("--rounds", type=int, default=300, help="rounds per latency phase")
    parser.add_argument("--scrape-rate", type=float, default=10.0, help="/metrics per s per node")
    parser.add_argument("--page-rate", type=float, default=1.0, help="console pages per s per node")
    parser.add_argument("--label", default="", help="a name for this run (e.g. the code)")
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, exit_on_sigterm)
    with tempfile.TemporaryDirectory(prefix="bench-console-") as root:
        report = trio.run(run, args, Path(root))
    json.dump(report, sys.stdout, indent=2)
    print()


if __name__ == "__main__":
    main()
