"""Real annad processes for the integration tests: start, stop, poll, read metrics.

Built on anna_trio.testnet (Layout, init, start_node, wait_ready, Cluster). Processes
are always stopped with SIGTERM, then SIGKILL after a bound, whatever the test did.
"""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import Any

import trio
from prometheus_client.parser import text_string_to_metric_families
from ruamel.yaml import YAML

from anna_trio import testnet
from anna_trio.testnet import Cluster, Layout

STOP_TIMEOUT = 10.0
POLL_TIMEOUT = 15.0


class LiveCluster:
    """The annad processes of one testnet layout, by node number."""

    def __init__(self, layout: Layout) -> None:
        self.layout = layout
        self.processes: dict[int, subprocess.Popen[bytes]] = {}

    def endpoint(self, n: int) -> testnet.NodeEndpoint:
        return self.layout.endpoints[n - 1]

    def start(self, *numbers: int, env: dict[str, str] | None = None) -> None:
        """Start nodes without waiting (then `await wait_ready()`)."""
        for n in numbers:
            assert n not in self.processes, f"node {n} is already running"
            self.processes[n] = testnet.start_node(self.layout, self.endpoint(n), env)

    async def wait_ready(self, *numbers: int) -> None:
        """Wait until the given nodes (default: every started one) answer /ready."""
        await testnet.wait_ready(self.layout, list(numbers or sorted(self.processes)))

    def pid(self, n: int) -> int:
        return self.processes[n].pid

    def signal(self, n: int, signum: int) -> None:
        os.kill(self.pid(n), signum)

    def kill(self, n: int) -> int:
        """SIGKILL, as in a crash; returns the exit status. `start(n)` runs it again."""
        process = self.processes.pop(n)
        process.kill()
        return process.wait()

    def stop_all(self) -> dict[int, int]:
        """SIGTERM everything still running (a stopped process is continued first),
        SIGKILL whatever has not exited after STOP_TIMEOUT; returns exit statuses."""
        codes = testnet.stop_processes(self.processes, STOP_TIMEOUT)
        self.processes.clear()
        return codes

    def log(self, n: int) -> str:
        return (self.layout.node_dir(n) / "annad.log").read_text(errors="replace")

    def log_tail(self, n: int, lines: int = 15) -> str:
        try:
            return "\n".join(self.log(n).splitlines()[-lines:])
        except OSError:
            return "(no log)"

    @asynccontextmanager
    async def connect(self) -> AsyncIterator[Cluster]:
        """RPC over mTLS (or plain HTTP), metrics and failpoints over plain HTTP."""
        client = Cluster(self.layout)
        try:
            yield client
        finally:
            await client.aclose()

    async def metrics(self, n: int) -> Samples:
        """GET /metrics of node n on a connection of its own."""
        async with self.connect() as client:
            return await metrics(client, n)


@contextmanager
def running(
    directory: Path,
    count: int = 3,
    *,
    start: int | None = None,
    prepare: Callable[[LiveCluster], None] | None = None,
    env: dict[str, str] | None = None,
) -> Iterator[LiveCluster]:
    """A fresh TLS layout of `count` nodes with the first `start` (default all) started,
    not yet ready: `await nodes.wait_ready()` (or `trio.run(nodes.wait_ready)` outside
    trio). `prepare` may rewrite files between init and start."""
    layout = testnet.free_layout(directory, count)
    testnet.init(layout)
    nodes = LiveCluster(layout)
    if prepare is not None:
        prepare(nodes)
    try:
        nodes.start(*range(1, (start if start is not None else count) + 1), env=env)
        yield nodes
    finally:
        nodes.stop_all()


async def poll(
    what: str, check: Callable[[], Awaitable[bool]], within: float = POLL_TIMEOUT
) -> None:
    """Wait until `check()` is true, failing the test after `within` seconds."""
    with trio.move_on_after(within):
        while True:
            if await check():
                return
            await trio.sleep(0.05)
    raise AssertionError(f"timed out after {within:.0f} s waiting for {what}")


Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


async def metrics(cluster: Cluster, n: int) -> Samples:
    status, body = await cluster.plain(n, "GET", "/metrics")
    assert status == 200, body
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(body.decode())
        for sample in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float | None:
    return samples.get((name, frozenset(labels.items())))


async def metric(cluster: Cluster, n: int, name: str, **labels: str) -> float:
    """One sample's value; 0 when the series does not exist (yet)."""
    return value(await metrics(cluster, n), name, **labels) or 0.0


async def status(cluster: Cluster, n: int) -> dict[str, Any]:
    code, data = await cluster.rpc(n, "GET", "/rpc/status")
    assert code == 200, data
    return dict(data)


async def reload(cluster: Cluster, nodes: LiveCluster, n: int, expect: str) -> dict[str, Any]:
    """SIGHUP node n, wait for its reload counter `expect` to grow; returns /rpc/status."""
    before = await metric(cluster, n, "anna_peer_reload_total", result=expect)
    nodes.signal(n, signal.SIGHUP)

    async def counted() -> bool:
        return await metric(cluster, n, "anna_peer_reload_total", result=expect) > before

    await poll(f"node {n} reload {expect}", counted)
    return await status(cluster, n)


def audit_entries(nodes: LiveCluster, n: int, event: str) -> list[dict[str, Any]]:
    path = nodes.layout.node_dir(n) / "audit.jsonl"
    entries = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [entry for entry in entries if entry.get("event") == event]


def peers_file(nodes: LiveCluster, n: int) -> Path:
    return nodes.layout.node_dir(n) / "peers.yml"


def read_peers(nodes: LiveCluster, n: int) -> dict[str, Any]:
    return dict(YAML(typ="safe").load(peers_file(nodes, n).read_text()))


def write_peers(nodes: LiveCluster, n: int, document: dict[str, Any] | str) -> None:
    """Replace node n's peers.yml atomically (a reload never reads half a file)."""
    path = peers_file(nodes, n)
    if isinstance(document, str):
        text = document
    else:
        buffer = io.StringIO()
        YAML(typ="safe", pure=True).dump(document, buffer)
        text = buffer.getvalue()
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


async def round_everywhere(
    cluster: Cluster, round_id: str, numbers: list[int], participants: set[str]
) -> list[dict[str, Any]]:
    """Wait until `round_id` is Complete with exactly `participants` on every node listed."""
    views: list[dict[str, Any]] = []

    async def done() -> bool:
        nonlocal views
        views = [v for v in [await cluster.round(n, round_id) for n in numbers] if v]
        return len(views) == len(numbers) and all(
            v["status"] == "Complete" and set(v["participating_nodes"]) == participants
            for v in views
        )

    await poll(f"{round_id} Complete with {sorted(participants)} on nodes {numbers}", done)
    assert len({v["result_digest"] for v in views}) == 1, views
    return views
