"""Admission control on one node (autojump clock): round starts are refused with 503 and
Retry-After while rounds short of a quorum pile up, and taken again once they are not."""

from __future__ import annotations

import json
from pathlib import Path

import trio
import trio.testing

from anna_trio.models import Limits
from anna_trio.policy import ADMISSION_AGE_FRACTION
from anna_trio.rpc.server import RpcServer
from anna_trio.transport.server import Request
from strategies import signed_observation
from test_node import make_node, observations_of

TIMEOUT = 1.0  # make_node's round timeout


async def test_starts_wait_while_rounds_short_of_quorum_pile_up(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    node = make_node(tmp_path, "node_002", "node_003")  # peers that never answer
    node.restore()
    server = RpcServer(node, node.metrics, reconcile=_no_reconcile)
    server.set_limits(Limits(pending_rounds=3), frozenset({"127.0.0.1"}))

    async def start(round_id: str) -> tuple[int, dict[str, str]]:
        body = json.dumps({"round_id": round_id}).encode()
        response = await server.handle(
            Request("POST", "/rpc/round/start", {}, {}, body, "127.0.0.1")
        )
        return response.status, dict(response.headers)

    async with trio.open_nursery() as nursery:
        await nursery.start(node.store.run)
        await nursery.start(node.run)
        assert [(await start(f"r{n}"))[0] for n in range(4)] == [202, 202, 202, 503]
        status, headers = await start("r9")
        assert status == 503 and headers["retry-after"] == "1"
        assert (await start("r1"))[0] == 202  # a round it knows costs nothing: still 202
        assert node.metrics.rounds_refused._value.get() == 2
        for n in range(3):  # node_002 answers: each round holds a quorum (2 of 3)
            await node.ingest(observations_of(signed_observation("node_002", f"r{n}")))
        assert (await start("r4"))[0] == 202
        await trio.sleep(ADMISSION_AGE_FRACTION * TIMEOUT + 0.01)  # r4 short of quorum too long
        assert (await start("r5"))[0] == 503
        nursery.cancel_scope.cancel()
    node.store.close()


async def _no_reconcile() -> int:
    return 0
