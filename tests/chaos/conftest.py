"""Fixtures of the chaos suite: the namespaces (per session) and a fresh cluster per test.

Where namespaces cannot be made, CI (CI=true) fails every chaos test; elsewhere they
are skipped with the reason.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio
from chaos_cluster import ChaosCluster
from netns import ChaosNetwork, NetnsUnavailable, exclusive

NAMESPACES = 5  # the 5-node relay scenario; the others use the first three


@pytest.fixture(scope="session")
def chaos_network() -> Iterator[ChaosNetwork]:
    """One namespace per node on a bridge; torn down at the end, even after a failure."""
    network = ChaosNetwork(NAMESPACES)
    with exclusive():
        try:
            network.create()
        except NetnsUnavailable as exc:
            if os.environ.get("CI") == "true":
                pytest.fail(f"chaos: cannot make network namespaces in CI: {exc}")
            pytest.skip(f"chaos suite needs network namespaces (root, iproute2): {exc}")
        try:
            yield network
        finally:
            network.destroy()


@pytest.fixture
def chaos_cluster(chaos_network: ChaosNetwork, tmp_path: Path) -> Iterator[ChaosCluster]:
    """Three ready annad processes with mTLS in their namespaces; killed at the end."""
    yield from _running(ChaosCluster(chaos_network, tmp_path / "cluster", count=3))


@pytest.fixture
def chaos_cluster5(chaos_network: ChaosNetwork, tmp_path: Path) -> Iterator[ChaosCluster]:
    """Five nodes: above three validators a round's starter relays the observations."""
    yield from _running(ChaosCluster(chaos_network, tmp_path / "cluster", count=5))


def _running(cluster: ChaosCluster) -> Iterator[ChaosCluster]:
    cluster.network.heal()
    try:
        cluster.start_all()
        trio.run(cluster.wait_ready)
        yield cluster
    finally:
        cluster.stop_all()
        cluster.network.heal()
