"""Hostile clients against one node's RPC port, from 127.0.0.2 and up (the testnet's
nodes are all 127.0.0.1), for test_hostile_integration.

Run as a process of its own, so an attack that saturates its own CPU cannot slow the
test's probes (in a real attack the attacker is another machine):

    python tests/_attacks.py KIND PORT CA_PEM CERT KEY

prints `in full swing` once every attacker is in place, attacks until SIGTERM, then
prints one JSON line of what it saw. KIND is one of ATTACKS.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import random
import re
import signal
import ssl
import sys
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import attrs
import trio
import trio.lowlevel

from anna_trio.transport.tlsstream import TlsStream


def post(path: str, body: bytes, *headers: str) -> bytes:
    head = "".join(f"{h}\r\n" for h in headers)
    return (
        f"POST {path} HTTP/1.1\r\nhost: t\r\ncontent-length: {len(body)}\r\n{head}\r\n"
    ).encode() + body


SYNC = post("/rpc/sync", b'{"summary":{}}')
HEALTH = b"GET /health HTTP/1.1\r\nhost: t\r\n\r\n"
STATUS = b"GET /rpc/status HTTP/1.1\r\nhost: t\r\n\r\n"


def outsiders(count: int) -> list[str]:
    """Loopback addresses that are no node's: 127.0.2.2, 127.0.2.3, ..."""
    return [f"127.0.{2 + n // 250}.{2 + n % 250}" for n in range(count)]


@attrs.define
class Attacker:
    """Connections to one port from outsiders' addresses, with an outsider's certificate."""

    port: int
    context: ssl.SSLContext
    addresses: Iterator[str] = attrs.field(factory=lambda: itertools.cycle(outsiders(200)))

    async def tcp(self, source: str | None = None) -> trio.SocketStream | None:
        """A TCP connection from `source` (the next outsider address by default), or None
        when the node refused it before connect() returned (a reset)."""
        try:
            return await trio.open_tcp_stream(
                "127.0.0.1", self.port, local_address=source or next(self.addresses)
            )
        except OSError:
            return None

    async def tls(self, source: str | None = None) -> tuple[trio.SocketStream, TlsStream] | None:
        """A TLS connection, or None when refused (at connect or during the handshake)."""
        tcp = await self.tcp(source)
        if tcp is None:
            return None
        stream = TlsStream(tcp, self.context, server_side=False, server_hostname="127.0.0.1")
        try:
            with trio.fail_after(10):
                await stream.do_handshake()
        except (trio.BrokenResourceError, trio.TooSlowError):
            await tcp.aclose()
            return None
        except BaseException:  # cancelled: the attack is over
            tcp.socket.close()
            raise
        return tcp, stream

    async def tls_persistently(
        self, *, within: float = 20.0
    ) -> tuple[trio.SocketStream, TlsStream] | None:
        """Try again, as an attacker would, until admitted; None after `within` s."""
        deadline = trio.current_time() + within
        while trio.current_time() < deadline:
            opened = await self.tls()
            if opened is not None:
                return opened
            await trio.sleep(random.uniform(0.01, 0.05))
        return None


@attrs.define
class Countdown:
    """Sets `done` once `tick` was called `count` times: every attacker is in place."""

    count: int
    done: trio.Event

    def tick(self) -> None:
        self.count -= 1
        if self.count <= 0:
            self.done.set()


Attack = Callable[[Attacker, trio.Event, dict[str, Any]], Awaitable[None]]


async def never_read(attacker: Attacker, in_full_swing: trio.Event, seen: dict[str, Any]) -> None:
    """1,000 connections, each pipelining POST /rpc/sync and GET /rpc/status (its
    answer is the largest an outsider can ask for) as fast as it can, reading nothing."""
    burst = (SYNC + STATUS) * (256 * 1024 // len(SYNC + STATUS))
    placed = Countdown(1000, in_full_swing)
    seen["held"] = 0

    async def one() -> None:
        opened = await attacker.tls_persistently(within=15)
        placed.tick()
        if opened is None:
            return
        seen["held"] += 1
        tcp, stream = opened
        async with tcp:
            with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                while True:
                    await stream.send_all(burst)

    async with trio.open_nursery() as nursery:
        for _ in range(1000):
            nursery.start_soon(one)


async def crlf(attacker: Attacker, in_full_swing: trio.Event, seen: dict[str, Any]) -> None:
    """200 connections that ask once, then send `\\r\\n` every half second; what each
    saw: how long after its answer the node closed it."""
    answered_all = Countdown(200, in_full_swing)
    closed_after: list[float] = seen.setdefault("closed_after", [])

    async def one() -> None:
        opened = await attacker.tls_persistently()
        if opened is None:
            answered_all.tick()
            return
        tcp, stream = opened
        async with tcp:
            await stream.send_all(HEALTH)
            answered = trio.current_time()
            with contextlib.suppress(trio.BrokenResourceError):
                await stream.receive_some(65536)
                answered_all.tick()
                while True:
                    with trio.move_on_after(0.5):
                        if not await stream.receive_some(65536):
                            break
                    await stream.send_all(b"\r\n")
            closed_after.append(round(trio.current_time() - answered, 3))

    async with trio.open_nursery() as nursery:
        for _ in range(200):
            nursery.start_soon(one)


async def flood(attacker: Attacker, in_full_swing: trio.Event, seen: dict[str, Any]) -> None:
    """1,500 connections kept busy with a request a second (so keep-alive does not end
    them), and 20 loops opening and dropping connections as fast as they can."""
    placed = Countdown(1500, in_full_swing)
    seen["held"] = 0

    async def hold() -> None:
        opened = await attacker.tls_persistently(within=15)
        placed.tick()
        if opened is None:
            return
        seen["held"] += 1
        tcp, stream = opened
        async with tcp:
            with contextlib.suppress(trio.BrokenResourceError):
                while True:
                    await stream.send_all(HEALTH)
                    if not await stream.receive_some(65536):
                        return
                    await trio.sleep(1)

    async def churn() -> None:
        while True:
            tcp = await attacker.tcp()
            if tcp is not None:
                await tcp.aclose()
            await trio.lowlevel.checkpoint()

    async with trio.open_nursery() as nursery:
        for _ in range(1500):
            nursery.start_soon(hold)
        for _ in range(20):
            nursery.start_soon(churn)


async def slow_handshakes(
    attacker: Attacker, in_full_swing: trio.Event, seen: dict[str, Any]
) -> None:
    """Waves of 2,000 connections that never finish the TLS handshake: half send
    nothing, half the first half of a ClientHello."""
    hello = _client_hello_prefix()

    async def one(send_half: bool) -> None:
        tcp = await attacker.tcp()
        if tcp is None:
            return
        async with tcp:
            with contextlib.suppress(trio.BrokenResourceError):
                if send_half:
                    await tcp.send_all(hello)
                await tcp.receive_some(65536)  # until the node gives up on us

    while True:
        async with trio.open_nursery() as nursery:
            for n in range(2000):
                nursery.start_soon(one, n % 2 == 0)
                if n % 100 == 0:
                    await trio.lowlevel.checkpoint()
            in_full_swing.set()


def _client_hello_prefix() -> bytes:
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    client = ssl.create_default_context().wrap_bio(incoming, outgoing, server_hostname="x")
    with contextlib.suppress(ssl.SSLWantReadError):
        client.do_handshake()
    hello = outgoing.read()
    return hello[: len(hello) // 2]


async def answer_status(stream: TlsStream, buffer: bytearray) -> int | None:
    """The status of the next answer on `stream`, its body consumed; None once closed."""
    while b"\r\n\r\n" not in buffer:
        chunk = await stream.receive_some(65536)
        if not chunk:
            return None
        buffer += chunk
    head, _, _ = bytes(buffer).partition(b"\r\n\r\n")
    length = re.search(rb"(?im)^content-length: *(\d+)", head)
    end = len(head) + 4 + (int(length.group(1)) if length else 0)
    while len(buffer) < end:
        chunk = await stream.receive_some(65536)
        if not chunk:
            return None
        buffer += chunk
    del buffer[:end]
    return int(head.split(b" ", 2)[1])


FLOOD_ROUNDS = 1000


async def rounds_and_keys(
    attacker: Attacker, in_full_swing: trio.Event, seen: dict[str, Any]
) -> None:
    """50 outsiders, each from an address of its own (each with a rate limit of its own),
    asking as fast as they are answered: gossip naming 1,000 rounds `zzzz_…` that sort
    after every id the cluster makes, round starts naming such rounds, and submits with
    a fresh Idempotency-Key each and a body the schema refuses. What the node answered,
    by status."""
    gossip = post(
        "/rpc/gossip",
        json.dumps(
            {
                "rounds": [
                    {"round_id": f"zzzz_{i:04}", "window_hours": 24} for i in range(FLOOD_ROUNDS)
                ]
            }
        ).encode(),
    )
    statuses: dict[str, int] = seen.setdefault("statuses", {})
    placed = Countdown(50, in_full_swing)
    numbers = itertools.count()

    async def one() -> None:
        opened = await attacker.tls_persistently()
        placed.tick()
        if opened is None:
            return
        tcp, stream = opened
        buffer = bytearray()
        async with tcp:
            with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                while True:
                    n = next(numbers)
                    start = json.dumps({"round_id": f"zzzz_{n % FLOOD_ROUNDS:04}"}).encode()
                    for request in (
                        gossip,
                        post("/rpc/round/start", start, f"idempotency-key: start-{n}"),
                        post("/rpc/submit", b'{"observation": 1}', f"idempotency-key: sub-{n}"),
                    ):
                        await stream.send_all(request)
                        status = await answer_status(stream, buffer)
                        if status is None:
                            return
                        statuses[str(status)] = statuses.get(str(status), 0) + 1

    async with trio.open_nursery() as nursery:
        for _ in range(50):
            nursery.start_soon(one)


async def nothing(attacker: Attacker, in_full_swing: trio.Event, seen: dict[str, Any]) -> None:
    """No attack: the checks alone, after one that ran in the test's own process."""
    in_full_swing.set()
    await trio.sleep_forever()


ATTACKS: dict[str, Attack] = {
    "nothing": nothing,
    "never_read": never_read,
    "crlf": crlf,
    "flood": flood,
    "slow_handshakes": slow_handshakes,
    "rounds_and_keys": rounds_and_keys,
}


async def run(kind: str, attacker: Attacker) -> None:
    seen: dict[str, Any] = {}
    with trio.open_signal_receiver(signal.SIGTERM) as signals:
        async with trio.open_nursery() as nursery:
            in_full_swing = trio.Event()
            nursery.start_soon(ATTACKS[kind], attacker, in_full_swing, seen)
            await in_full_swing.wait()
            print("in full swing", flush=True)
            async for _ in signals:
                break
            nursery.cancel_scope.cancel()
    print(json.dumps(seen), flush=True)


def main() -> None:
    import resource

    kind, port, ca, cert, key = sys.argv[1:]
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(
        resource.RLIMIT_NOFILE, (hard if hard != resource.RLIM_INFINITY else 65536, hard)
    )
    context = ssl.create_default_context(cafile=ca)
    context.load_cert_chain(cert, key)
    trio.run(run, kind, Attacker(int(port), context))


if __name__ == "__main__":
    main()
