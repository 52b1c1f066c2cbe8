"""Issue 7 benchmark suite: every benchmark in one session, one JSON document, targets judged.

Runs, each as its own bounded subprocess (so one that hangs or dies cannot leave the
others' daemons behind, and each prints its own JSON document):

  1. `annactl --help` wall time (--help-runs runs, median)
  2. bench_migration.py (state v1 -> v2, in process)
  2a. bench_parse.py (what parsing a peer's observation costs)
  2b. bench_exchange.py (what one peer request costs, hot and waking an idle process)
  2c. bench_fsync.py (one fsync here; 3-node rounds durable and with the WAL's fsync off)
  2d. bench_audit_ids.py (an audit_id: fsync before use against durable blocks)
  3. bench_etcd.py, plain and mTLS: 3 etcd members, put -> seen by all three
  4. bench_cluster.py --nodes 3, mTLS: latency, sustained, rss (10,000 rounds), submit
  5. bench_cluster.py --nodes 5, 9, 15, mTLS: latency, sustained

and reports our 3-node round p50 as a ratio to etcd's put-seen-by-all p50 from the same
session (judged against etcd with mTLS, as ours runs; the ratio to plain etcd is
reported too). Progress goes to stderr; stdout carries ONE JSON document.

    python benchmarks/bench_suite.py                       # everything (about 10 minutes)
    python benchmarks/bench_suite.py --quick               # short runs, to try the scripts
    python benchmarks/bench_suite.py --nodes 3 --skip rss,submit
"""

from __future__ import annotations

import argparse
import json
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from _common import exit_on_sigterm, loadavg, progress, report_header

HERE = Path(__file__).resolve().parent
TARGETS = {
    "round_p50_over_etcd_p50_3_nodes": 2.5,
    "round_p99_ms_3_nodes": 25.0,  # issue 13: at equal durability with etcd (fsync on)
    "sustained_rounds_per_s_3_nodes": 300.0,
    "round_p50_ms_15_nodes": 50.0,
    "migration_median_ms": 5.0,
    "annactl_help_median_ms": 150.0,
    "rss_mib_per_node_after_10000_rounds": 80.0,
    "rss_growth_mib_second_half": 2.0,
}
STEPS = (
    "help",
    "migration",
    "parse",
    "exchange",
    "fsync",
    "audit_ids",
    "etcd",
    "cluster",
    "rss",
    "submit",
)


def annactl_help(runs: int) -> dict[str, Any]:
    """Wall time of `annactl --help` in a fresh interpreter, `runs` times."""
    annactl = Path(sys.executable).parent / "annactl"
    command = (
        [str(annactl)] if annactl.exists() else [sys.executable, "-m", "anna_trio.cli.annactl"]
    )
    subprocess.run([*command, "--help"], capture_output=True, check=True)  # warm the page cache
    walls = []
    for _ in range(runs):
        started = time.perf_counter()
        subprocess.run([*command, "--help"], capture_output=True, check=True)
        walls.append((time.perf_counter() - started) * 1e3)
    return {
        "command": " ".join([*command, "--help"]),
        "runs": runs,
        "median_ms": round(statistics.median(walls), 1),
        "min_ms": round(min(walls), 1),
        "max_ms": round(max(walls), 1),
    }


def sparse_probes(nodes: int) -> list[str]:
    """Probe schedule above 3 nodes: the first at 10 ms per node, then every 3 ms per
    node. Every probe is a TLS request a daemon answers in Python; at 15 nodes the
    1 ms schedule (etcd's and the 3-node run's) cost the daemons more CPU than the
    round itself, so those rounds are judged by the nodes' own log stamps."""
    return ["--poll-after", str(10 * nodes), "--poll-interval", str(3 * nodes)]


def run_json(script: str, args: list[str], timeout: float) -> dict[str, Any]:
    """Run one benchmark script; its JSON document, or why there is none.

    On timeout the script gets SIGTERM (it stops its own daemons), then SIGKILL.
    """
    command = [sys.executable, str(HERE / script), *args]
    progress(f"run: {' '.join(command[1:])}")
    with subprocess.Popen(command, stdout=subprocess.PIPE) as process:
        try:
            out, _ = process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            process.terminate()
            try:
                out, _ = process.communicate(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                out, _ = process.communicate()
            return {"error": f"timed out after {timeout:.0f} s", "command": command[1:]}
        except BaseException:
            process.terminate()
            process.wait(timeout=30)
            raise
    if process.returncode != 0:
        return {"error": f"exit code {process.returncode}", "command": command[1:]}
    result: dict[str, Any] = json.loads(out)
    return result


def cluster_summary(report: dict[str, Any]) -> dict[str, Any]:
    """The figures the docs table shows, from one bench_cluster document."""
    if "error" in report:
        return report
    run = report["runs"][0]
    out: dict[str, Any] = {"nodes": run["nodes"], "tls": run["tls"]}
    latency = run.get("round_latency")
    if latency:
        probes = latency["start_to_complete_everywhere"]
        logs = latency["start_to_complete_everywhere_from_logs"]
        out["round_ms_probes"] = {"p50": probes.get("p50_ms"), "p99": probes.get("p99_ms")}
        out["round_ms_logs"] = {"p50": logs.get("p50_ms"), "p99": logs.get("p99_ms")}
        out["rounds_measured"] = latency["rounds_measured"]
        out["latency_other_cpu_cores_busy"] = latency["other_cpu_cores_busy"]
        out["peer_request_ms_latency_phase"] = latency["peer_request_latency"]
    sustained = run.get("sustained")
    if sustained:
        out["rounds_per_s"] = sustained["rounds_per_s"]
        out["daemon_cpu_ms_per_round_sustained"] = sustained["daemon_cpu_ms_per_round"]
        out["sustained_other_cpu_cores_busy"] = sustained["other_cpu_cores_busy"]
        out["peer_request_ms_sustained"] = sustained["peer_request_latency"]
    rss = run.get("rss")
    if rss:
        out["rss"] = {
            k: rss.get(k)
            for k in ("idle", "half_way", "end", "max_mib", "max_growth_second_half_mib")
        }
        out["rss_rounds_per_s"] = rss["load"]["rounds_per_s"]
        out["rss_other_cpu_cores_busy"] = rss["load"]["other_cpu_cores_busy"]
    submit = run.get("submit")
    if submit:
        out["submits"] = {
            shape: {
                "accepted_per_s": submit[shape]["accepted_per_s"],
                "rpc_p50_ms": submit[shape]["submit_rpc"].get("p50_ms"),
                "rpc_p99_ms": submit[shape]["submit_rpc"].get("p99_ms"),
                "other_cpu_cores_busy": submit[shape]["other_cpu_cores_busy"],
            }
            for shape in ("known_round", "new_round")
        }
    out["rss_mib_idle"] = run.get("rss_mib_idle")
    out["rss_mib_after_load"] = run.get("rss_mib_after_load")
    out["node1_files_bytes"] = run.get("node1_files_bytes")
    out["peer_request_errors"] = run.get("peer_request_errors")
    return out


def judge(suite: dict[str, Any]) -> dict[str, Any]:
    """Each issue-7 target: the figure, the bound, met or not (None when not measured)."""
    clusters = {c.get("nodes"): c for c in suite["summary"]["clusters"] if "error" not in c}
    three, fifteen = clusters.get(3, {}), clusters.get(15, {})
    etcd = suite["summary"].get("etcd_tls_put_seen_by_all_ms", {})
    ratio = suite["summary"].get("round_p50_over_etcd_tls_p50")
    rss = three.get("rss") or {}
    figures = {
        "round_p50_over_etcd_p50_3_nodes": ratio,
        "round_p99_ms_3_nodes": three.get("round_ms_probes", {}).get("p99"),
        "sustained_rounds_per_s_3_nodes": three.get("rounds_per_s"),
        "round_p50_ms_15_nodes": fifteen.get("round_ms_logs", {}).get("p50"),
        "migration_median_ms": suite.get("migration", {}).get("median_ms"),
        "annactl_help_median_ms": suite.get("annactl_help", {}).get("median_ms"),
        "rss_mib_per_node_after_10000_rounds": rss.get("max_mib"),
        "rss_growth_mib_second_half": rss.get("max_growth_second_half_mib"),
    }
    verdict: dict[str, Any] = {}
    for name, bound in TARGETS.items():
        figure = figures[name]
        at_least = name.startswith("sustained")
        met = None if figure is None else (figure >= bound if at_least else figure <= bound)
        verdict[name] = {
            "measured": figure,
            "target": (">= " if at_least else "<= ") + str(bound),
            "met": met,
        }
    verdict["round_p50_over_etcd_p50_3_nodes"]["etcd_p50_ms"] = etcd.get("p50")
    return verdict


def main() -> int:
    signal.signal(signal.SIGTERM, exit_on_sigterm)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", default="3,5,9,15", help="cluster sizes, comma separated")
    parser.add_argument("--skip", default="", help=f"steps to leave out, of {','.join(STEPS)}")
    parser.add_argument("--quick", action="store_true", help="short runs (to try the scripts)")
    parser.add_argument("--help-runs", type=int, default=20)
    parser.add_argument("--rss-rounds", type=int, default=10000)
    parser.add_argument("--timeout", type=float, default=240.0, help="s per benchmark run")
    parser.add_argument("--rss-timeout", type=float, default=420.0, help="s for the 3-node run")
    args = parser.parse_args()
    skip = {s for s in args.skip.split(",") if s}
    if unknown := skip - set(STEPS):
        parser.error(f"unknown steps: {sorted(unknown)}")
    sizes = [int(n) for n in args.nodes.split(",") if n]
    short = ["--rounds", "100", "--sustained-rounds", "500"] if args.quick else []
    rss_rounds = 2000 if args.quick else args.rss_rounds

    suite: dict[str, Any] = report_header("bench_suite", args) | {"targets": TARGETS}
    if "help" not in skip:
        progress(f"annactl --help x {args.help_runs}")
        suite["annactl_help"] = annactl_help(args.help_runs)
    if "migration" not in skip:
        suite["migration"] = run_json("bench_migration.py", [], args.timeout)
    if "parse" not in skip:
        suite["parse"] = run_json("bench_parse.py", ["--calls", "2000"] if args.quick else [], 60)
    if "exchange" not in skip:
        exchange_args = ["--requests", "400"] if args.quick else []
        suite["exchange"] = run_json("bench_exchange.py", exchange_args, args.timeout)
    if "fsync" not in skip:
        fsync_args = ["--pairs", "1", "--rounds", "100"] if args.quick else []
        suite["fsync"] = run_json("bench_fsync.py", fsync_args, 2 * args.timeout)
    if "audit_ids" not in skip:
        ids_args = ["--ids", "300"] if args.quick else []
        suite["audit_ids"] = run_json("bench_audit_ids.py", ids_args, args.timeout)
    etcd_args = ["--puts", "100", "--sustained-puts", "1000"] if args.quick else []
    if "etcd" not in skip:
        suite["etcd_plain"] = run_json("bench_etcd.py", etcd_args, args.timeout)
        suite["etcd_tls"] = run_json("bench_etcd.py", [*etcd_args, "--tls"], args.timeout)
    suite["clusters"] = []
    for nodes in sizes if "cluster" not in skip else []:
        phases = ["latency", "sustained"]
        timeout = args.timeout
        if nodes == 3:
            phases += [p for p in ("rss", "submit") if p not in skip]
            timeout = args.rss_timeout if "rss" in phases else args.timeout
        cluster_args = [
            "--nodes",
            str(nodes),
            "--phases",
            ",".join(phases),
            "--rss-rounds",
            str(rss_rounds),
            *short,
        ]
        if nodes > 3:
            cluster_args += sparse_probes(nodes)
        if nodes >= 9:
            cluster_args += ["--phase-limit", "45"]
        suite["clusters"].append(run_json("bench_cluster.py", cluster_args, timeout))

    summary: dict[str, Any] = {"clusters": [cluster_summary(c) for c in suite["clusters"]]}
    for mode in ("plain", "tls"):
        etcd = suite.get(f"etcd_{mode}", {})
        if "latency" in etcd:
            seen = etcd["latency"]["put_to_seen_by_all"]
            summary[f"etcd_{mode}_put_seen_by_all_ms"] = {
                "p50": seen["p50_ms"],
                "p99": seen["p99_ms"],
            }
            summary[f"etcd_{mode}_puts_per_s"] = etcd["sustained"]["puts_per_s"]
    three = next(
        (c for c in summary["clusters"] if c.get("nodes") == 3 and "round_ms_probes" in c), None
    )
    if three and "etcd_plain_put_seen_by_all_ms" in summary:
        ours = three["round_ms_probes"]["p50"]
        summary["round_p50_over_etcd_p50"] = round(
            ours / summary["etcd_plain_put_seen_by_all_ms"]["p50"], 2
        )
        if "etcd_tls_put_seen_by_all_ms" in summary:
            summary["round_p50_over_etcd_tls_p50"] = round(
                ours / summary["etcd_tls_put_seen_by_all_ms"]["p50"], 2
            )
    suite["summary"] = summary
    suite["host"]["loadavg_at_end"] = loadavg()
    suite["meets_targets"] = judge(suite)
    print(json.dumps(suite, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
