"""The RPC routes in front of a real Node (rpc/server.py): node-to-node endpoints answer
validators only — by client certificate CN with TLS, by source address without —
everyone keeps the public endpoints, and HEAD is answered wherever GET is."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path

import attrs
import pytest
import trio
import trio.testing

from anna_trio.coordinator import interval_round_id
from anna_trio.models import Limits, TlsConfig
from anna_trio.policy import clock_round_id
from anna_trio.rpc.server import VALIDATORS_ONLY, RpcServer
from anna_trio.transport.server import Request, Response
from test_node import RETAIN, FakeClock, complete, started

VALIDATOR_ADDRESS = "127.0.0.1"
PUBLIC = {
    ("GET", "/health"),
    ("GET", "/rpc/status"),
    ("POST", "/rpc/submit"),
    ("POST", "/rpc/round/start"),
    ("POST", "/rpc/reconcile"),
}
NODE_TO_NODE = {("POST", path) for path in VALIDATORS_ONLY}


async def _no_reconcile() -> int:
    return 0


@pytest.fixture
async def server(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> AsyncIterator[RpcServer]:
    async with started(tmp_path, "node_002", "node_003") as node:
        rpc = RpcServer(node, node.metrics, reconcile=_no_reconcile)
        rpc.set_limits(Limits(), frozenset({VALIDATOR_ADDRESS}))
        yield rpc


def with_tls(rpc: RpcServer) -> None:
    rpc.node.apply_config(attrs.evolve(rpc.node.config, tls=TlsConfig(enabled=True)))


async def call(
    rpc: RpcServer,
    method: str,
    path: str,
    *,
    client: str,
    peer_name: str | None = None,
    body: bytes | None = None,
) -> Response:
    if body is None:
        body = b'{"summary": {}}' if path == "/rpc/sync" else b"{}"
    return await rpc.handle(Request(method, path, {}, {}, body, client, peer_name))


def is_forbidden(response: Response) -> bool:
    if response.status != 403:
        return False
    body = json.loads(response.body)
    assert body["success"] is False and body["error"] == "forbidden", body
    return True


async def test_without_tls_the_source_address_decides(server: RpcServer) -> None:
    for method, path in NODE_TO_NODE:
        assert is_forbidden(await call(server, method, path, client="127.0.0.2"))
        assert (await call(server, method, path, client=VALIDATOR_ADDRESS)).status == 200
    for method, path in PUBLIC:
        assert not is_forbidden(await call(server, method, path, client="127.0.0.2"))


async def test_with_tls_the_certificate_cn_decides_not_the_address(server: RpcServer) -> None:
    with_tls(server)
    for method, path in NODE_TO_NODE:
        for client, name in ((VALIDATOR_ADDRESS, "outsider"), (VALIDATOR_ADDRESS, None)):
            assert is_forbidden(await call(server, method, path, client=client, peer_name=name))
        answered = await call(server, method, path, client="127.0.0.9", peer_name="node_003")
        assert answered.status == 200
    for method, path in PUBLIC:
        answer = await call(server, method, path, client="127.0.0.2", peer_name="outsider")
        assert not is_forbidden(answer)


async def test_the_transport_trusts_the_same_validators(server: RpcServer) -> None:
    assert server.trusted_address(VALIDATOR_ADDRESS) and not server.trusted_address("127.0.0.2")
    assert server.trusted_name("node_002") and not server.trusted_name("outsider")


@pytest.mark.parametrize("path", ["/health", "/rpc/status"])
async def test_head_is_answered_wherever_get_is(server: RpcServer, path: str) -> None:
    get = await call(server, "GET", path, client="127.0.0.2")
    head = await call(server, "HEAD", path, client="127.0.0.2")
    assert head.status == get.status == 200
    assert head.headers == get.headers and head.content_type == get.content_type


@pytest.mark.parametrize(
    ("method", "path", "allowed"),
    [
        ("HEAD", "/rpc/submit", "POST"),
        ("GET", "/rpc/gossip", "POST"),
        ("POST", "/health", "GET, HEAD"),
        ("DELETE", "/rpc/status", "GET, HEAD"),
    ],
)
async def test_a_method_not_allowed_says_which_are(
    server: RpcServer, method: str, path: str, allowed: str
) -> None:
    answer = await call(server, method, path, client=VALIDATOR_ADDRESS)
    assert answer.status == 405
    assert dict(answer.headers)["allow"] == allowed


async def test_outsiders_cannot_name_rounds_that_push_out_the_cluster_s_own(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    """The round flood of the serving-under-attack issue, through the round start: a node
    keeps the rounds whose ids sort last, so rounds an outsider named `zzzz_…` would fill
    what it keeps and then refuse every interval round after them (409), restarts
    included. Outsiders may name only ids that sort no later than a fresh one; their
    rounds still start, validators may name any, and the interval rounds go on."""
    clock = FakeClock()

    async def start(rpc: RpcServer, round_id: str, client: str) -> Response:
        body = json.dumps({"round_id": round_id}).encode()
        return await call(rpc, "POST", "/rpc/round/start", client=client, body=body)

    async with started(tmp_path, clock=clock) as node:
        rpc = RpcServer(node, node.metrics, reconcile=_no_reconcile)
        rpc.set_limits(Limits(), frozenset({VALIDATOR_ADDRESS}))
        for i in range(2 * RETAIN):
            refused = await start(rpc, f"zzzz_{i:04}", "127.0.0.2")
            assert refused.status == 403, refused.body
            assert json.loads(refused.body)["error"] == "round_id_after_now"
        assert node.engine.round_ids() == []
        for _ in range(2 * RETAIN):
            clock.now += 0.001
            named = clock_round_id(clock.now)
            assert (await start(rpc, named, "127.0.0.2")).status == 202
            assert (await start(rpc, named, "127.0.0.2")).status == 202  # known: idempotent
        assert (await start(rpc, "zzzz_validator", VALIDATOR_ADDRESS)).status == 202
        clock.now += 1
        await complete(node, interval_round_id(clock.now, 1))
    clock.now += 1
    async with started(tmp_path, clock=clock) as node:
        await complete(node, interval_round_id(clock.now, 1))


async def test_reconciles_asked_for_together_share_one_pass(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    """/rpc/reconcile is open to any client; each pass opens a connection to every
    peer, so requests that arrive while one runs wait for it instead of starting more."""
    passes = 0
    release = trio.Event()

    async def slow_reconcile() -> int:
        nonlocal passes
        passes += 1
        await release.wait()
        return 0

    async with started(tmp_path) as node:
        rpc = RpcServer(node, node.metrics, reconcile=slow_reconcile)
        rpc.set_limits(Limits(), frozenset({VALIDATOR_ADDRESS}))
        answers: list[Response] = []

        async def ask(client: str) -> None:
            answers.append(await call(rpc, "POST", "/rpc/reconcile", client=client))

        async with trio.open_nursery() as nursery:
            for i in range(10):
                nursery.start_soon(ask, f"127.0.0.{i + 2}")
            await trio.testing.wait_all_tasks_blocked()
            release.set()
        assert passes == 1 and [a.status for a in answers] == [200] * 10
        await call(rpc, "POST", "/rpc/reconcile", client="127.0.0.2")
        assert passes == 2
