"""Idempotency-Key as the IETF draft and Stripe do it: only executed requests keep an
answer, a reused key with another body is refused, keys expire and the table is bounded."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import attrs
import pytest
import trio
import trio.testing

from anna_trio.models import Limits
from anna_trio.rpc.server import RpcServer
from anna_trio.transport.server import Request
from strategies import signed_observation
from test_node import FakeClock, make_node

PEERS = ("node_002", "node_003")


@attrs.define
class Served:
    server: RpcServer
    clock: FakeClock

    async def post(self, path: str, body: Any, key: str) -> tuple[int, dict[str, Any]]:
        raw = body if isinstance(body, bytes) else json.dumps(body).encode()
        request = Request("POST", path, {}, {"idempotency-key": key}, raw, "127.0.0.1")
        response = await self.server.handle(request)
        return response.status, json.loads(response.body)

    def kept(self) -> int:
        return self.server.node.store.idempotency_keys()


@pytest.fixture
async def served(tmp_path: Path, autojump_clock: trio.testing.MockClock) -> AsyncIterator[Served]:
    clock = FakeClock()
    node = make_node(tmp_path, *PEERS, clock=clock)
    node.restore()
    server = RpcServer(node, node.metrics, reconcile=_no_reconcile)
    server.set_limits(Limits(idempotency_ttl=60.0, idempotency_keys=5), frozenset({"127.0.0.1"}))
    async with trio.open_nursery() as nursery:
        await nursery.start(node.store.run)
        await nursery.start(node.run)
        yield Served(server, clock)
        nursery.cancel_scope.cancel()
    node.store.close()


def submit_body(peer: str, round_id: str) -> dict[str, Any]:
    return {"observation": signed_observation(peer, round_id).to_dict()}


async def test_a_refused_request_keeps_nothing_so_the_key_can_be_retried(served: Served) -> None:
    """A 422 (bad body) is not kept: the same key then works with the fixed body."""
    assert (await served.post("/rpc/round/start", {"window_hours": 0}, "k"))[0] == 422
    broken = submit_body("node_002", "r1")
    broken["observation"]["signature"] = "00" * 64
    assert (await served.post("/rpc/submit", broken, "k"))[0] == 422
    assert served.kept() == 0
    status, answer = await served.post("/rpc/round/start", {"round_id": "r1"}, "k")
    assert (status, answer["round_id"]) == (202, "r1")
    assert (await served.post("/rpc/submit", submit_body("node_002", "r1"), "k"))[0] == 200
    assert served.kept() == 2  # one per route


async def test_a_repeat_gets_the_first_answer_and_another_body_is_refused(
    served: Served,
) -> None:
    first = await served.post("/rpc/submit", submit_body("node_002", "r1"), "same")
    assert first == (200, {"success": True, "message": "Observation accepted", "duplicate": False})
    assert await served.post("/rpc/submit", submit_body("node_002", "r1"), "same") == first
    status, answer = await served.post("/rpc/submit", submit_body("node_003", "r1"), "same")
    assert (status, answer["error"]) == (422, "idempotency_key_reused")


async def test_keys_expire_after_the_ttl(served: Served) -> None:
    started = await served.post("/rpc/round/start", {}, "fresh")
    assert await served.post("/rpc/round/start", {}, "fresh") == started
    served.clock.now += 61  # idempotency_ttl is 60 s here
    again = await served.post("/rpc/round/start", {}, "fresh")
    assert again[0] == 202 and again[1]["round_id"] != started[1]["round_id"]


async def test_the_table_keeps_at_most_idempotency_keys_answers(served: Served) -> None:
    """A flood of unique keys on valid requests keeps the newest 5; on refusals, none."""
    for n in range(40):
        served.clock.now += 0.001
        assert (await served.post("/rpc/round/start", {"round_id": f"r{n:02d}"}, f"k{n}"))[0] == 202
        assert served.kept() <= 5
        await served.post("/rpc/submit", submit_body("node_002", f"r{n:02d}"), f"s{n}")  # quorum
    for n in range(300):
        assert (await served.post("/rpc/round/start", {"round_id": "!"}, f"bad{n}"))[0] == 422
    assert served.kept() == 5
    assert (await served.post("/rpc/round/start", {"round_id": "r39"}, "k39"))[1][
        "round_id"
    ] == "r39"


async def _no_reconcile() -> int:
    return 0
