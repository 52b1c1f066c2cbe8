"""Hostile input against one live annad (SPEC §7, issue 7): hypothesis-generated and
mutated bodies, headers, queries, paths, methods and raw malformed HTTP.

Whatever arrives, the node answers (4xx, or closes the connection), never 500, stays
up, and a rejected request changes nothing: no round, no accepted observation, nobody
Byzantine. Every 4xx from the app is `{"success": false, "error", "message"}`.

The layout has two validators and runs only node 1: node_002's key signs the
observations that get mutated (all submitted once up front, so a still-valid variant
can only be a duplicate), and no running node ever contradicts them. Each hypothesis
example is one `trio.run` on a kept-alive HttpClient whose connection outlives the run,
so ~10^4 requests fit in well under a minute. Examples are derandomized: CI sees the
same requests every time. Inputs that once crashed the node or forged evidence are kept
as explicit cases (KNOWN_CRASHERS).
"""

from __future__ import annotations

import copy
import functools
import json
import math
import re
import ssl
import string
import urllib.parse
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import attrs
import pytest
import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from _launch import LiveCluster, value
from anna_trio import failpoints, tls
from anna_trio.config import load_cluster_config
from anna_trio.models import COMPONENT_NAMES, OBSERVATION_FIELDS, ROUND_ID_RE
from anna_trio.sim import signed_observation
from anna_trio.transport.client import HttpClient, PeerConnectionError, Response, encode_header

pytestmark = [
    pytest.mark.integration,
    # A failing example may be a 64 KiB body: hypothesis warns when it prints one.
    pytest.mark.filterwarnings("ignore:Generating overly large repr"),
]

OUTSIDER = "node_002"
MAX_BODY = 64 * 1024
REQUEST_TIMEOUT = 10.0
RAW_READ_TIMEOUT = 2.0
BASE_FLAGS = ((), ("RecencyBias",), ("AnchoringBias", "RecencyBias"))
START_IDS = tuple(f"fuzz_start_{n}" for n in range(4))
ENDPOINTS = (
    "/rpc/submit",
    "/rpc/round/start",
    "/rpc/status",
    "/rpc/reconcile",
    "/rpc/gossip",
    "/rpc/sync",
    "/health",
)


def fuzz_settings(examples: int) -> settings:
    """Fixed examples (CI sees the same requests), no deadline: each one is network I/O."""
    return settings(
        max_examples=examples,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=list(HealthCheck),
    )


# --- bookkeeping -----------------------------------------------------------------------


@attrs.define
class Tally:
    """What the whole module sent and got back, for the final checks and the report."""

    requests: int = 0
    closed: int = 0
    statuses: Counter[int] = attrs.Factory(Counter)
    scenarios: set[str] = attrs.Factory(set)


TALLY = Tally()
SCENARIOS = {
    "submit",
    "junk",
    "gossip",
    "sync",
    "status",
    "paths",
    "metrics",
    "raw",
    "round_start",
    "mtls",
}


def status_lines(raw: bytes) -> list[int]:
    """Status codes of every response in a raw byte stream (pipelined answers included)."""
    return [int(code) for code in re.findall(rb"(?:^|\r\n)HTTP/1\.[01] (\d{3})", raw)]


def check(response: Response, method: str = "POST") -> Any:
    """No 500, a real status, and the SPEC error shape on every 4xx; the decoded body."""
    TALLY.requests += 1
    TALLY.statuses[response.status] += 1
    assert response.status != 500, response.body[:500]
    assert 100 <= response.status < 600, response.status
    if method == "HEAD":
        assert not response.body, "a HEAD answer has no body"
        return None
    if not response.body:
        assert response.status < 400, "a 4xx must say why"
        return None
    if 400 <= response.status < 500:
        assert response.headers.get("content-type", "").startswith("application/json")
        body = json.loads(response.body)
        assert set(body) == {"success", "error", "message"}, body
        assert body["success"] is False, body
        assert isinstance(body["error"], str) and isinstance(body["message"], str), body
        return body
    if response.headers.get("content-type", "").startswith("application/json"):
        return json.loads(response.body)
    return response.body


# --- the node under test -----------------------------------------------------------------


@attrs.define
class Target:
    """Node 1 of a two-validator layout, its kept-alive clients and the base observations."""

    cluster: LiveCluster
    ssl_context: ssl.SSLContext | None
    rpc: HttpClient
    metrics_client: HttpClient
    bases: list[dict[str, Any]] = attrs.Factory(list)
    round_answers: dict[str, tuple[bytes, tuple[int, Any]]] = attrs.Factory(dict)

    @classmethod
    def open(cls, cluster: LiveCluster) -> Target:
        ep = cluster.endpoint(1)
        context = None
        if cluster.layout.tls:
            config = load_cluster_config(
                cluster.layout.node_dir(1) / "peers.yml", node_id=None, check_tls_files=False
            )
            context = tls.client_context(config.tls)
        target = cls(
            cluster,
            context,
            HttpClient(ep.host, ep.rpc_port, ssl_context=context),
            HttpClient(ep.host, ep.metrics_port),
        )
        target.submit_bases()
        return target

    def submit_bases(self) -> None:
        """Sign and submit one observation per base round; wait until each round settles."""
        key_file = self.cluster.layout.node_dir(2) / "keys" / "node_id.sec"
        for n, flags in enumerate(BASE_FLAGS):
            obs = signed_observation(
                key_file,
                OUTSIDER,
                f"fuzz_base_{n}",
                tis=0.5 + n / 10,
                audit_id=10**12 + n,
                bias_flags=flags,
            )
            response = self.call("POST", "/rpc/submit", json.dumps({"observation": obs}).encode())
            assert response is not None and response.status == 200, response
            self.bases.append(obs)

        async def settled() -> bool:
            views = [await self.round(f"fuzz_base_{n}") for n in range(len(BASE_FLAGS))]
            return all(v is not None and v["status"] == "Complete" for v in views)

        self.wait_until(settled)

    async def request(
        self, client: HttpClient, method: str, path: str, body: bytes, headers: dict[str, str]
    ) -> Response:
        with trio.fail_after(REQUEST_TIMEOUT):
            return await client.request(method, path, body=body, headers=headers)

    def call(
        self,
        method: str,
        path: str,
        body: bytes = b"",
        headers: dict[str, str] | None = None,
        *,
        metrics_port: bool = False,
        may_close: bool = False,
    ) -> Response | None:
        """One request in its own trio.run; None when the server closed instead of answering."""
        client = self.metrics_client if metrics_port else self.rpc
        try:
            return trio.run(self.request, client, method, path, body, headers or {})
        except PeerConnectionError:
            if not may_close:
                raise
            TALLY.requests += 1
            TALLY.closed += 1
            return None

    async def round(self, round_id: str) -> Any:
        response = await self.request(
            self.rpc, "GET", "/rpc/status?round_id=" + urllib.parse.quote(round_id), b"", {}
        )
        return json.loads(response.body) if response.status == 200 else None

    def wait_until(self, check_: Callable[[], Awaitable[bool]], within: float = 15.0) -> None:
        async def poll() -> None:
            with trio.fail_after(within):
                while not await check_():  # noqa: ASYNC110 - remote state: polling is the only way
                    await trio.sleep(0.05)

        trio.run(poll)

    def snapshot(self) -> dict[str, Any]:
        """What a rejected request must not change: rounds, Byzantine records, accepted count."""
        response = self.call("GET", "/rpc/status")
        assert response is not None and response.status == 200
        status = json.loads(response.body)
        metrics = trio.run(self.cluster.metrics, 1)
        return {
            "rounds": [(r["round_id"], r["total_observations"]) for r in status["rounds"]],
            "byzantine_nodes": status["byzantine_nodes"],
            "accepted": value(metrics, "anna_observations_received_total", result="accepted")
            or 0.0,
        }

    def settled_snapshot(self) -> dict[str, Any]:
        """A snapshot once background work (own observations of new rounds) has landed."""
        previous = self.snapshot()
        for _ in range(50):
            trio.run(trio.sleep, 0.1)
            current = self.snapshot()
            if current == previous:
                return current
            previous = current
        pytest.fail("node state never settled")

    def assert_alive(self) -> None:
        """/health answers on both listeners and the log shows no unhandled exception."""
        for metrics_port in (False, True):
            response = self.call("GET", "/health", metrics_port=metrics_port)
            assert response is not None and response.status == 200
        assert self.cluster.processes[1].poll() is None, "annad died"
        log = (self.cluster.layout.node_dir(1) / "annad.log").read_text(errors="replace")
        assert "Traceback" not in log, log[max(0, log.find("Traceback") - 200) :][:3000]

    async def raw(self, data: bytes, *, tls_wrap: bool = False, port: int | None = None) -> bytes:
        """Send raw bytes on a fresh connection, half-close, return all the server said."""
        ep = self.cluster.endpoint(1)
        tcp = await trio.open_tcp_stream(ep.host, port or ep.rpc_port)
        stream: trio.abc.Stream = tcp
        received = bytearray()
        try:
            with trio.move_on_after(RAW_READ_TIMEOUT):
                if tls_wrap:
                    assert self.ssl_context is not None
                    stream = trio.SSLStream(
                        tcp, self.ssl_context, server_hostname=ep.host, https_compatible=True
                    )
                    await stream.do_handshake()
                await stream.send_all(data)
                await tcp.send_eof()
                while chunk := await stream.receive_some(65536):
                    received += chunk
        except (trio.BrokenResourceError, OSError):
            pass  # the server hung up on junk: allowed
        finally:
            tcp.socket.close()
        return bytes(received)

    def raw_exchange(self, data: bytes, **options: Any) -> None:
        answer = trio.run(functools.partial(self.raw, data, **options))
        codes = status_lines(answer)
        TALLY.requests += 1
        TALLY.closed += not codes
        for code in codes:
            TALLY.statuses[code] += 1
            assert code != 500, answer[:1000]

    def close(self) -> None:
        trio.run(self.rpc.aclose)
        trio.run(self.metrics_client.aclose)


@pytest.fixture(scope="module")
def plain(module_cluster_factory: Callable[..., LiveCluster]) -> Iterator[Target]:
    """Node 1 of two validators over plain HTTP (throughput), base observations in place."""
    target = Target.open(
        module_cluster_factory(nodes=2, running=(1,), tls=False, round_timeout=1.0)
    )
    yield target
    target.close()


@pytest.fixture(scope="module")
def mtls(module_cluster_factory: Callable[..., LiveCluster]) -> Iterator[Target]:
    """The same over mTLS, for a smaller batch."""
    target = Target.open(module_cluster_factory(nodes=2, running=(1,), tls=True, round_timeout=1.0))
    yield target
    target.close()


def unchanged(target: Target, scenario: Callable[[], None]) -> None:
    """Run a batch of requests that must all be rejected; the node's state must not move."""
    before = target.settled_snapshot()
    scenario()
    after = target.snapshot()
    assert after == before
    assert after["byzantine_nodes"] == []
    target.assert_alive()


# --- strategies: JSON junk ------------------------------------------------------------------

HUGE_NUMBERS = (2**63, 2**64, -(2**63) - 1, 10**400, -(10**400), 1e308, -1e308, 5e-324)
NON_FINITE = (math.nan, math.inf, -math.inf)
scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.sampled_from(HUGE_NUMBERS + NON_FINITE),
    st.floats(),
    st.text(max_size=40),
)
json_junk = st.recursive(
    scalars,
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=12), children, max_size=4)
    ),
    max_leaves=10,
)


def dumps(value: Any) -> bytes:
    """JSON as Python writes it: NaN and Infinity come out as bare tokens."""
    return json.dumps(value).encode()


def nested(depth: int, kind: str) -> bytes:
    opener, closer = {"list": (b"[", b"]"), "dict": (b'{"a":', b"}")}[kind]
    return opener * depth + b"0" + closer * depth


deep_json = st.builds(nested, st.integers(1, 20_000), st.sampled_from(["list", "dict"]))
oversize = st.integers(MAX_BODY - 2, 3 * MAX_BODY).map(
    lambda size: b'{"observation":"' + b"a" * (size - 18) + b'"}'
)

# --- strategies: mutated observations -------------------------------------------------------

TIMESTAMPS = (
    "2025-11-12 12:00:00Z",
    "2025-11-12T12:00:00+01:00",
    "2025-11-12T12:00:00-05:30",
    "2025-11-12T12:00:00-00:00",
    "2025-11-12T12:00:00",
    "2025-11-12T23:59:60Z",
    "2016-12-31T23:59:60Z",
    "2025-11-12T24:00:00Z",
    "2025-02-30T12:00:00Z",
    "2025-11-12T12:00:00.123456789Z",
    "2025-11-12t12:00:00z",
    "0000-01-01T00:00:00Z",
    "0001-01-01T00:00:00Z",
    "9999-12-31T23:59:59.999999Z",
    "9999-12-31T23:59:59-00:01",
    "+275760-09-13T00:00:00Z",
    "20251112T120000Z",
    "2025-W46-3T12:00:00Z",
    "T",
    "",
    "2025-11-12T12:00:00Z" + " " * 30,
    1731412800,
    1731412800.5,
)
HASHES = (
    "sha256:" + "A" * 64,
    "sha256:" + "a" * 63,
    "sha256:" + "a" * 65,
    "a" * 64,
    "SHA256:" + "a" * 64,
    "sha512:" + "a" * 64,
    "sha256:" + "g" * 64,
)
NUMERIC_EDGES = HUGE_NUMBERS + NON_FINITE + (-0.0, 1.0000001, 0, 1, 1e-320)
EDGES: dict[str, tuple[Any, ...]] = {
    "node_id": ("", "node_001", "node_999", "n" * 65, "nöde_002", "node/002", "node 002", 2),
    "audit_id": (0, -1, 2**63 - 1, 1.0, 1e3, "1", True, False, [1], *NUMERIC_EDGES),
    "round_id": ("", "r" * 65, "r 1", "r/1", "rönd", "round\x00", "fuzz_base_9", 1),
    "window_hours": (0, -1, 8761, 24.0, 24.5, "24", True, 1, 8760, *NUMERIC_EDGES),
    "timestamp": TIMESTAMPS,
    "forecast_hash": HASHES,
    "outcome_hash": HASHES,
    "tis_overall": (-1e-9, 2, -1, "0.5", True, [0.5], {"v": 0.5}, *NUMERIC_EDGES),
    "tis_components": ({}, [], "x", {"prediction_accuracy": 0.5}),
    "bias_flags": (
        [f"Flag{n}" for n in range(17)],
        ["RecencyBias", "RecencyBias"],
        [""],
        ["1abc"],
        ["B" * 65],
        ["Recency Bias"],
        ["Récency"],
        ["NewFlag"],
        "RecencyBias",
        [None],
        [[]],
        [{}],
        {},
    ),
    "signature": ("A" * 128, "a" * 127, "a" * 129, "g" * 128, "", "0" * 128, 7),
}
BAD_ROUND_IDS = (*EDGES["round_id"][:-2], "r\n", "x" * 64 + "\n", "fuzz_start_0\n")
AFFIXES = ("\n", " ", "\t", "\x00", "\u00a0", "\ufeff", "\ud800", "a" * 300)
# Affixes and edge values are where validators slip (a regex `$` before "\n", hex
# parsers skipping whitespace), so they come up most often.
MUTATIONS = (
    *("affix", "affix", "affix", "edge", "edge"),
    *("drop", "add", "rename", "junk", "component", "flags", "swap"),
)
STRING_FIELDS = ("signature", "node_id", "round_id", "timestamp", "forecast_hash", "outcome_hash")
FIELD_NAMES = sorted(OBSERVATION_FIELDS)
field_values = st.one_of(scalars, json_junk, st.sampled_from(HUGE_NUMBERS + NON_FINITE))
near_names = st.sampled_from(["Signature", "node_id ", " node_id", "nodeId", "tis", "extra"])


@st.composite
def mutated_observation(draw: st.DrawFn, bases: list[dict[str, Any]]) -> Any:
    """A base observation with one to three mutations: rarely still valid, never new."""
    obs: Any = copy.deepcopy(draw(st.sampled_from(bases)))
    for _ in range(draw(st.sampled_from((1, 1, 2, 3)))):
        if not isinstance(obs, dict):
            break
        kind = draw(st.sampled_from(MUTATIONS))
        present = sorted(obs) or ["node_id"]
        field = draw(st.sampled_from(present))
        if kind == "drop":
            obs.pop(field, None)
        elif kind == "add":
            obs[draw(near_names | st.text(max_size=20))] = draw(field_values)
        elif kind == "rename":
            new = draw(near_names | st.sampled_from(FIELD_NAMES) | st.text(max_size=20))
            if new != field and field in obs:
                obs[new] = obs.pop(field)
        elif kind == "edge":
            edge_field = draw(st.sampled_from(sorted(EDGES)))
            obs[edge_field] = copy.deepcopy(draw(st.sampled_from(EDGES[edge_field])))
        elif kind == "junk":
            obs[field] = draw(field_values)
        elif kind == "affix":
            name = draw(st.sampled_from(STRING_FIELDS))
            affix = draw(st.sampled_from(AFFIXES))
            if isinstance(obs.get(name), str):
                obs[name] = affix + obs[name] if draw(st.booleans()) else obs[name] + affix
        elif kind == "component" and isinstance(obs.get("tis_components"), dict):
            parts = obs["tis_components"]
            name = draw(st.sampled_from([*COMPONENT_NAMES, "extra"]))
            if draw(st.booleans()):
                parts.pop(name, None)
            else:
                parts[name] = draw(st.sampled_from(NUMERIC_EDGES) | field_values)
        elif kind == "flags" and isinstance(obs.get("bias_flags"), list):
            flags = obs["bias_flags"]
            variant = draw(st.sampled_from(["reverse", "duplicate", "affix", "append"]))
            if variant == "reverse":
                flags.reverse()
            elif variant == "duplicate" and flags:
                flags.append(flags[0])
            elif variant == "affix" and flags:
                flags[0] += draw(st.sampled_from(AFFIXES))
            elif variant == "append":
                flags.append(draw(st.sampled_from(["NewFlag", "", "x" * 64, "é"]) | st.text()))
        elif kind == "swap":
            obs["signature"] = draw(st.sampled_from(bases))["signature"]
    return obs


WRAPPERS: dict[str, Callable[[Any], Any]] = {
    "plain": lambda obs: {"observation": obs},
    "bare": lambda obs: obs,
    "extra": lambda obs: {"observation": obs, "extra": 1},
    "listed": lambda obs: {"observation": [obs]},
    "renamed": lambda obs: {"Observation": obs},
    "doubled": lambda obs: [{"observation": obs}, {"observation": obs}],
}


def submit_bodies(bases: list[dict[str, Any]]) -> st.SearchStrategy[bytes]:
    return st.builds(
        lambda obs, wrap: dumps(WRAPPERS[wrap](obs)),
        mutated_observation(bases),
        st.just("plain") | st.sampled_from(sorted(WRAPPERS)),
    )


# --- strategies: headers -------------------------------------------------------------------


def sendable(headers: dict[str, str]) -> bool:
    """Whether our client lets these headers out (raw-socket tests cover the rest)."""
    try:
        for name, value in headers.items():
            encode_header(name, value)
    except (ValueError, UnicodeEncodeError):
        return False
    return True


CONTENT_TYPES = (
    None,
    "application/json",
    "application/json; charset=utf-8",
    "application/json; charset=latin-1",
    "text/plain",
    "application/x-www-form-urlencoded",
    "multipart/form-data; boundary=xyz",
    "multipart/form-data",
    "application/octet-stream",
    "*/*",
    "application/json, text/plain",
)
idempotency_keys = st.one_of(
    st.none(),
    st.sampled_from(["", "k", "same-key", "k" * 255, "k" * 256]),
    st.integers(1, 9000).map(lambda n: "k" * n),
    st.text(st.characters(min_codepoint=0x21, max_codepoint=0xFF), min_size=1, max_size=64),
    st.text(min_size=1, max_size=32).map(lambda s: s.encode().decode("latin-1")),
)


@st.composite
def junk_headers(draw: st.DrawFn) -> dict[str, str]:
    headers: dict[str, str] = {}
    content_type = draw(st.sampled_from(CONTENT_TYPES) | st.text(max_size=30))
    if content_type is not None:
        headers["Content-Type"] = content_type
    key = draw(idempotency_keys)
    if key is not None:
        headers["Idempotency-Key"] = key
    if draw(st.booleans()):
        headers[draw(st.sampled_from(["Accept", "X-Forwarded-For", "Expect", "Cookie"]))] = draw(
            st.text(max_size=40)
        )
    return headers if sendable(headers) else {}


# --- scenarios -----------------------------------------------------------------------------


def fuzz_submit(target: Target, examples: int) -> None:
    """Mutated observations: a duplicate at best (200), otherwise 403/422; never 409."""

    @fuzz_settings(examples)
    @given(body=submit_bodies(target.bases))
    def one(body: bytes) -> None:
        response = target.call("POST", "/rpc/submit", body, {"Content-Type": "application/json"})
        assert response is not None
        answer = check(response)
        if response.status == 200:
            assert answer["duplicate"] is True, answer
        else:
            # 409 would mean a copy passed for a second signed observation: forged evidence.
            assert response.status in (403, 422), (response.status, answer)

    one()


def fuzz_junk(target: Target, examples: int) -> None:
    """Bodies that are not observations, with odd headers, on every POST endpoint."""
    valid = dumps({"observation": target.bases[0]})
    bodies = st.one_of(
        st.binary(max_size=300),
        st.text(max_size=300).map(str.encode),
        json_junk.map(dumps),
        deep_json,
        oversize,
        st.integers(0, len(valid) - 1).map(lambda cut: valid[:cut]),
        st.builds(
            lambda value, codec: json.dumps(value).encode(codec),
            json_junk,
            st.sampled_from(["utf-16", "utf-32", "utf-8-sig", "latin-1"]),
        ),
    )

    @fuzz_settings(examples)
    @given(
        path=st.sampled_from(["/rpc/submit", "/rpc/gossip", "/rpc/sync"]),
        body=bodies,
        headers=junk_headers(),
    )
    def one(path: str, body: bytes, headers: dict[str, str]) -> None:
        response = target.call("POST", path, body, headers, may_close=len(body) > MAX_BODY)
        if response is None:
            return
        answer = check(response)
        if len(body) > MAX_BODY:
            assert response.status == 413, response.status
        elif path == "/rpc/submit":
            assert 400 <= response.status < 500, response.status
        elif path == "/rpc/gossip" and response.status == 200:
            assert answer["accepted"] == 0, answer

    one()


def invalid_round_item(bases: list[dict[str, Any]]) -> st.SearchStrategy[Any]:
    """A gossip `rounds` item that opens nothing: junk, a bad id or window, or a known round."""
    bad_ids = st.sampled_from(BAD_ROUND_IDS) | json_junk.filter(
        lambda v: not (isinstance(v, str) and ROUND_ID_RE.fullmatch(v))
    )
    bad_windows = st.sampled_from((0, -1, 8761, 24.0, "24", True, None, 10**400, math.nan))
    known = st.builds(
        lambda obs, window: {"round_id": obs["round_id"], "window_hours": window},
        st.sampled_from(bases),
        st.integers(1, 8760),
    )
    return st.one_of(
        json_junk,
        st.fixed_dictionaries({"round_id": bad_ids, "window_hours": json_junk | bad_windows}),
        st.fixed_dictionaries(
            {"round_id": st.sampled_from(START_IDS), "window_hours": bad_windows}
        ),
        known,
    )


def gossip_bodies(bases: list[dict[str, Any]]) -> st.SearchStrategy[bytes]:
    observation = st.one_of(mutated_observation(bases), st.sampled_from(bases), json_junk)
    evidence = st.one_of(
        json_junk,
        st.fixed_dictionaries({"first": observation, "second": observation}),
        st.fixed_dictionaries({}, optional={"first": observation, "second": observation}),
    )

    def field(items: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
        return st.one_of(
            st.lists(items, max_size=6),
            json_junk,
            st.integers(900, 1500).map(lambda n: [0] * n),
        )

    payload = st.fixed_dictionaries(
        {},
        optional={
            "rounds": field(invalid_round_item(bases)),
            "observations": field(observation),
            "evidence": field(evidence),
            "from": json_junk,
            "extra": json_junk,
        },
    )
    return st.one_of(payload, json_junk).map(dumps)


def fuzz_gossip(target: Target, examples: int) -> None:
    """Node-to-node pushes full of junk: 200 with nothing accepted, or a 4xx."""

    @fuzz_settings(examples)
    @given(body=gossip_bodies(target.bases))
    def one(body: bytes) -> None:
        response = target.call("POST", "/rpc/gossip", body, {"Content-Type": "application/json"})
        assert response is not None
        answer = check(response)
        if response.status == 200:
            assert answer["accepted"] == 0, answer
        else:
            assert response.status in (413, 422), (response.status, answer)

    one()


def sync_bodies(bases: list[dict[str, Any]]) -> st.SearchStrategy[bytes]:
    round_ids = st.sampled_from([b["round_id"] for b in bases]) | st.text(max_size=20)
    node_ids = st.sampled_from([OUTSIDER, "node_001"]) | st.text(max_size=10)
    summary = st.one_of(
        st.dictionaries(round_ids, st.lists(node_ids, max_size=3) | json_junk, max_size=4),
        json_junk,
    )
    known_evidence = st.one_of(
        st.lists(st.lists(json_junk, min_size=2, max_size=2) | json_junk, max_size=4),
        st.lists(st.tuples(node_ids, round_ids).map(list), max_size=4),
        json_junk,
    )
    fingerprints = st.one_of(
        st.dictionaries(round_ids, st.text(max_size=16) | json_junk, max_size=4), json_junk
    )
    payload = st.fixed_dictionaries(
        {},
        optional={
            "from": json_junk,
            "summary": summary,
            "evidence": known_evidence,
            "fingerprints": fingerprints,
        },
    )
    return st.one_of(payload, json_junk).map(dumps)


def fuzz_sync(target: Target, examples: int) -> None:
    """Anti-entropy questions full of junk: a well-formed answer (200) or 422."""

    @fuzz_settings(examples)
    @given(body=sync_bodies(target.bases))
    def one(body: bytes) -> None:
        response = target.call("POST", "/rpc/sync", body, {"Content-Type": "application/json"})
        assert response is not None
        answer = check(response)
        if response.status == 200:
            assert {k: type(v) for k, v in answer.items()} == {
                **dict.fromkeys(("rounds", "observations", "evidence"), list),
                "more": bool,
            }
        else:
            assert response.status == 422, (response.status, answer)

    one()


QUERY_CHARS = string.ascii_letters + string.digits + "%&=;+#?/[]._-~!$'()*,:@"


def fuzz_status(target: Target, examples: int) -> None:
    """GET /rpc/status with odd, repeated and mis-encoded query strings: 200, 400 or 404."""
    names = st.sampled_from(["round_id", "round_id[]", "ROUND_ID", "round id", ""]) | st.text(
        max_size=8
    )
    values = st.one_of(
        st.sampled_from([b["round_id"] for b in target.bases]),
        st.sampled_from(EDGES["round_id"][:-1]).map(str),
        st.text(max_size=80),
        st.integers(0, 9000).map(lambda n: "r" * n),
    )
    encoded = st.lists(st.tuples(names, values), max_size=4).map(
        lambda pairs: urllib.parse.urlencode(pairs, quote_via=urllib.parse.quote)
    )
    raw_query = st.text(QUERY_CHARS, max_size=80) | st.sampled_from(
        [
            "round_id=%ff%fe",
            "round_id=%",
            "round_id=%zz",
            "round_id",
            "=&=&",
            "round_id=a&round_id=b",
        ]
    )

    @fuzz_settings(examples)
    @given(query=encoded | raw_query)
    def one(query: str) -> None:
        response = target.call("GET", "/rpc/status?" + query)
        assert response is not None
        answer = check(response, "GET")
        assert response.status in (200, 400, 404), (response.status, answer)
        assert isinstance(answer, dict)

    one()


TOKEN_CHARS = "!#$%&'*+-.^_`|~" + string.ascii_letters + string.digits
PATH_CHARS = "".join(chr(c) for c in range(0x21, 0x7F))


def fuzz_paths(target: Target, examples: int) -> None:
    """Any method on any path: routing answers 404/405 (or a real answer), never 500."""
    methods = st.sampled_from(
        ["GET", "POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS", "TRACE", "get", "CONNECT"]
    ) | st.text(TOKEN_CHARS, min_size=1, max_size=12)
    known = st.sampled_from(ENDPOINTS)
    paths = st.one_of(
        known,
        known.map(lambda p: p + "/"),
        known.map(lambda p: "/" + p),
        known.map(str.upper),
        known.map(lambda p: p.replace("/", "%2F")),
        known.map(lambda p: p.replace("rpc", "rpc/..")),
        st.sampled_from(["*", "/debug/failpoints/store.before_commit", "/metrics", "/ready"]),
        st.text(PATH_CHARS, max_size=60).map(lambda p: "/" + p),
        st.integers(100, 8000).map(lambda n: "/" + "a" * n),
    )
    # A leading "~" keeps every body invalid JSON: nothing here may start a round (an
    # empty body may, as a round start without arguments).
    bodies = st.binary(max_size=64).map(lambda b: b"~" + b)

    @fuzz_settings(examples)
    @given(method=methods, path=paths, body=bodies)
    def one(method: str, path: str, body: bytes) -> None:
        response = target.call(method, path, body)
        assert response is not None
        check(response, method)

    one()


def fuzz_metrics_listener(target: Target, examples: int) -> None:
    """The plain metrics listener: odd methods, paths and failpoint requests (unknown names)."""
    bad_names = st.text(max_size=30).filter(lambda name: name not in failpoints.NAMES)
    paths = st.one_of(
        st.sampled_from(["/metrics", "/health", "/ready", "/debug/failpoints/"]),
        bad_names.map(lambda name: "/debug/failpoints/" + urllib.parse.quote(name, safe="")),
        st.text(PATH_CHARS, max_size=40).map(lambda p: "/" + p),
    )
    methods = st.sampled_from(["GET", "PUT", "DELETE", "POST", "HEAD", "OPTIONS"])
    bodies = st.binary(max_size=64) | st.sampled_from([b"exit", b"sleep(1)", b"\xff\xfe", b"off"])

    @fuzz_settings(examples)
    @given(method=methods, path=paths, body=bodies)
    def one(method: str, path: str, body: bytes) -> None:
        if path.startswith("/debug/failpoints/"):  # never arm a real failpoint
            assert urllib.parse.unquote(path.rsplit("/", 1)[-1]) not in failpoints.NAMES
        response = target.call(method, path, body, metrics_port=True)
        assert response is not None
        check(response, method)
        if (method, path) == ("GET", "/metrics"):
            assert response.status == 200

    one()


# --- raw HTTP --------------------------------------------------------------------------------

EOLS = (b"\r\n", b"\n", b"\r")
RAW_METHODS = (b"GET", b"POST", b"PUT", b"get", b"", b"G ET", b"POST\x00", b"PRI", b"\xff")
RAW_TARGETS = (
    b"/rpc/submit",
    b"/rpc/status",
    b"/health",
    b"/rpc/gossip",
    b"*",
    b"http://127.0.0.1/rpc/status",
    b"",
    b"/rpc/status?round_id=\xff\xfe",
    b"/\x00",
    b"/a b",
    b"/" + b"a" * 20_000,
    b"//[",  # unclosed IPv6 brackets: urlsplit raised inside llhttp's callback (exit 1)
    b"http://[::1",
    b"//[::1]:x/rpc/status",
)
RAW_VERSIONS = (
    *(b"HTTP/1.1", b"HTTP/1.0", b"HTTP/2.0", b"HTTP/0.9", b"HTTP/1", b"http/1.1", b""),
    *(b"HTTP/1.1 x", b"HTTP/1.1\x00"),
)
RAW_HEADERS = (
    b"Host: x",
    b"Content-Type: application/json",
    b"NoColon",
    b"Bad Name: v",
    b" folded continuation",
    b"X: \x00",
    b"X: \xff\xfe",
    b": empty-name",
    b"Content-Length: -1",
    b"Content-Length: abc",
    b"Content-Length: 99999999999999999999",
    b"Content-Length: 5",
    b"Content-Length: 70000",
    b"Content-Length: 5, 6",
    b"Transfer-Encoding: chunked",
    b"Transfer-Encoding: gzip, chunked",
    b"Transfer-Encoding: chunked, chunked",
    b"Transfer-Encoding: identity",
    b"Transfer-Encoding: \x00chunked",
    b"Expect: 100-continue",
    b"Connection: Upgrade",
    b"Upgrade: h2c",
    b"HTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA",
    b"Connection: close",
    b"Idempotency-Key: \xe2\x82\xac",
    b"X-Big: " + b"a" * 20_000,
)
RAW_BODIES = (
    b"",
    b"5\r\nhello\r\n0\r\n\r\n",
    b"zz\r\nhi\r\n0\r\n\r\n",
    b"ffffffffffffffffff\r\n",
    b"5;ext=\x00\r\nhello\r\n0\r\n\r\n",
    b"-1\r\n",
    b"3\r\nhello\r\n",
    b"0\r\nTrailer: \xff\r\n\r\n",
    b"5\r\nhel",
    b'{"observation": {}}',
    b"10000\r\n" + b"a" * 0x10000 + b"\r\n10\r\n" + b"a" * 16 + b"\r\n0\r\n\r\n",
)
H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"


@st.composite
def raw_requests(draw: st.DrawFn) -> bytes:
    """Malformed HTTP/1.1: bad request lines, headers, framing and chunking, or plain junk."""
    shape = draw(st.sampled_from(["request", "request", "request", "pipelined", "h2", "junk"]))
    if shape == "junk":
        return draw(st.binary(max_size=400))
    if shape == "h2":
        return H2_PREFACE + draw(st.binary(max_size=200))
    eol = draw(st.sampled_from(EOLS))
    line = b" ".join(
        [
            draw(st.sampled_from(RAW_METHODS) | st.binary(max_size=8)),
            draw(st.sampled_from(RAW_TARGETS) | st.binary(max_size=30)),
            draw(st.sampled_from(RAW_VERSIONS)),
        ]
    )
    headers = draw(st.lists(st.sampled_from(RAW_HEADERS) | st.binary(max_size=40), max_size=6))
    if draw(st.booleans()):
        headers = [b"Host: 127.0.0.1", *headers]
    body = draw(st.sampled_from(RAW_BODIES) | st.binary(max_size=200))
    request = line + eol + eol.join(headers) + eol + eol + body
    if shape == "pipelined":
        request += b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n" + draw(st.binary(max_size=40))
    return request


def fuzz_raw(target: Target, examples: int, *, tls_wrap: bool = False) -> None:
    """Raw bytes on fresh connections: the server answers (never 500) or hangs up."""

    @fuzz_settings(examples)
    @given(data=raw_requests())
    def one(data: bytes) -> None:
        target.raw_exchange(data, tls_wrap=tls_wrap)

    one()


def fuzz_tls_junk(target: Target, examples: int) -> None:
    """Bytes that are not a TLS ClientHello on the mTLS port: refused, node unharmed."""
    hello_ish = st.binary(max_size=60).map(lambda b: b"\x16\x03\x01" + b)

    @fuzz_settings(examples)
    @given(data=st.binary(max_size=300) | hello_ish | raw_requests())
    def one(data: bytes) -> None:
        target.raw_exchange(data)

    one()


# --- round start (the one endpoint here that may legitimately change state) ------------------


def expected_start(body: bytes) -> set[int]:
    """The statuses SPEC §7 allows for this POST /rpc/round/start body (no Idempotency-Key)."""
    if not body:
        return {202, 400}  # no arguments, or not JSON: both readings are fair
    # Where JSON nesting gets "too deep" depends on the parser's stack: from ~500 on, 400.
    too_deep = {400} if body.count(b"[") + body.count(b"{") > 500 else set()
    try:
        payload = json.loads(body)
    except (ValueError, RecursionError):
        return {400}
    if payload is None:
        payload = {}
    if not isinstance(payload, dict) or set(payload) - {"round_id", "window_hours"}:
        return {422} | too_deep
    round_id, window = payload.get("round_id"), payload.get("window_hours", 24)
    if round_id is not None and not (isinstance(round_id, str) and ROUND_ID_RE.fullmatch(round_id)):
        return {422} | too_deep
    if isinstance(window, bool) or not isinstance(window, int) or not 1 <= window <= 8760:
        return {422} | too_deep
    return {202}


def round_start_bodies() -> st.SearchStrategy[bytes]:
    round_ids = st.one_of(
        st.sampled_from(START_IDS),
        st.sampled_from(BAD_ROUND_IDS),
        json_junk,
    )
    windows = st.sampled_from((1, 24, 8760, 0, 8761, -1, 24.0, "24", True, None, 10**400))
    payload = st.fixed_dictionaries(
        {}, optional={"round_id": round_ids, "window_hours": windows | json_junk, "x": json_junk}
    )
    return st.one_of(payload.map(dumps), json_junk.map(dumps), st.binary(max_size=50), deep_json)


def fuzz_round_start(target: Target, examples: int) -> None:
    """Valid starts answer 202 with their round id, the rest 4xx; a key that got a 202
    gets it again for the same body (422 for another), a key that got a refusal can be
    retried with a fixed body."""
    keys = st.none() | st.sampled_from(["", "start-a", "start-b", "é".encode().decode("latin-1")])

    @fuzz_settings(examples)
    @given(body=round_start_bodies(), key=keys)
    def one(body: bytes, key: str | None) -> None:
        headers = {"Idempotency-Key": key} if key is not None else {}
        response = target.call(
            "POST", "/rpc/round/start", body, headers, may_close=len(body) > MAX_BODY
        )
        if response is None:
            return
        answer = check(response)
        if len(body) > MAX_BODY:  # refused before the body is read, key or no key
            assert response.status == 413, (response.status, answer)
            return
        if key == "":  # as on /rpc/submit: a key is 1-255 characters
            assert (response.status, answer["error"]) == (400, "bad_idempotency_key"), answer
            return
        if key is not None and key in target.round_answers:
            first_body, first_answer = target.round_answers[key]
            if body == first_body:
                assert (response.status, answer) == first_answer
            else:
                assert (response.status, answer["error"]) == (422, "idempotency_key_reused")
            return
        allowed = expected_start(body)
        if 202 in allowed:  # a new round: admission control may say "not now" (SPEC §7)
            allowed.add(503)
        assert response.status in allowed, (body[:200], response.status, answer)
        if response.status == 503:
            assert response.headers.get("retry-after"), response.headers
            return
        if response.status == 202:
            requested = (json.loads(body or b"{}") or {}).get("round_id")
            assert answer["round_id"] == (requested or answer["round_id"]), answer
            assert ROUND_ID_RE.fullmatch(answer["round_id"]), answer
        if key is not None and response.status == 202:  # refusals are not kept: retry away
            target.round_answers[key] = (body, (response.status, answer))

    one()


# --- tests -----------------------------------------------------------------------------------


# (scenario, fuzzer, requests, what must hold): each runs against the plain cluster and
# must leave its state unchanged (`unchanged`: never a 500, the daemon alive).
FUZZ_RUNS: list[tuple[str, Callable[[Target, int], None], int, str]] = [
    (
        "submit",
        fuzz_submit,
        2800,
        "mutated observations: 403/422 (or a duplicate 200), never 500 or 409",
    ),
    ("junk", fuzz_junk, 2000, "non-JSON, every JSON type, deep nesting, oversize, odd headers"),
    (
        "gossip",
        fuzz_gossip,
        1300,
        "junk lists, huge counts, wrong nesting: nothing accepted, nobody Byzantine",
    ),
    ("sync", fuzz_sync, 800, "junk summaries and evidence keys: a well-formed answer or 422"),
    ("status", fuzz_status, 800, "weird, repeated, mis-encoded round_id parameters: 200 or 404"),
    (
        "paths",
        fuzz_paths,
        800,
        "any method on any path of the RPC listener: errors in the SPEC shape",
    ),
    (
        "metrics",
        fuzz_metrics_listener,
        300,
        "the metrics listener: methods, paths, unknown failpoints",
    ),
    (
        "raw",
        fuzz_raw,
        800,
        "bad request lines, headers, chunking, h2c, junk over raw sockets: 4xx or close",
    ),
]


@pytest.mark.parametrize(
    ("fuzz", "requests"),
    [pytest.param(fuzz, count, id=name) for name, fuzz, count, _ in FUZZ_RUNS],
)
def test_fuzzed_requests_are_refused_and_change_nothing(
    plain: Target,
    fuzz: Callable[[Target, int], None],
    requests: int,
    request: pytest.FixtureRequest,
) -> None:
    """One fuzzer of FUZZ_RUNS: what must hold is in its row; state never moves."""
    unchanged(plain, lambda: fuzz(plain, requests))
    TALLY.scenarios.add(request.node.callspec.id)


def test_round_start_bodies(plain: Target) -> None:
    """POST /rpc/round/start: 202 exactly when SPEC says so, idempotent keys, no Byzantine."""
    before = plain.settled_snapshot()
    fuzz_round_start(plain, 500)
    after = plain.settled_snapshot()
    assert after["byzantine_nodes"] == before["byzantine_nodes"] == []
    assert {r for r, _ in before["rounds"]} <= {r for r, _ in after["rounds"]}
    plain.assert_alive()
    TALLY.scenarios.add("round_start")


def test_mtls_batch(mtls: Target) -> None:
    """A smaller batch of the same over mTLS, plus junk where the TLS handshake should be."""

    def batch() -> None:
        fuzz_submit(mtls, 300)
        fuzz_junk(mtls, 200)
        fuzz_gossip(mtls, 100)
        fuzz_raw(mtls, 40, tls_wrap=True)
        fuzz_tls_junk(mtls, 60)

    unchanged(mtls, batch)
    TALLY.scenarios.add("mtls")


def _with(obs: dict[str, Any], **changes: Any) -> dict[str, Any]:
    return {**obs, **changes}


# Inputs that once answered 500 or took annad down, or forged Byzantine evidence.
KNOWN_CRASHERS: dict[str, tuple[str, str, Callable[[Target], bytes], set[int]]] = {
    "deeply-nested-json": ("POST", "/rpc/submit", lambda t: nested(5000, "list"), {400}),
    "deeply-nested-json-gossip": ("POST", "/rpc/gossip", lambda t: nested(3000, "dict"), {400}),
    "sync-unhashable-evidence-key": (
        "POST",
        "/rpc/sync",
        lambda t: dumps({"evidence": [[{}, {}], [[], "x"]]}),
        {200},
    ),
    "huge-integer-tis": (
        "POST",
        "/rpc/submit",
        lambda t: dumps({"observation": _with(t.bases[0], tis_overall=10**400)}),
        {422},
    ),
    "huge-integer-tis-component": (
        "POST",
        "/rpc/submit",
        lambda t: dumps(
            {
                "observation": _with(
                    t.bases[0],
                    tis_components={**t.bases[0]["tis_components"], "ethical_alignment": 10**400},
                )
            }
        ),
        {422},
    ),
    "signature-trailing-newline": (
        "POST",
        "/rpc/submit",
        lambda t: dumps(
            {"observation": _with(t.bases[1], signature=t.bases[1]["signature"] + "\n")}
        ),
        {422},
    ),
    "signature-trailing-newline-evidence": (
        "POST",
        "/rpc/gossip",
        lambda t: dumps(
            {
                "evidence": [
                    {
                        "first": t.bases[2],
                        "second": _with(t.bases[2], signature=t.bases[2]["signature"] + "\n"),
                    }
                ]
            }
        ),
        {200},
    ),
    "round-id-trailing-newline": (
        "POST",
        "/rpc/round/start",
        lambda t: dumps({"round_id": "fuzz_newline\n"}),
        {422},
    ),
    "round-id-trailing-newline-gossip": (
        "POST",
        "/rpc/gossip",
        lambda t: dumps({"rounds": [{"round_id": "fuzz_newline\n", "window_hours": 24}]}),
        {200},
    ),
    "head-on-rpc-route": ("HEAD", "/rpc/submit", lambda t: b"", {405}),
    "head-on-health": ("HEAD", "/health", lambda t: b"", {200, 405}),
}


@pytest.mark.parametrize("case", sorted(KNOWN_CRASHERS))
def test_known_crashers_are_refused(plain: Target, case: str) -> None:
    """Each input that once crashed the node or forged Byzantine evidence gets its 4xx now."""
    method, path, body, allowed = KNOWN_CRASHERS[case]
    before = plain.settled_snapshot()
    response = plain.call(method, path, body(plain))
    assert response is not None
    answer = check(response, method)
    assert response.status in allowed, (response.status, answer)
    if path == "/rpc/gossip" and response.status == 200:
        assert answer["accepted"] == 0 and answer["rejected"] >= 1, answer
    assert plain.snapshot() == before
    plain.assert_alive()


def test_node_survived_everything(plain: Target, mtls: Target) -> None:
    """Both nodes still answer /health, never answered 500, nobody is Byzantine; ≥ 10,000 requests."""
    for target in (plain, mtls):
        target.assert_alive()
        assert target.snapshot()["byzantine_nodes"] == []
    assert TALLY.statuses[500] == 0
    print(
        f"\nfuzz: {TALLY.requests} requests, {TALLY.closed} closed without an answer, "
        f"statuses {dict(sorted(TALLY.statuses.items()))}"
    )
    if TALLY.scenarios == SCENARIOS:
        assert TALLY.requests >= 10_000, TALLY.requests
