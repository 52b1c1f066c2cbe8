"""Admission control under saturating load (issue 16): eight clients, eight requests in
flight each, start rounds as fast as they can for 10 s on a 3-node mTLS cluster. A node that cannot finish more rounds in
time answers 503 with Retry-After; every round it answered 202 ends Complete on every
node (before, about 4 % of them never did)."""

from __future__ import annotations

import itertools
from collections import Counter
from collections.abc import Callable

import pytest
import trio

from _launch import LiveCluster, poll, value

pytestmark = pytest.mark.integration

CLIENTS = 8
IN_FLIGHT = 8  # requests each client keeps in flight, each on a connection of its own
SECONDS = 10.0
ROUND_TIMEOUT = 2.0


@pytest.fixture
def cluster(cluster_factory: Callable[..., LiveCluster]) -> LiveCluster:
    return cluster_factory(round_timeout=ROUND_TIMEOUT)


async def test_every_round_answered_202_ends_complete_under_saturating_load(
    cluster: LiveCluster,
) -> None:
    accepted: dict[str, int] = {}  # round id -> the node that answered 202
    statuses: Counter[int] = Counter()
    retry_after_missing = 0
    numbers = itertools.count()

    async def client(which: int) -> None:
        nonlocal retry_after_missing
        node = which % 3 + 1
        async with cluster.connect() as rpc:
            stop = trio.current_time() + SECONDS
            while trio.current_time() < stop:  # no request is cut off: each gets its answer
                round_id = f"load_{next(numbers):06d}"
                response = await rpc.exchange(
                    node, "POST", "/rpc/round/start", {"round_id": round_id}
                )
                statuses[response.status] += 1
                if response.status == 202:
                    accepted[round_id] = node
                elif response.status == 503:
                    retry_after_missing += "retry-after" not in response.headers
                    await trio.sleep(float(response.headers.get("retry-after", "1")) / 10)
                else:
                    raise AssertionError((response.status, response.body[:200]))

    async with trio.open_nursery() as nursery:
        for which in range(CLIENTS * IN_FLIGHT):
            nursery.start_soon(client, which)
    assert accepted, statuses
    assert statuses[503] > 0, f"the load never saturated a node, so nothing was shown: {statuses}"
    assert retry_after_missing == 0

    async with cluster.connect() as rpc:

        async def settled() -> bool:
            for n in (1, 2, 3):
                _, body = await rpc.rpc(n, "GET", "/rpc/status")
                if any(r["status"] == "Pending" for r in body["rounds"]):
                    return False
            return True

        await poll("no round Pending any more", settled, 4 * ROUND_TIMEOUT + 10)
        unfinished = []
        for round_id in sorted(accepted)[-100:]:  # the last ones, still in /rpc/status
            for n in (1, 2, 3):
                view = await rpc.round(n, round_id)
                if view is None or view["status"] != "Complete":
                    unfinished.append((round_id, accepted[round_id], n, view and view["status"]))
    assert unfinished == [], (len(unfinished), len(accepted), statuses, unfinished[:10])
    for n in (1, 2, 3):  # and every one of them, counted where each node keeps count
        samples = await cluster.metrics(n)
        assert value(samples, "anna_rounds_failed_total") == 0, n
        assert value(samples, "anna_consensus_rounds_total") == len(accepted), (n, statuses)
    refused = [value(await cluster.metrics(n), "anna_rounds_refused_total") for n in (1, 2, 3)]
    assert sum(r or 0 for r in refused) == statuses[503]
