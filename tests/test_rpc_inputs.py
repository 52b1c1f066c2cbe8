"""Bad input against a live node's RPC listener (SPEC §7): the right 4xx, the error
shape, never a 500, and nothing changes; duplicates, conflicts, idempotency keys and
the per-client rate limit.

The cluster has four validators but runs only nodes 1-3: node_004's key signs crafted
observations that no running node contradicts (a real node's key would also sign its own
observation for the round, and the two would conflict).
"""

from __future__ import annotations

import contextlib
import json
import ssl
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from typing import Any

import httpx
import pytest
import trio

from _launch import LiveCluster, value
from anna_trio import tls
from anna_trio.config import load_cluster_config
from anna_trio.sim import signed_observation

pytestmark = pytest.mark.integration

OUTSIDER = "node_004"
RATE_LIMITED_SOURCE = "127.0.0.5"
LIMITS = "limits:\n  rate_per_client: 5\n  burst: 5\n"
RESULTS = ("accepted", "duplicate", "invalid", "bad_signature", "unknown_node", "conflict")
ACCEPTED = {"success": True, "message": "Observation accepted", "duplicate": False}
DUPLICATE = {"success": True, "message": "Observation accepted", "duplicate": True}


@pytest.fixture(scope="module")
def cluster(module_cluster_factory: Callable[..., LiveCluster]) -> LiveCluster:
    """Nodes 1-3 of four validators, mTLS, 5 requests/s (burst 5) for non-validators."""
    return module_cluster_factory(nodes=4, running=(1, 2, 3), round_timeout=1.0, peers_extra=LIMITS)


def client_ssl(cluster: LiveCluster) -> ssl.SSLContext:
    config = load_cluster_config(
        cluster.layout.node_dir(1) / "peers.yml", node_id=None, check_tls_files=False
    )
    return tls.client_context(config.tls)


@pytest.fixture
async def rpc(cluster: LiveCluster) -> AsyncIterator[httpx.AsyncClient]:
    """An httpx client for node 1's RPC listener, from 127.0.0.1 (a validator address)."""
    async with httpx.AsyncClient(
        base_url=f"https://127.0.0.1:{cluster.endpoint(1).rpc_port}",
        verify=client_ssl(cluster),
        timeout=10,
    ) as client:
        yield client


class Crafter:
    """Fresh round ids and audit ids per test, so tests do not depend on each other."""

    counter = 0

    def __init__(self, cluster: LiveCluster) -> None:
        self._key = cluster.layout.node_dir(4) / "keys" / "node_id.sec"

    def round_id(self, prefix: str) -> str:
        Crafter.counter += 1
        return f"{prefix}_{Crafter.counter:03d}"

    def observation(self, round_id: str, *, tis: float = 0.8, node_id: str = OUTSIDER) -> Any:
        Crafter.counter += 1
        return signed_observation(
            self._key, node_id, round_id, tis=tis, audit_id=10**12 + Crafter.counter
        )


@pytest.fixture
def crafted(cluster: LiveCluster) -> Crafter:
    return Crafter(cluster)


def assert_error(response: httpx.Response, status: int) -> dict[str, Any]:
    """The SPEC error shape with the expected status."""
    assert response.status_code == status, (response.status_code, response.text)
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert set(body) == {"success", "error", "message"}, body
    assert body["success"] is False
    assert isinstance(body["error"], str) and body["error"]
    assert isinstance(body["message"], str) and body["message"]
    return dict(body)


async def snapshot(cluster: LiveCluster, rpc: httpx.AsyncClient) -> tuple[Any, dict[str, float]]:
    """Node 1's rounds and Byzantine list once nothing is pending, and its counters."""
    settled = None
    with trio.fail_after(15):
        while settled is None:
            status = (await rpc.get("/rpc/status")).json()
            if all(r["status"] != "Pending" for r in status["rounds"]):
                settled = (status["rounds"], status["byzantine_nodes"])
            else:
                await trio.sleep(0.05)
    metrics = await cluster.metrics(1)
    counters = {
        result: value(metrics, "anna_observations_received_total", result=result) or 0.0
        for result in RESULTS
    }
    counters["rounds"] = value(metrics, "anna_consensus_rounds_total") or 0.0
    return settled, counters


async def assert_unchanged(
    cluster: LiveCluster,
    rpc: httpx.AsyncClient,
    before: tuple[Any, dict[str, float]],
    counted: str | None = None,
    times: int = 1,
) -> None:
    """Rounds and Byzantine list as before; only `counted` went up, by `times`."""
    state, counters = await snapshot(cluster, rpc)
    assert state == before[0]
    expected = dict(before[1])
    if counted is not None:
        expected[counted] += times
    assert counters == expected


# --- /rpc/submit ------------------------------------------------------------------------


def _without(obs: dict[str, Any], field: str) -> dict[str, Any]:
    return {k: v for k, v in obs.items() if k != field}


def _tampered_signature(obs: dict[str, Any]) -> dict[str, Any]:
    flipped = "0" if obs["signature"][0] != "0" else "1"
    return {**obs, "signature": flipped + obs["signature"][1:]}


SCHEMA_VIOLATIONS: list[tuple[str, Callable[[dict[str, Any]], Any]]] = [
    ("tis out of range", lambda o: {**o, "tis_overall": 1.5}),
    ("tis NaN", lambda o: {**o, "tis_overall": float("nan")}),
    ("tis Infinity", lambda o: {**o, "tis_overall": float("inf")}),
    (
        "negative component",
        lambda o: {**o, "tis_components": {**o["tis_components"], "coherence_stability": -0.1}},
    ),
    ("audit_id as string", lambda o: {**o, "audit_id": str(o["audit_id"])}),
    ("audit_id as bool", lambda o: {**o, "audit_id": True}),
    ("audit_id zero", lambda o: {**o, "audit_id": 0}),
    ("audit_id beyond 64 bits", lambda o: {**o, "audit_id": 2**64}),
    ("window_hours too big", lambda o: {**o, "window_hours": 8761}),
    ("tis_components a list", lambda o: {**o, "tis_components": [0.8, 0.8, 0.8]}),
    ("bias_flags a string", lambda o: {**o, "bias_flags": "RecencyBias"}),
    ("duplicate bias flags", lambda o: {**o, "bias_flags": ["Recency", "Recency"]}),
    ("bad round_id", lambda o: {**o, "round_id": "no spaces allowed"}),
    ("bad timestamp", lambda o: {**o, "timestamp": "yesterday"}),
    ("bad hash", lambda o: {**o, "forecast_hash": "md5:abc"}),
    ("missing timestamp", lambda o: _without(o, "timestamp")),
    ("missing signature", lambda o: _without(o, "signature")),
    ("unknown field", lambda o: {**o, "extra": 1}),
    ("observation not an object", lambda o: [o]),
]


@pytest.mark.parametrize(
    ("case", "mutate"), SCHEMA_VIOLATIONS, ids=[c for c, _ in SCHEMA_VIOLATIONS]
)
async def test_schema_violation_is_422_and_changes_nothing(
    cluster: LiveCluster,
    rpc: httpx.AsyncClient,
    crafted: Crafter,
    case: str,
    mutate: Callable[[dict[str, Any]], Any],
) -> None:
    """An observation breaking SPEC §3 gets 422 and is only counted as invalid."""
    obs = crafted.observation(crafted.round_id("schema"))
    before = await snapshot(cluster, rpc)
    body = json.dumps({"observation": mutate(obs)}).encode()  # NaN/Infinity literals too
    response = await rpc.post(
        "/rpc/submit", content=body, headers={"content-type": "application/json"}
    )
    assert_error(response, 422)
    await assert_unchanged(cluster, rpc, before, "invalid")


@pytest.mark.parametrize(
    ("case", "body", "status"),
    [
        ("malformed JSON", b'{"observation": ', 400),
        ("empty body", b"", 400),
        ("not UTF-8", b'{"observation": "\xff\xfe"}', 400),
        ("JSON array", b"[]", 422),
        ("wrong top-level key", b'{"obs": {}}', 422),
        ("extra top-level key", b'{"observation": {}, "more": 1}', 422),
        ("over 64 KiB", b'{"observation": "' + b"x" * 70_000 + b'"}', 413),
    ],
)
async def test_bad_request_body_gets_its_status_and_changes_nothing(
    cluster: LiveCluster, rpc: httpx.AsyncClient, case: str, body: bytes, status: int
) -> None:
    """Malformed JSON 400, wrong envelope 422, body over 64 KiB 413; never a 500."""
    before = await snapshot(cluster, rpc)
    response = await rpc.post(
        "/rpc/submit", content=body, headers={"content-type": "application/json"}
    )
    assert_error(response, status)
    if status == 413:
        assert response.headers.get("connection") == "close"
    await assert_unchanged(cluster, rpc, before, "invalid" if status == 422 else None)


async def test_oversized_chunked_body_is_413(cluster: LiveCluster, rpc: httpx.AsyncClient) -> None:
    """A body over 64 KiB without Content-Length (chunked) is refused with 413 too."""

    async def chunks() -> AsyncGenerator[bytes]:
        yield b'{"observation": "'
        for _ in range(20):
            yield b"x" * 4096
        yield b'"}'

    before = await snapshot(cluster, rpc)
    async with contextlib.aclosing(chunks()) as body:
        response = await rpc.post(
            "/rpc/submit", content=body, headers={"content-type": "application/json"}
        )
    assert "content-length" not in response.request.headers
    assert_error(response, 413)
    assert response.headers.get("connection") == "close"
    await assert_unchanged(cluster, rpc, before)


async def test_connection_after_413_is_closed_not_reused(rpc: httpx.AsyncClient) -> None:
    """A 413 answered before the body was read says `Connection: close`, so a keep-alive
    client never sends its next request into a connection the server is dropping."""
    body = b'{"observation": "' + b"x" * 70_000 + b'"}'
    for _ in range(20):
        response = await rpc.post("/rpc/submit", content=body)
        assert_error(response, 413)
        assert response.headers.get("connection") == "close"
        assert (await rpc.get("/health")).status_code == 200


async def test_unknown_node_is_403(
    cluster: LiveCluster, rpc: httpx.AsyncClient, crafted: Crafter
) -> None:
    """A well-formed observation from a node outside peers.yml gets 403."""
    obs = crafted.observation(crafted.round_id("unknown"), node_id="node_999")
    before = await snapshot(cluster, rpc)
    assert_error(await rpc.post("/rpc/submit", json={"observation": obs}), 403)
    await assert_unchanged(cluster, rpc, before, "unknown_node")


async def test_forged_signature_is_422_and_never_marks_the_claimed_node(
    cluster: LiveCluster, rpc: httpx.AsyncClient
) -> None:
    """A real node's observation with other values but its old signature gets 422; the
    claimed node is not marked Byzantine and the round keeps the genuine observation."""
    round_id = "forged_round"
    assert (await rpc.post("/rpc/round/start", json={"round_id": round_id})).status_code == 202
    genuine = None
    with trio.fail_after(10):
        while genuine is None:
            view = (await rpc.get("/rpc/status", params={"round_id": round_id})).json()
            held = [o for o in view["observations"] if o["node_id"] == "node_002"]
            genuine = held[0] if held else None
            await trio.sleep(0.05)
    before = await snapshot(cluster, rpc)
    for forged in (
        {**genuine, "tis_overall": 0.01},
        _tampered_signature(genuine),
        {**genuine, "signature": "ab" * 64},
    ):
        body = assert_error(await rpc.post("/rpc/submit", json={"observation": forged}), 422)
        assert body["error"] == "bad_signature"
    await assert_unchanged(cluster, rpc, before, "bad_signature", times=3)
    view = (await rpc.get("/rpc/status", params={"round_id": round_id})).json()
    assert [o for o in view["observations"] if o["node_id"] == "node_002"] == [genuine]


async def test_identical_observation_twice_is_a_duplicate(
    cluster: LiveCluster, rpc: httpx.AsyncClient, crafted: Crafter
) -> None:
    """The identical observation again is 200 with duplicate true, stored once."""
    round_id = crafted.round_id("dup")
    obs = crafted.observation(round_id)
    first = await rpc.post("/rpc/submit", json={"observation": obs})
    assert (first.status_code, first.json()) == (200, ACCEPTED)
    again = await rpc.post("/rpc/submit", json={"observation": obs})
    assert (again.status_code, again.json()) == (200, DUPLICATE)
    view = (await rpc.get("/rpc/status", params={"round_id": round_id})).json()
    assert [o for o in view["observations"] if o["node_id"] == OUTSIDER] == [obs]


async def test_second_different_observation_is_409_byzantine(
    cluster: LiveCluster, rpc: httpx.AsyncClient, crafted: Crafter
) -> None:
    """A second, different observation from one node for one round is 409 and marks it."""
    round_id = crafted.round_id("conflict")
    first = await rpc.post(
        "/rpc/submit", json={"observation": crafted.observation(round_id, tis=0.9)}
    )
    assert (first.status_code, first.json()) == (200, ACCEPTED)
    second = await rpc.post(
        "/rpc/submit", json={"observation": crafted.observation(round_id, tis=0.1)}
    )
    body = assert_error(second, 409)
    assert body["message"] == "Observation rejected (Byzantine detected)"
    status = (await rpc.get("/rpc/status")).json()
    [record] = [b for b in status["byzantine_nodes"] if b["node_id"] == OUTSIDER]
    assert record["reason"] == "ConflictingObservations" and len(record["evidence"]) == 2


async def test_repeated_idempotency_key_gets_the_original_answer(
    cluster: LiveCluster, rpc: httpx.AsyncClient, crafted: Crafter
) -> None:
    """Every repeat of an Idempotency-Key gets the first answer, status and body alike;
    the key with another body is refused (and that body is not acted on)."""
    round_id = crafted.round_id("idem")
    obs = crafted.observation(round_id)
    headers = {"Idempotency-Key": f"key-{round_id}"}
    answers = [
        await rpc.post("/rpc/submit", json={"observation": obs}, headers=headers) for _ in range(3)
    ]
    assert [(a.status_code, a.json()) for a in answers] == [(200, ACCEPTED)] * 3
    assert len({a.content for a in answers}) == 1
    other = crafted.observation(round_id, tis=0.1)
    reused = await rpc.post("/rpc/submit", json={"observation": other}, headers=headers)
    assert assert_error(reused, 422)["error"] == "idempotency_key_reused"  # nothing was done
    plain = await rpc.post("/rpc/submit", json={"observation": obs})
    assert (plain.status_code, plain.json()) == (200, DUPLICATE)


# --- status and round start ---------------------------------------------------------------


async def test_unknown_round_is_404(rpc: httpx.AsyncClient) -> None:
    """GET /rpc/status for a round this node does not know is 404 with the error shape."""
    for round_id in ("never_started", "", "x" * 300):
        assert_error(await rpc.get("/rpc/status", params={"round_id": round_id}), 404)


@pytest.mark.parametrize(
    ("body", "status"),
    [
        ({"round_id": "has space"}, 422),
        ({"round_id": "r" * 65}, 422),
        ({"round_id": 7}, 422),
        ({"round_id": "ok_id", "window_hours": 0}, 422),
        ({"round_id": "ok_id", "window_hours": "24"}, 422),
        ({"round_id": "ok_id", "surprise": True}, 422),
        (["ok_id"], 422),
        (b"{not json", 400),
    ],
)
async def test_bad_round_start_is_refused_and_starts_nothing(
    cluster: LiveCluster, rpc: httpx.AsyncClient, body: Any, status: int
) -> None:
    """POST /rpc/round/start with a bad round_id, window or body starts no round."""
    before = await snapshot(cluster, rpc)
    if isinstance(body, bytes):
        response = await rpc.post("/rpc/round/start", content=body)
    else:
        response = await rpc.post("/rpc/round/start", json=body)
    assert_error(response, status)
    await assert_unchanged(cluster, rpc, before)
    assert (await rpc.get("/rpc/status", params={"round_id": "ok_id"})).status_code == 404


async def test_unknown_path_and_method_get_json_errors(rpc: httpx.AsyncClient) -> None:
    """Routing errors keep the error shape: unknown path 404, wrong method 405."""
    assert_error(await rpc.get("/rpc/nothing-here"), 404)
    assert_error(await rpc.get("/rpc/submit"), 405)
    assert_error(await rpc.put("/rpc/round/start", json={}), 405)


# --- rate limit ---------------------------------------------------------------------------


async def test_rate_limit_applies_to_clients_but_never_to_validators(
    cluster: LiveCluster, rpc: httpx.AsyncClient
) -> None:
    """A non-validator address past its burst gets 429 with Retry-After; validator
    addresses (127.0.0.1) are never limited."""
    transport = httpx.AsyncHTTPTransport(
        local_address=RATE_LIMITED_SOURCE, verify=client_ssl(cluster)
    )
    before = value(await cluster.metrics(1), "anna_rate_limited_total")
    async with httpx.AsyncClient(
        base_url=str(rpc.base_url), transport=transport, timeout=10
    ) as outsider:
        started = trio.current_time()
        answers = [await outsider.get("/health") for _ in range(20)]
        elapsed = trio.current_time() - started
    statuses = [a.status_code for a in answers]
    assert statuses[:5] == [200] * 5, statuses
    assert set(statuses) == {200, 429}, statuses
    # The burst, plus what 5 tokens/s refilled while the requests were being sent.
    assert statuses.count(200) <= 5 + 5 * elapsed + 1, (statuses, elapsed)
    limited = [a for a in answers if a.status_code == 429]
    for answer in limited:
        assert_error(answer, 429)
        assert int(answer.headers["retry-after"]) >= 1
    after = value(await cluster.metrics(1), "anna_rate_limited_total")
    assert after is not None and before is not None
    assert after - before == len(limited)

    validator = [(await rpc.get("/health")).status_code for _ in range(40)]
    assert validator == [200] * 40
    assert json.loads((await rpc.get("/health")).content)["status"] == "ok"
