"""Shared fixtures: real annad clusters on free loopback ports, always torn down.

`cluster_factory` (per test) and `module_cluster_factory` (per module) build a testnet
layout under a temporary folder, start the chosen nodes and wait until they are ready.
`nodes` (per module) is a ready 3-node TLS cluster from `_launch.running`, and `cluster`
its RPC client; modules with a cluster of their own define their own `cluster`.
Call them from *sync* fixtures or sync tests (they run their own `trio.run`); inside an
async test use `LiveCluster.start` + `await LiveCluster.wait_ready`. Both kinds are
`_launch.LiveCluster`.
"""

from __future__ import annotations

import contextlib
import shutil
import sys
import tempfile
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import trio

from _launch import LiveCluster, running
from anna_trio import testnet

BIN = Path(sys.executable).parent


@pytest.fixture(scope="session", autouse=True)
def daemons_temporary_directory() -> Iterator[Path]:
    """A TMPDIR of this session's own for every process the tests start, removed at the
    end: a daemon makes its console socket's directory there and removes it when it
    stops, which one a test kills with SIGKILL cannot do. Short, as a Unix socket's
    path has at most 108 bytes."""
    directory = Path(tempfile.mkdtemp(prefix="anna-tests-"))
    try:
        with pytest.MonkeyPatch.context() as patch:
            patch.setenv("TMPDIR", str(directory))
            yield directory
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def console_script(name: str) -> str:
    """Path of an installed console script (annad, annactl) next to this Python."""
    return str(BIN / name)


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
        cluster.start(*(running or range(1, nodes + 1)))
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
                    unclean.append(f"node {n} exited {code} on SIGTERM:\n{cluster.log_tail(n)}")
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
) -> Iterator[LiveCluster]:
    """A ready 3-node TLS cluster shared by the tests of one module."""
    name = request.module.__name__.removeprefix("test_")
    with running(tmp_path_factory.mktemp(name) / "testnet") as started:
        trio.run(started.wait_ready)
        yield started


@pytest.fixture
async def cluster(nodes: LiveCluster) -> AsyncIterator[testnet.Cluster]:
    """An RPC client of `nodes`, closed after the test."""
    client = testnet.Cluster(nodes.layout)
    try:
        yield client
    finally:
        await client.aclose()
