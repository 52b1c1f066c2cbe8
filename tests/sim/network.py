"""The simulated network between the nodes' peer links and their RPC servers.

A peer link's request (seams.PeerTransport) becomes a `transport.server.Request` with
the sender's address as its client address, handed to the target's
`RpcServer.handle` in a task of the target's process; its Response comes back as the
client's Response. A seeded RNG decides each message's fate: latency, a long delay
past the caller's timeout (so a retry overtakes it: reordering), loss of the request or
of its answer, a reset connection, a duplicate delivery. Partitions cut directed pairs
(a blackhole: the caller waits out its timeout); a target that is not running refuses
the connection. What the target does with a request is real: the request runs in the
target's process even when the caller gave up on it, and dies with that process.
"""

from __future__ import annotations

import collections
import random
from collections.abc import Awaitable, Callable, Mapping
from functools import partial
from typing import Protocol
from urllib.parse import parse_qs, urlsplit

import attrs
import trio

from anna_trio._exceptions import PeerError
from anna_trio.models import ClusterConfig, PeerConfig
from anna_trio.transport import client
from anna_trio.transport.server import Request, Response, error_response

from .process import Process, current_node
from .trace import Trace

Handler = Callable[[Request], Awaitable[Response]]
Tamper = Callable[[bytes, str], bytes]
"""A Byzantine node's rewrite of what it sends to one peer (its body, that peer's id)."""


@attrs.frozen
class Faults:
    """What the network does to each message; probabilities per message, times in s."""

    latency: float = 0.005  # one-way delay, uniform in [0, latency]
    slow: float = 0.0  # chance of a delay up to slow_max instead: past the caller's timeout
    slow_max: float = 3.0
    drop: float = 0.0  # the request is lost: the caller waits out its timeout
    reset: float = 0.0  # the connection breaks before the request arrives
    lose_answer: float = 0.0  # the request ran, its answer is lost with the connection
    duplicate: float = 0.0  # the request arrives twice

    def calm(self) -> Faults:
        """The same latency, nothing else: the network after a heal."""
        return Faults(latency=self.latency)


@attrs.frozen
class Sender:
    """Who sends: a node's process, or an outside client (`process` None)."""

    name: str
    address: str
    process: Process | None = None

    @property
    def alive(self) -> bool:
        return self.process is None or self.process.alive


class Watcher(Protocol):
    """Told of every request as it leaves its sender and every answer a process gives."""

    def sent(self, sender: Sender, target: str, path: str, body: bytes) -> None: ...

    def served(self, target: str, request: Request, response: Response) -> None: ...


@attrs.frozen
class Endpoint:
    """A running process's RPC port: requests run as tasks in its `nursery`."""

    process: Process
    handle: Handler
    nursery: trio.Nursery
    max_body: Callable[[], int]


class _Answer:
    """Where a delivery leaves the target's answer for the waiting caller."""

    def __init__(self) -> None:
        self._settled = trio.Event()
        self._response: Response | None = None
        self._error = "connection reset by peer"
        self._lost = False

    def respond(self, response: Response) -> None:
        if not self._settled.is_set():
            self._response = response
            self._settled.set()

    def reset(self, error: str = "connection reset by peer") -> None:
        if not self._settled.is_set():
            self._error = error
            self._settled.set()

    def lose(self) -> None:
        if not self._settled.is_set():
            self._lost = True
            self._settled.set()

    async def wait(self) -> Response:
        await self._settled.wait()
        if self._lost:
            await trio.sleep_forever()
        if self._response is None:
            raise PeerError(self._error)
        return self._response


class Network:
    """Addresses, partitions, faults and the delivery of every message."""

    def __init__(self, rng: random.Random, trace: Trace, *, trace_bodies: bool = True) -> None:
        self._rng = rng
        self._trace = trace
        self._trace_bodies = trace_bodies
        self.faults = Faults()
        self._cuts: set[tuple[str, str]] = set()
        self._endpoints: dict[str, Endpoint] = {}
        self.tamperers: dict[str, Tamper] = {}
        self.watchers: list[Watcher] = []
        self.blocked_paths: set[str] = set()  # tests: every request to these is lost
        self.requests: collections.Counter[str] = collections.Counter()
        self.bytes: collections.Counter[str] = collections.Counter()
        self._serial = 0

    # --- topology ---------------------------------------------------------------------

    def listen(self, node_id: str, endpoint: Endpoint) -> None:
        self._endpoints[node_id] = endpoint

    def close(self, node_id: str) -> None:
        """The node's port closes: new connections are refused."""
        self._endpoints.pop(node_id, None)

    def cut(self, source: str, target: str) -> None:
        self._cuts.add((source, target))

    def partition(self, *groups: frozenset[str]) -> None:
        """No message between nodes of different groups, either way."""
        for group in groups:
            for other in groups:
                if other is not group:
                    self._cuts.update((a, b) for a in group for b in other)

    def heal(self) -> None:
        self._cuts.clear()

    def is_cut(self, source: str, target: str) -> bool:
        return (source, target) in self._cuts

    def transports(self, sender: Sender) -> Transports:
        return Transports(self, sender)

    # --- delivery -----------------------------------------------------------------------

    def _delay(self) -> float:
        faults = self.faults
        if faults.slow and self._rng.random() < faults.slow:
            return self._rng.uniform(0.0, faults.slow_max)
        return self._rng.uniform(0.0, faults.latency)

    def _fate(self) -> str:
        faults = self.faults
        roll = self._rng.random()
        for fate, chance in (
            ("drop", faults.drop),
            ("reset", faults.reset),
            ("lose-answer", faults.lose_answer),
            ("duplicate", faults.duplicate),
        ):
            if roll < chance:
                return fate
            roll -= chance
        return "deliver"

    def _shown(self, body: bytes) -> str:
        if self._trace_bodies:
            return repr(body)
        return f"<{len(body)} bytes>"

    async def exchange(
        self,
        sender: Sender,
        target: str,
        method: str,
        path: str,
        body: bytes,
        headers: Mapping[str, str],
    ) -> client.Response:
        """One request from `sender` to node `target` and its answer; PeerError (or a
        wait the caller's timeout ends) when there is none."""
        if not sender.alive:
            raise PeerError("the sending process is dead")
        tamper = self.tamperers.get(sender.name)
        if tamper is not None:
            body = tamper(body, target)
        self._serial += 1
        serial = self._serial
        url = urlsplit(path)
        request = Request(
            method=method,
            path=url.path,
            query=parse_qs(url.query, keep_blank_values=True),
            headers={name.lower(): value for name, value in headers.items()},
            body=body,
            client=sender.address,
        )
        self.requests[url.path] += 1
        self.bytes[url.path] += len(body)
        self._trace.add(
            "send", f"#{serial} {sender.name}>{target} {method} {path} {self._shown(body)}"
        )
        for watcher in self.watchers:
            watcher.sent(sender, target, url.path, body)
        if self.is_cut(sender.name, target) or url.path in self.blocked_paths:
            self._trace.add("cut", f"#{serial}")
            await trio.sleep_forever()
        delay = self._delay()
        endpoint = self._endpoints.get(target)
        if endpoint is None:
            await trio.sleep(delay)
            self._trace.add("refused", f"#{serial}")
            raise PeerError(f"connection refused by {target}")
        fate = self._fate()
        if fate != "deliver":
            self._trace.add(fate, f"#{serial}")
        answer = _Answer()
        deliver = partial(self._deliver, endpoint, sender.name, target, serial, request)
        endpoint.nursery.start_soon(deliver, answer, delay, fate)
        if fate == "duplicate":
            endpoint.nursery.start_soon(deliver, _Answer(), self._delay(), "copy")
        response = await answer.wait()
        await trio.sleep(self._delay())  # the answer's way back
        if self.is_cut(target, sender.name):
            self._trace.add("cut-answer", f"#{serial}")
            await trio.sleep_forever()
        return client.Response(
            status=response.status,
            headers={"content-type": response.content_type, **dict(response.headers)},
            body=response.body,
        )

    async def _deliver(
        self,
        endpoint: Endpoint,
        asker: str,
        target: str,
        serial: int,
        request: Request,
        answer: _Answer,
        delay: float,
        fate: str,
    ) -> None:
        """In the target's process: the request arrives after `delay` and is served."""
        current_node.set(target)
        try:
            await trio.sleep(delay)
            if fate == "drop":
                answer.lose()
                return
            if fate == "reset":
                answer.reset()
                return
            response = await self._serve(endpoint, request)
            if not endpoint.process.alive:
                return  # the answer died with the process (the finally resets)
            tamper = self.tamperers.get(target)
            if tamper is not None:
                response = attrs.evolve(response, body=tamper(response.body, asker))
            self.bytes[request.path] += len(response.body)
            self._trace.add(
                "answer", f"#{serial} {target} {response.status} {self._shown(response.body)}"
            )
            for watcher in self.watchers:
                watcher.served(target, request, response)
            if fate == "lose-answer":
                answer.lose()
            else:
                answer.respond(response)
        finally:
            answer.reset()  # the target died: its sockets are reset

    async def _serve(self, endpoint: Endpoint, request: Request) -> Response:
        """What the lean HTTP server does around the handler: the body limit (413), and
        a 500 for an exception, which the checker counts as a defect."""
        if len(request.body) > endpoint.max_body():
            limit = endpoint.max_body()
            return error_response(413, "payload_too_large", f"body over {limit} bytes")
        try:
            return await endpoint.handle(request)
        except Exception as exc:
            self._trace.add("error", f"{type(exc).__name__}: {exc}")
            return error_response(500, "internal_error", f"{type(exc).__name__}: {exc}")


class Transports:
    """peers.TransportFactory for one sender: a transport per peer, all on the network."""

    def __init__(self, network: Network, sender: Sender) -> None:
        self._network = network
        self._sender = sender

    def configure(self, config: ClusterConfig) -> None:
        """No TLS in the simulation."""

    def __call__(self, peer: PeerConfig) -> Transport:
        return Transport(self._network, self._sender, peer.node_id)


class Transport:
    """seams.PeerTransport: requests from one sender to one node."""

    def __init__(self, network: Network, sender: Sender, target: str) -> None:
        self._network = network
        self._sender = sender
        self._target = target

    async def request(
        self,
        method: str,
        path: str,
        *,
        body: bytes | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> client.Response:
        return await self._network.exchange(
            self._sender, self._target, method, path, body or b"", headers or {}
        )

    async def aclose(self) -> None:
        """Nothing held open."""
