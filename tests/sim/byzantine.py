"""What the Byzantine nodes of a run do besides running a real node.

- equivocate: its own observation of each round goes out as signed to some peers and
  as a second, different, validly signed one to the others (a seeded split per round),
  in its pushes, its gossip answers and its anti-entropy answers alike; evidence against
  it is not passed on.
- replay: old node-to-node messages (anyone's) sent again, from its address.
- garbage: bodies no honest node sends: junk bytes, wrong shapes, oversized batches,
  forged or re-labelled observations, evidence that proves nothing, odd methods/paths.
"""

from __future__ import annotations

import collections
import json
import random
from collections.abc import Awaitable, Callable
from typing import Any

import trio
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from anna_trio._exceptions import ObservationError
from anna_trio.crypto import sign_observation
from anna_trio.models import ObservationContent, content_of, parse_observation
from anna_trio.transport.server import Request, Response

from .network import Sender

MISCHIEF_RATE = 2.0  # messages per second from each replaying or garbage-sending node
NODE_TO_NODE = ("/rpc/gossip", "/rpc/sync", "/rpc/submit")


def _loads(body: bytes) -> Any:
    try:
        return json.loads(body)
    except (ValueError, RecursionError):
        return None


def _dumps(value: Any) -> bytes:
    return json.dumps(value, separators=(",", ":")).encode()


class Equivocator:
    """network.Tamper of an equivocating node."""

    def __init__(
        self, node_id: str, key: Ed25519PrivateKey, peers: list[str], rng: random.Random
    ) -> None:
        self._node_id = node_id
        self._key = key
        self._peers = peers
        self._rng = rng
        self._marker = _dumps({"node_id": node_id})[1:-1]
        self._second_half: dict[str, frozenset[str]] = {}  # round -> peers sent the other
        self._alternates: dict[str, dict[str, Any]] = {}  # signature -> the other observation

    def __call__(self, body: bytes, peer: str) -> bytes:
        if self._marker not in body:
            return body
        payload = _loads(body)
        if not isinstance(payload, dict):
            return body
        changed = False
        observations = payload.get("observations")
        if isinstance(observations, list):
            for index, item in enumerate(observations):
                if isinstance(item, dict) and item.get("node_id") == self._node_id:
                    other = self._for(peer, item)
                    changed |= other is not item
                    observations[index] = other
        evidence = payload.get("evidence")
        if isinstance(evidence, list):
            kept = [e for e in evidence if self._marker not in _dumps(e)]
            changed |= len(kept) != len(evidence)
            payload["evidence"] = kept
        return _dumps(payload) if changed else body

    def _for(self, peer: str, item: dict[str, Any]) -> dict[str, Any]:
        round_id = str(item.get("round_id"))
        if round_id not in self._second_half:
            size = self._rng.randint(1, max(1, len(self._peers) - 1))
            self._second_half[round_id] = frozenset(self._rng.sample(self._peers, size))
        if peer not in self._second_half[round_id]:
            return item
        signature = str(item.get("signature"))
        if signature not in self._alternates:
            try:
                obs = parse_observation(item)
            except ObservationError:
                return item
            shift = self._rng.uniform(0.001, 0.02)
            tis = round(
                obs.tis_overall - shift if obs.tis_overall > 0.5 else obs.tis_overall + shift, 6
            )
            self._alternates[signature] = sign_observation(
                self._key, ObservationContent(**{**content_of(obs), "tis_overall": tis})
            ).to_dict()
        return self._alternates[signature]


class Archive:
    """network.Watcher keeping recent node-to-node requests, for replays and for the
    real observations garbage is made from."""

    def __init__(self, size: int = 256) -> None:
        self._messages: collections.deque[tuple[str, bytes]] = collections.deque(maxlen=size)

    def sent(self, sender: Sender, target: str, path: str, body: bytes) -> None:
        if path in NODE_TO_NODE and sender.process is not None:
            self._messages.append((path, body))

    def served(self, target: str, request: Request, response: Response) -> None:
        pass

    def message(self, rng: random.Random) -> tuple[str, bytes] | None:
        if not self._messages:
            return None
        return self._messages[rng.randrange(len(self._messages))]

    def observations(self, rng: random.Random) -> list[dict[str, Any]]:
        """The well-formed observations of one archived message (often none)."""
        picked = self.message(rng)
        payload = _loads(picked[1]) if picked else None
        items = payload.get("observations") if isinstance(payload, dict) else None
        return [o for o in items if _well_formed(o)] if isinstance(items, list) else []


def _well_formed(item: Any) -> bool:
    try:
        parse_observation(item)
    except ObservationError:
        return False
    return True


Garbage = tuple[str, str, bytes]  # method, path, body


def garbage(rng: random.Random, archive: Archive) -> Garbage:
    """One request no honest node would send."""
    observations = archive.observations(rng)
    sample = dict(rng.choice(observations)) if observations else None
    makers: list[Callable[[], Garbage]] = [
        lambda: ("POST", "/rpc/gossip", rng.randbytes(rng.randint(0, 64))),
        lambda: ("POST", "/rpc/gossip", b"[1,2,3]"),
        lambda: ("POST", "/rpc/gossip", b'{"observations":"nope","rounds":{}}'),
        lambda: ("POST", "/rpc/gossip", b"[" * 3000 + b"]" * 3000),
        lambda: ("POST", "/rpc/gossip", _dumps({"observations": [{}] * 1100})),
        lambda: ("POST", "/rpc/gossip", b'{"x":"' + b"a" * 70_000 + b'"}'),
        lambda: ("POST", "/rpc/gossip", b"\xff\xfe\x00{"),
        lambda: ("POST", "/rpc/gossip", b'{"observations":[{"tis_overall":NaN}]}'),
        lambda: (
            "POST",
            "/rpc/gossip",
            _dumps({"rounds": [{"round_id": "bad id!", "window_hours": 24}, 7, {"round_id": "r"}]}),
        ),
        lambda: ("POST", "/rpc/sync", b'{"summary":[]}'),
        lambda: ("POST", "/rpc/sync", b'{"summary":{"r":[1,2]}}'),
        lambda: ("POST", "/rpc/sync", b'{"summary":{},"evidence":[["a"],[1,2],"x"]}'),
        lambda: ("POST", "/rpc/submit", b'{"observation":1,"extra":2}'),
        lambda: ("POST", "/rpc/round/start", b'{"round_id":"../etc"}'),
        lambda: ("POST", "/rpc/round/start", b'{"window_hours":0}'),
        lambda: ("POST", "/rpc/round/start", b"not json"),
        lambda: ("GET", "/rpc/gossip", b""),
        lambda: ("GET", "/rpc/status?round_id=a&round_id=b", b""),
        lambda: ("POST", "/nowhere", b""),
    ]
    if sample is not None:
        flipped = "0" if sample["signature"][0] != "0" else "1"
        makers += [
            lambda: _gossip(
                {"observations": [{**sample, "signature": flipped + sample["signature"][1:]}]}
            ),
            lambda: _gossip({"observations": [{**sample, "node_id": "mallory"}]}),
            lambda: _gossip({"observations": [{**sample, "tis_overall": 0.01}]}),
            lambda: _gossip({"observations": [{**sample, "audit_id": 0}]}),
            lambda: _gossip({"observations": [{**sample, "audit_id": 10**30}]}),
            lambda: _gossip({"evidence": [{"first": sample, "second": sample}]}),
            lambda: _gossip({"evidence": [{"first": sample}, 1, "x"]}),
            lambda: ("POST", "/rpc/submit", _dumps({"observation": sample})),
            lambda: ("POST", "/rpc/submit", _dumps({"observation": {**sample, "extra": 1}})),
        ]
        others = [o for o in observations if o.get("node_id") != sample["node_id"]]
        if others:
            other = rng.choice(others)
            makers.append(lambda: _gossip({"evidence": [{"first": sample, "second": other}]}))
    return rng.choice(makers)()


def _gossip(payload: dict[str, Any]) -> Garbage:
    return ("POST", "/rpc/gossip", _dumps(payload))


async def make_mischief(
    behaviours: frozenset[str],
    peers: list[str],
    archive: Archive,
    rng: random.Random,
    sender: Callable[[], Sender | None],
    send: Callable[[Sender, str, str, str, bytes], Awaitable[object]],
) -> None:
    """Replays and garbage from a Byzantine node (`sender()`: its running process)
    while it runs, until cancelled."""
    kinds = sorted(behaviours & {"replay", "garbage"})
    if not kinds:
        return
    while True:
        await trio.sleep(rng.expovariate(MISCHIEF_RATE))
        source = sender()
        if source is None:
            continue
        if rng.choice(kinds) == "replay":
            picked = archive.message(rng)
            if picked is None:
                continue
            method, path, body = "POST", *picked
        else:
            method, path, body = garbage(rng, archive)
        await send(source, rng.choice(peers), method, path, body)
