"""Shared fixtures: real annad clusters on free loopback ports, always torn down.

`cluster_factory` (per test) and `module_cluster_factory` (per module) build a testnet
layout under a temporary folder, start the chosen nodes and wait until they are ready.
`nodes` (per module) is a ready 3-node TLS cluster from `_launch.running`, and `cluster`
its RPC client; modules with a cluster of their own define their own `cluster`.
Call them from *sync* fixtures or sync tests (they run their own `trio.run`); inside an
async test use `LiveCluster.start` + `await LiveCluster.wait_ready`.
"""

from __future__ import annotations

import contextlib
import subprocess
import sys
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import trio
from prometheus_client.parser import text_string_to_metric_families

from _launch import Nodes, running
from anna_trio import testnet

STOP_TIMEOUT = 10.0
BIN = Path(sys.executable).parent


def console_script(name: str) -> str:
    """Path of an installed console script (annad, annactl) next to this Python."""
    return str(BIN / name)


def log_tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


class LiveCluster:
    """A testnet layout with some of its annad processes running."""

    def __init__(self, layout: testnet.Layout) -> None:
        self.layout = layout
        self.processes: dict[int, subprocess.Popen[bytes]] = {}

    def endpoint(self, n: int) -> testnet.NodeEndpoint:
        return self.layout.endpoints[n - 1]

    def log(self, n: int) -> str:
        return log_tail(self.layout.node_dir(n) / "annad.log")

    def start(self, n: int, env: dict[str, str] | None = None) -> None:
        assert n not in self.processes, f"node {n} is already running"
        self.processes[n] = testnet.start_node(self.layout, self.endpoint(n), env)

    async def wait_ready(self, *nodes: int) -> None:
        await testnet.wait_ready(self.layout, list(nodes or self.processes))

    def kill(self, n: int) -> int:
        """SIGKILL, as in a crash; returns the exit status."""
        process = self.processes.pop(n)
        process.kill()
        return process.wait()

    def stop_all(self) -> dict[int, int]:
        """SIGTERM everything, SIGKILL what outlives STOP_TIMEOUT; returns exit statuses."""
        codes = testnet.stop_processes(self.processes, STOP_TIMEOUT)
        self.processes.clear()
        return codes

    @contextlib.asynccontextmanager
    async def connect(self) -> AsyncIterator[testnet.Cluster]:
        """RPC over mTLS (or plain HTTP), metrics and failpoints over plain HTTP."""
        client = testnet.Cluster(self.layout)
        try:
            yield client
        finally:
            await client.aclose()

    async def metrics(self, n: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        """GET /metrics of node n as {(sample name, sorted labels): value}."""
        async with self.connect() as client:
            status, body = await client.plain(n, "GET", "/metrics")
        assert status == 200, body
        return {
            (sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(body.decode())
            for sample in family.samples
        }


def _launch(
    directory: Path,
    *,
    nodes: int = 3,
    running: tuple[int, ...] | None = None,
    tls: bool = True,
    round_timeout: float = 2.0,
    peers_extra: str = "",
) -> LiveCluster:
    """Init a layout, append `peers_extra` (top-level YAML) to every peers.yml, start nodes."""
    layout = testnet.free_layout(directory, nodes, tls=tls, round_timeout=round_timeout)
    testnet.init(layout)
    if peers_extra:
        for ep in layout.endpoints:
            with (layout.node_dir(ep.n) / "peers.yml").open("a") as peers:
                peers.write(peers_extra)
    cluster = LiveCluster(layout)
    try:
        for n in running or range(1, nodes + 1):
            cluster.start(n)
        trio.run(cluster.wait_ready)
    except BaseException:
        cluster.stop_all()
        raise
    return cluster


@contextlib.contextmanager
def _cluster_factory(base: Path) -> Iterator[Callable[..., LiveCluster]]:
    launched: list[LiveCluster] = []

    def make(**options: Any) -> LiveCluster:
        cluster = _launch(base / f"cluster{len(launched) + 1}", **options)
        launched.append(cluster)
        return cluster

    try:
        yield make
    finally:
        unclean = []
        for cluster in launched:
            for n, code in cluster.stop_all().items():
                if code != 0:
                    unclean.append(f"node {n} exited {code} on SIGTERM:\n{cluster.log(n)}")
        if unclean:
            pytest.fail("\n".join(unclean))


@pytest.fixture
def cluster_factory(tmp_path: Path) -> Iterator[Callable[..., LiveCluster]]:
    """Builds clusters for one test; SIGTERM (then SIGKILL) at the end, even on failure."""
    with _cluster_factory(tmp_path) as make:
        yield make


@pytest.fixture(scope="module")
def module_cluster_factory(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Callable[..., LiveCluster]]:
    """Like `cluster_factory`, shared by the tests of one module."""
    with _cluster_factory(tmp_path_factory.mktemp("clusters")) as make:
        yield make


@pytest.fixture(scope="module")
def nodes(
    tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest
) -> Iterator[Nodes]:
    """A ready 3-node TLS cluster shared by the tests of one module."""
    name = request.module.__name__.removeprefix("test_")
    with running(tmp_path_factory.mktemp(name) / "testnet") as started:
        trio.run(started.ready)
        yield started


@pytest.fixture
async def cluster(nodes: Nodes) -> AsyncIterator[testnet.Cluster]:
    """An RPC client of `nodes`, closed after the test."""
    client = testnet.Cluster(nodes.layout)
    try:
        yield client
    finally:
        await client.aclose()
