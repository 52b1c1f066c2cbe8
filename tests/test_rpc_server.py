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

from anna_trio.models import Limits, TlsConfig
from anna_trio.rpc.server import VALIDATORS_ONLY, RpcServer
from anna_trio.transport.server import Request, Response
from test_node import started

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
    rpc: RpcServer, method: str, path: str, *, client: str, peer_name: str | None = None
) -> Response:
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
