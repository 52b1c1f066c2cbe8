"""Side-by-side reference: a local 3-member etcd cluster measured the way bench_cluster times a round.

Starts `etcd` members on free loopback ports with a temp data dir, measures, and always
stops them. Prints ONE JSON document on stdout; progress goes to stderr.

    python benchmarks/bench_etcd.py                    # 3 members, plain HTTP
    python benchmarks/bench_etcd.py --tls              # client and peer mTLS (our CA code)

Phases (both always run):
  latency    one put at a time (POST /v3/kv/put on the leader, or --put-to first), then one
             task and one kept-alive connection per member polls POST /v3/kv/range with
             serializable=true (the member's own applied state, no round trip to the
             leader) until the key is there; the latency is put sent -> the last member
             has it. Same client (anna_trio.transport.client.HttpClient), same probe period and
             same "send, wait for the answer, then probe every member" shape as a round
             in bench_cluster's latency phase.
  sustained  --sustained-puts from --connections connections (a put's answer waits for
             the commit, so the connection count is what keeps puts in flight); a put
             counts once every member's applied revision (the header of a serializable
             range, scraped every 50 ms) has passed it; puts/s = applied everywhere / wall.
"""

from __future__ import annotations

import argparse
import base64
import json
import shutil
import signal
import socket
import ssl
import subprocess
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
    loadavg,
    progress,
    report_header,
    rss_mib,
    stop_processes,
    summary_ms,
)

from anna_trio import pki
from anna_trio._exceptions import PeerError
from anna_trio.transport.client import HttpClient

ETCD = shutil.which("etcd") or "/usr/bin/etcd"
READY_TIMEOUT = 30.0
REVISION_POLL = 0.05  # s between applied-revision scrapes, like bench_cluster's METRICS_POLL


def b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


class EtcdCluster:
    """`members` etcd processes on 127.0.0.1, data and certificates under `root`."""

    def __init__(self, root: Path, members: int, *, use_tls: bool) -> None:
        self.root = root
        self.members = list(range(1, members + 1))
        ports = free_ports(2 * members)
        self.client_ports = dict(zip(self.members, ports[:members], strict=True))
        self.peer_ports = dict(zip(self.members, ports[members:], strict=True))
        self.use_tls = use_tls
        self.scheme = "https" if use_tls else "http"
        self.processes: dict[int, subprocess.Popen[bytes]] = {}
        self.ssl: ssl.SSLContext | None = None

    def _certificates(self) -> None:
        ca_dir = self.root / "ca"
        pki.init_ca(ca_dir)
        for m in self.members:
            pki.issue_cert(
                ca_dir, node_id=f"etcd_{m}", sans=["127.0.0.1", "localhost"], out_dir=self._dir(m)
            )
        pki.issue_cert(ca_dir, node_id="bench", sans=["localhost"], out_dir=self.root / "bench")
        self.ssl = ssl.create_default_context(cafile=str(ca_dir / "ca.pem"))
        self.ssl.load_cert_chain(
            str(self.root / "bench" / "bench.pem"), str(self.root / "bench" / "bench.key")
        )

    def _dir(self, m: int) -> Path:
        return self.root / f"member{m}"

    def _command(self, m: int) -> list[str]:
        initial = ",".join(
            f"m{i}={self.scheme}://127.0.0.1:{self.peer_ports[i]}" for i in self.members
        )
        client_url = f"{self.scheme}://127.0.0.1:{self.client_ports[m]}"
        peer_url = f"{self.scheme}://127.0.0.1:{self.peer_ports[m]}"
        command = [
            ETCD,
            f"--name=m{m}",
            f"--data-dir={self._dir(m) / 'data'}",
            f"--listen-client-urls={client_url}",
            f"--advertise-client-urls={client_url}",
            f"--listen-peer-urls={peer_url}",
            f"--initial-advertise-peer-urls={peer_url}",
            f"--initial-cluster={initial}",
            "--initial-cluster-state=new",
            "--initial-cluster-token=anna-bench",
            "--logger=zap",
            "--log-level=warn",
        ]
        if self.use_tls:
            cert, key = self._dir(m) / f"etcd_{m}.pem", self._dir(m) / f"etcd_{m}.key"
            ca = self.root / "ca" / "ca.pem"
            command += [
                f"--cert-file={cert}",
                f"--key-file={key}",
                f"--trusted-ca-file={ca}",
                "--client-cert-auth",
                f"--peer-cert-file={cert}",
                f"--peer-key-file={key}",
                f"--peer-trusted-ca-file={ca}",
                "--peer-client-cert-auth",
            ]
        return command

    def start(self) -> None:
        if self.use_tls:
            self._certificates()
        for m in self.members:
            self._dir(m).mkdir(parents=True, exist_ok=True)
            log = (self._dir(m) / "etcd.log").open("wb")
            self.processes[m] = subprocess.Popen(
                self._command(m), stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
            )
            log.close()

    def stop(self) -> None:
        stop_processes(list(self.processes.values()))

    def client(self, m: int) -> HttpClient:
        return HttpClient(
            "127.0.0.1",
            self.client_ports[m],
            ssl_context=self.ssl,
            server_hostname="127.0.0.1" if self.ssl else None,
        )

    def cpu(self) -> float:
        return sum(cpu_seconds(p.pid) for p in self.processes.values())

    def rss(self) -> dict[str, float | None]:
        return {f"m{m}": rss_mib(p.pid) for m, p in self.processes.items()}

    def data_bytes(self) -> int:
        """Bytes under member 1's data dir (WAL segments are preallocated at 64 MB)."""
        data = self._dir(1) / "data"
        return sum(p.stat().st_size for p in data.rglob("*") if p.is_file())

    def tail(self, m: int) -> str:
        return (self._dir(m) / "etcd.log").read_text(errors="replace")[-2000:]


async def call(client: HttpClient, path: str, body: dict[str, Any]) -> dict[str, Any]:
    response = await client.request("POST", path, json_body=body)
    if response.status != 200:
        raise RuntimeError(f"{path} answered {response.status}: {response.body[:200]!r}")
    result: dict[str, Any] = response.json()
    return result


async def wait_ready(cluster: EtcdCluster) -> int:
    """Until every member accepts a put; then the leader's member number."""
    with trio.fail_after(READY_TIMEOUT):
        for m in cluster.members:
            if cluster.processes[m].poll() is not None:
                raise RuntimeError(f"etcd m{m} exited:\n{cluster.tail(m)}")
            client = cluster.client(m)
            try:
                while True:
                    try:
                        await call(client, "/v3/kv/put", {"key": b64("ready"), "value": b64("1")})
                        break
                    except (OSError, RuntimeError, PeerError):
                        await client.aclose()
                        if cluster.processes[m].poll() is not None:
                            raise RuntimeError(f"etcd m{m} exited:\n{cluster.tail(m)}") from None
                        await trio.sleep(0.1)
            finally:
                await client.aclose()
        for m in cluster.members:
            client = cluster.client(m)
            try:
                status = await call(client, "/v3/maintenance/status", {})
            finally:
                await client.aclose()
            if status.get("leader") == status["header"]["member_id"]:
                return m
    raise RuntimeError("no etcd leader")


async def poll_until_present(client: HttpClient, key: str, interval: float) -> float:
    """perf_counter() when this member's own applied state first holds `key`."""
    body = {"key": key, "serializable": True, "keys_only": True}
    while True:
        if "kvs" in await call(client, "/v3/kv/range", body):
            return time.perf_counter()
        await trio.sleep(interval)


async def phase_latency(
    cluster: EtcdCluster, writer: int, puts: int, interval: float, time_limit: float
) -> dict[str, Any]:
    put_client = cluster.client(writer)
    pollers = {m: cluster.client(m) for m in cluster.members}
    latencies: list[float] = []
    put_rtts: list[float] = []
    probe_rtts: list[float] = []
    try:

        async def one_put(name: str) -> float:
            seen: dict[int, float] = {}
            key = b64(name)
            started = time.perf_counter()
            await call(put_client, "/v3/kv/put", {"key": key, "value": b64("x" * 64)})
            put_rtts.append(time.perf_counter() - started)

            async def watch(m: int) -> None:
                seen[m] = await poll_until_present(pollers[m], key, interval)

            with trio.fail_after(10):
                async with trio.open_nursery() as nursery:
                    for m in pollers:
                        nursery.start_soon(watch, m)
            return max(seen.values()) - started

        for i in range(5):
            await one_put(f"lat/warm/{i}")
        for client in pollers.values():
            for _ in range(50):
                begun = time.perf_counter()
                await call(client, "/v3/kv/range", {"key": b64("lat/warm/0"), "serializable": True})
                probe_rtts.append(time.perf_counter() - begun)
        with CpuMeter(cluster.cpu, "etcd", "put") as meter, trio.move_on_after(time_limit):
            for i in range(puts):
                latencies.append(await one_put(f"lat/{i:06d}"))
                if (i + 1) % 100 == 0:
                    progress(f"  etcd latency: {i + 1}/{puts} puts")
    finally:
        await put_client.aclose()
        for client in pollers.values():
            await client.aclose()
    return {
        "puts": puts,
        "puts_measured": len(latencies),
        "put_to_seen_by_all": summary_ms(latencies),
        "put_rpc": summary_ms(put_rtts),
        "probe_rtt": summary_ms(probe_rtts),
        "poll_interval_ms": interval * 1e3,
        **meter.report(len(latencies)),
    }


async def applied_revision(client: HttpClient) -> int:
    answer = await call(client, "/v3/kv/range", {"key": b64("ready"), "serializable": True})
    return int(answer["header"]["revision"])


async def phase_sustained(
    cluster: EtcdCluster, writer: int, total: int, connections: int, time_limit: float
) -> dict[str, Any]:
    """Puts/s applied on every member, `connections` puts in flight."""
    watchers = {m: cluster.client(m) for m in cluster.members}
    base = {m: await applied_revision(c) for m, c in watchers.items()}
    applied = dict.fromkeys(cluster.members, 0)
    queue = iter(range(total))
    put_rtts: list[float] = []
    errors = 0
    finished = trio.Event()

    async def putter() -> None:
        nonlocal errors
        client = cluster.client(writer)
        try:
            for i in queue:
                begun = time.perf_counter()
                try:
                    await call(
                        client, "/v3/kv/put", {"key": b64(f"sus/{i:06d}"), "value": b64("x" * 64)}
                    )
                except RuntimeError:
                    errors += 1
                put_rtts.append(time.perf_counter() - begun)
        finally:
            await client.aclose()

    async def watch(m: int) -> None:
        while True:
            applied[m] = await applied_revision(watchers[m]) - base[m]
            if min(applied.values()) >= total:
                finished.set()
            await trio.sleep(REVISION_POLL)

    try:
        with CpuMeter(cluster.cpu, "etcd", "put") as meter, trio.move_on_after(time_limit):
            async with trio.open_nursery() as nursery:
                for m in cluster.members:
                    nursery.start_soon(watch, m)
                for _ in range(connections):
                    nursery.start_soon(putter)
                await finished.wait()
                nursery.cancel_scope.cancel()
    finally:
        for client in watchers.values():
            await client.aclose()
    done = min(applied.values())
    return {
        "puts": total,
        "connections": connections,
        "applied_everywhere": done,
        "put_errors": errors,
        "timed_out": not finished.is_set(),
        "puts_per_s": round(done / meter.wall, 1),
        "put_rpc": summary_ms(put_rtts),
        **meter.report(done),
    }


async def run(cluster: EtcdCluster, args: argparse.Namespace) -> dict[str, Any]:
    leader = await wait_ready(cluster)
    writer = leader if args.put_to == "leader" else 1
    progress(f"etcd ready: leader m{leader}, puts go to m{writer}")
    result: dict[str, Any] = {
        "leader": f"m{leader}",
        "writer": f"m{writer}",
        "rss_mib_idle": cluster.rss(),
    }
    progress(f"  etcd latency: {args.puts} sequential puts")
    result["latency"] = await phase_latency(
        cluster, writer, args.puts, args.poll_interval / 1e3, args.phase_limit
    )
    progress(f"  etcd sustained: {args.sustained_puts} puts, {args.connections} connections")
    result["sustained"] = await phase_sustained(
        cluster, writer, args.sustained_puts, args.connections, args.phase_limit
    )
    result["rss_mib_after_load"] = cluster.rss()
    result["member1_data_bytes"] = cluster.data_bytes()
    return result


def etcd_version() -> str:
    out = subprocess.run([ETCD, "--version"], capture_output=True, text=True, check=False).stdout
    return out.splitlines()[0] if out else "unknown"


def main() -> int:
    signal.signal(signal.SIGTERM, exit_on_sigterm)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--members", type=int, default=3)
    parser.add_argument("--puts", type=int, default=300, help="sequential puts (latency)")
    parser.add_argument("--sustained-puts", type=int, default=3000)
    parser.add_argument(
        "--connections", type=int, default=50, help="puts in flight (sustained phase)"
    )
    parser.add_argument(
        "--poll-interval", type=float, default=1.0, help="ms between probes per member"
    )
    parser.add_argument("--put-to", choices=("leader", "first"), default="leader")
    parser.add_argument("--tls", action="store_true", help="client and peer mTLS")
    parser.add_argument("--phase-limit", type=float, default=60.0, help="s per phase")
    parser.add_argument("--dir", type=Path, help="keep the members' folders here")
    args = parser.parse_args()
    report: dict[str, Any] = report_header("bench_etcd", args) | {"etcd": etcd_version()}
    with tempfile.TemporaryDirectory(prefix="etcd-bench-") as tmp:
        root = args.dir or Path(tmp)
        cluster = EtcdCluster(root, args.members, use_tls=args.tls)
        progress(f"starting {args.members} etcd members, tls={args.tls}")
        try:
            cluster.start()
            report |= trio.run(run, cluster, args)
        finally:
            progress("stopping etcd")
            cluster.stop()
    report["host"]["loadavg_at_end"] = loadavg()
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
