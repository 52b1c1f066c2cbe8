"""A node flooded past its rate limit by an outsider keeps serving its peers (issue 5)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable

import httpx
import pytest
import trio

from _launch import LiveCluster, value
from anna_trio import tls
from anna_trio.config import load_cluster_config

pytestmark = pytest.mark.integration

FLOODER = "127.0.0.5"
LIMITS = "limits:\n  rate_per_client: 20\n  burst: 20\n"
FLOOD_CONNECTIONS = 8
FLOOD_REQUESTS = 150
ROUNDS = 5


@pytest.fixture
def cluster(cluster_factory: Callable[..., LiveCluster]) -> LiveCluster:
    """Three validators, mTLS, 20 requests/s (burst 20) for anyone else."""
    return cluster_factory(peers_extra=LIMITS, round_timeout=2.0)


async def test_flood_beyond_rate_limit_keeps_cluster_rounds_going(cluster: LiveCluster) -> None:
    """An outsider's flood on node 1 is answered 429 while rounds keep completing on
    every node with all three observations (validators are never limited)."""
    config = load_cluster_config(
        cluster.layout.node_dir(1) / "peers.yml", node_id=None, check_tls_files=False
    )
    transport = httpx.AsyncHTTPTransport(
        local_address=FLOODER, verify=tls.client_context(config.tls)
    )
    statuses: Counter[int] = Counter()
    url = f"https://127.0.0.1:{cluster.endpoint(1).rpc_port}/rpc/status"

    async def flood(client: httpx.AsyncClient) -> None:
        for _ in range(FLOOD_REQUESTS):
            statuses[(await client.get(url)).status_code] += 1

    async def rounds() -> list[dict[str, object] | None]:
        async with cluster.connect() as rpc:
            for i in range(ROUNDS):
                status, body = await rpc.rpc(
                    1, "POST", "/rpc/round/start", {"round_id": f"flood_{i}"}
                )
                assert status == 202, body

            async def all_complete() -> bool:
                for n in (1, 2, 3):
                    for i in range(ROUNDS):
                        view = await rpc.round(n, f"flood_{i}")
                        if (
                            view is None
                            or view["status"] != "Complete"
                            or len(view["participating_nodes"]) != 3
                        ):
                            return False
                return True

            await rpc.wait_for(
                "every flood round Complete with 3 nodes everywhere", all_complete, 20
            )
            return [await rpc.round(n, f"flood_{ROUNDS - 1}") for n in (1, 2, 3)]

    async with (
        httpx.AsyncClient(transport=transport, timeout=10) as outsider,
        trio.open_nursery() as nursery,
    ):
        for _ in range(FLOOD_CONNECTIONS):
            nursery.start_soon(flood, outsider)
        views = await rounds()
        nursery.cancel_scope.cancel()  # 429s hold a connection off for Retry-After

    assert statuses[429] > 0 and set(statuses) <= {200, 429}, statuses
    digests = {view["result_digest"] for view in views if view}
    assert len(digests) == 1, views
    metrics = await cluster.metrics(1)
    assert (value(metrics, "anna_rate_limited_total") or 0) >= statuses[429]
    for peer in ("node_002", "node_003"):
        assert value(metrics, "anna_peer_up", peer=peer) == 1.0
    # Node 2's own requests to the flooded node were never refused: validators are exempt.
    # (With 3 validators node 2 may have had nothing to push to node 1, whose gossip it
    # answered: a reconcile makes it pull from node 1 now.)
    async with cluster.connect() as rpc:
        status, _ = await rpc.rpc(2, "POST", "/rpc/reconcile", {})
        assert status == 200
    node2 = await cluster.metrics(2)
    rejected = value(node2, "anna_peer_request_total", peer="node_001", status="rejected")
    assert not rejected, rejected
    succeeded = value(node2, "anna_peer_request_total", peer="node_001", status="success")
    assert succeeded is not None and succeeded > 0
