"""The three seed scenarios against a running testnet, and their report."""

from __future__ import annotations

import json
import time
from collections.abc import Awaitable, Callable
from typing import Any

import attrs
import trio

from .. import tls
from ..models import ClusterConfig
from ..sim import signed_observation
from ..transport.client import HttpClient, Response
from .layout import SCENARIO_TIMEOUT, Layout
from .processes import wait_ready


class ScenarioFailed(Exception):
    """An expectation of a scenario did not hold."""


class Cluster:
    """Talks to the three nodes: RPC over mTLS, metrics and failpoints over plain HTTP."""

    def __init__(self, layout: Layout) -> None:
        from ..config import load_cluster_config

        self.layout = layout
        self.directory = layout.directory
        config: ClusterConfig = load_cluster_config(
            layout.node_dir(1) / "peers.yml", node_id=None, check_tls_files=False
        )
        self._ssl = tls.client_context(config.tls) if config.tls.enabled else None
        self._endpoints = {ep.n: ep for ep in layout.endpoints}
        self._rpc = {
            ep.n: HttpClient(
                ep.host,
                ep.rpc_port,
                ssl_context=self._ssl,
                server_hostname=ep.host if self._ssl else None,
            )
            for ep in layout.endpoints
        }

    async def aclose(self) -> None:
        for client in self._rpc.values():
            await client.aclose()

    async def rpc(self, n: int, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        response = await self.exchange(n, method, path, body)
        return response.status, response.json()

    async def exchange(self, n: int, method: str, path: str, body: Any = None) -> Response:
        """One RPC request to node n, its whole answer (headers too)."""
        with trio.fail_after(10):
            return await self._rpc[n].request(method, path, json_body=body)

    async def plain(
        self, n: int, method: str, path: str, body: bytes | None = None
    ) -> tuple[int, bytes]:
        ep = self._endpoints[n]
        client = HttpClient(ep.host, ep.metrics_port)
        try:
            with trio.fail_after(10):
                response = await client.request(method, path, body=body)
        finally:
            await client.aclose()
        return response.status, response.body

    async def round(self, n: int, round_id: str) -> dict[str, Any] | None:
        status, data = await self.rpc(n, "GET", f"/rpc/status?round_id={round_id}")
        return data if status == 200 else None

    async def wait_for(
        self, what: str, check: Callable[[], Awaitable[bool]], within: float = SCENARIO_TIMEOUT
    ) -> None:
        with trio.move_on_after(within):
            while not await check():  # noqa: ASYNC110 - remote state: polling is the only way
                await trio.sleep(0.05)
            return
        raise ScenarioFailed(f"timed out after {within:.0f} s waiting for {what}")

    async def byzantine_ids(self, n: int) -> set[str]:
        _, data = await self.rpc(n, "GET", "/rpc/status")
        return {b["node_id"] for b in data["byzantine_nodes"]}


@attrs.define
class ScenarioResult:
    number: int
    name: str
    round_id: str
    passed: bool = False
    detail: str = ""
    consensus_tis: dict[str, float | None] = attrs.Factory(dict)


async def scenario_healthy(cluster: Cluster, round_id: str) -> str:
    byzantine_before = await cluster.byzantine_ids(1)
    expected = {ep.node_id for ep in cluster.layout.endpoints} - byzantine_before
    status, data = await cluster.rpc(1, "POST", "/rpc/round/start", {"round_id": round_id})
    if status != 202:
        raise ScenarioFailed(f"round start answered {status}: {data}")

    async def complete_everywhere() -> bool:
        views = [await cluster.round(ep.n, round_id) for ep in cluster.layout.endpoints]
        return all(
            v is not None
            and v["status"] == "Complete"
            and set(v["participating_nodes"]) == expected
            for v in views
        )

    await cluster.wait_for(
        f"{round_id} Complete with {sorted(expected)} on every node", complete_everywhere
    )
    return await _identical(cluster, round_id)


async def _identical(cluster: Cluster, round_id: str) -> str:
    views = [await cluster.round(ep.n, round_id) for ep in cluster.layout.endpoints]
    tis = {v["consensus_tis"] for v in views if v}
    digests = {v["result_digest"] for v in views if v}
    if len(tis) != 1 or len(digests) != 1:
        raise ScenarioFailed(f"results differ between nodes: tis {tis}, digests {digests}")
    return f"consensus_tis {tis.pop()} identical on all nodes"


async def scenario_slow_node(cluster: Cluster, round_id: str) -> str:
    delay_ms = int((cluster.layout.round_timeout + 2.0) * 1000)
    status, body = await cluster.plain(
        2, "PUT", "/debug/failpoints/observation.before_send", f"sleep({delay_ms})".encode()
    )
    if status != 200:
        raise ScenarioFailed(
            f"arming the failpoint on node 2 answered {status}: {body!r} (ANNA_FAILPOINTS_HTTP=1?)"
        )
    try:
        started = trio.current_time()
        await cluster.rpc(1, "POST", "/rpc/round/start", {"round_id": round_id})
        fast = {"node_001", "node_003"}

        async def complete_without_node2() -> bool:
            views = [await cluster.round(n, round_id) for n in (1, 3)]
            return all(v is not None and v["status"] == "Complete" for v in views)

        await cluster.wait_for(
            "the round to complete on nodes 1 and 3",
            complete_without_node2,
            cluster.layout.round_timeout + 1.5,
        )
        elapsed = trio.current_time() - started
        for n in (1, 3):
            view = await cluster.round(n, round_id)
            assert view is not None
            if set(view["participating_nodes"]) != fast:
                raise ScenarioFailed(
                    f"node {n} completed with {view['participating_nodes']}, expected nodes 1 and 3 only"
                )
        await trio.sleep(max(0.0, delay_ms / 1000 - elapsed) + 0.2)
    finally:
        await cluster.plain(2, "DELETE", "/debug/failpoints/observation.before_send")
    for ep in cluster.layout.endpoints:
        status, data = await cluster.rpc(ep.n, "POST", "/rpc/reconcile", {})
        if status != 200:
            raise ScenarioFailed(f"reconcile on node {ep.n} answered {status}: {data}")

    async def all_three_everywhere() -> bool:
        views = [await cluster.round(ep.n, round_id) for ep in cluster.layout.endpoints]
        return all(
            v is not None and v["status"] == "Complete" and len(v["participating_nodes"]) == 3
            for v in views
        )

    await cluster.wait_for(
        "all three observations everywhere after reconcile", all_three_everywhere, 10
    )
    return f"completed on time ({elapsed:.2f} s) with nodes 1 and 3; " + await _identical(
        cluster, round_id
    )


async def scenario_byzantine(cluster: Cluster, round_id: str) -> str:
    key_file = cluster.directory / "node3" / "keys" / "node_id.sec"
    first = signed_observation(key_file, "node_003", round_id, tis=0.85, audit_id=10**12)
    second = signed_observation(key_file, "node_003", round_id, tis=0.15, audit_id=10**12 + 1)
    answers: dict[int, tuple[int, Any]] = {}

    async def submit(n: int, obs: dict[str, Any]) -> None:
        answers[n] = await cluster.rpc(n, "POST", "/rpc/submit", {"observation": obs})

    async with trio.open_nursery() as nursery:
        nursery.start_soon(submit, 1, first)
        nursery.start_soon(submit, 2, second)
    for n, (status, data) in sorted(answers.items()):
        # 409: gossip already brought the other half and the node caught the conflict itself.
        if status not in (200, 409):
            raise ScenarioFailed(f"node {n} refused the crafted observation: {status} {data}")
    await cluster.rpc(1, "POST", "/rpc/round/start", {"round_id": round_id})

    async def flagged_everywhere() -> bool:
        for ep in cluster.layout.endpoints:
            _, data = await cluster.rpc(ep.n, "GET", "/rpc/status")
            records = [b for b in data["byzantine_nodes"] if b["node_id"] == "node_003"]
            if not records or len(records[0]["evidence"]) != 2:
                return False
            _, metrics = await cluster.plain(ep.n, "GET", "/metrics")
            if b"anna_byzantine_nodes_total 1.0" not in metrics:
                return False
        return True

    await cluster.wait_for("node_003 flagged with evidence on every node", flagged_everywhere)

    async def complete_with_1_and_2() -> bool:
        views = [await cluster.round(ep.n, round_id) for ep in cluster.layout.endpoints]
        return all(
            v is not None
            and v["status"] == "Complete"
            and set(v["participating_nodes"]) == {"node_001", "node_002"}
            for v in views
        )

    await cluster.wait_for(
        "the round to complete with nodes 1 and 2 everywhere", complete_with_1_and_2
    )
    return "node_003 Byzantine (ConflictingObservations) on all nodes; " + await _identical(
        cluster, round_id
    )


SCENARIOS: list[tuple[str, Callable[[Cluster, str], Awaitable[str]]]] = [
    ("healthy quorum", scenario_healthy),
    ("slow node", scenario_slow_node),
    ("byzantine detection", scenario_byzantine),
]


async def run_scenarios(layout: Layout) -> list[ScenarioResult]:
    """Run the three scenarios against a running testnet and collect artifacts, once every
    node answers /ready: run_rounds.sh may follow `docker-compose up -d` while the nodes
    still start (RuntimeError after READY_TIMEOUT)."""
    await wait_ready(layout)
    directory = layout.directory
    stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime())
    cluster = Cluster(layout)
    results = []
    try:
        for number, (name, scenario) in enumerate(SCENARIOS, start=1):
            result = ScenarioResult(number, name, f"tn{stamp}_{number}")
            try:
                result.detail = await scenario(cluster, result.round_id)
                result.passed = True
            except Exception as exc:  # the harness reports any failure as FAIL with its reason
                result.detail = _describe(exc)
            out = directory / f"round_{number}"
            out.mkdir(exist_ok=True)
            for ep in cluster.layout.endpoints:
                try:
                    _, status = await cluster.rpc(ep.n, "GET", "/rpc/status")
                    detail = await cluster.round(ep.n, result.round_id)
                except (OSError, trio.TooSlowError) as exc:
                    status, detail = {"error": str(exc)}, None
                (out / f"node_{ep.n}.json").write_text(json.dumps(status, indent=2, sort_keys=True))
                (out / f"node_{ep.n}_round.json").write_text(
                    json.dumps(detail, indent=2, sort_keys=True)
                )
                result.consensus_tis[ep.node_id] = detail["consensus_tis"] if detail else None
            results.append(result)
        for ep in cluster.layout.endpoints:
            try:
                _, metrics = await cluster.plain(ep.n, "GET", "/metrics")
            except OSError as exc:
                metrics = f"# unreachable: {exc}\n".encode()
            (directory / f"node_{ep.n}_metrics.txt").write_bytes(metrics)
    finally:
        await cluster.aclose()
    summary = {
        "passed": all(r.passed for r in results),
        "scenarios": [attrs.asdict(r) for r in results],
    }
    (directory / "summary.json").write_text(json.dumps(summary, indent=2, sort_keys=True))
    return results


def _describe(exc: BaseException) -> str:
    if isinstance(exc, BaseExceptionGroup):
        return "; ".join(_describe(inner) for inner in exc.exceptions)
    return f"{type(exc).__name__}: {exc}"


def summary_table(results: list[ScenarioResult]) -> str:
    rows = [f"{'#':<2} {'SCENARIO':<22} {'RESULT':<6} DETAIL"]
    for r in results:
        rows.append(f"{r.number:<2} {r.name:<22} {'PASS' if r.passed else 'FAIL':<6} {r.detail}")
    passed = sum(r.passed for r in results)
    rows.append(f"{passed} passed, {len(results) - passed} failed")
    return "\n".join(rows)
