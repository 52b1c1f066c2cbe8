"""This node's own signed observation per round: the invariant that keeps it honest.

A node that signs two different observations for one round is Byzantine, and every
node that sees both says so. So for each round this node:

- signs at most once, ever: the signed observation is kept (the store's `own` table)
  and is the one answer for that round from then on, across restarts and power cuts;
- makes it durable before it leaves the process in any way (CometBFT's sign-state
  rule): `sign_once` returns only after `persist` — the store's fsynced commit —
  returned, and until then the observation exists nowhere but here;
- hands it to exactly one way out: carried back in the answer to the message that
  claimed the round (a gossip push, a round start), or broadcast to every peer.
"""

from __future__ import annotations

import contextlib
from collections.abc import Awaitable, Callable, Iterator
from datetime import UTC, datetime

import attrs
import trio
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from . import crypto, failpoints
from .audit import AuditIdAllocator
from .models import Observation, ObservationContent, format_utc
from .seams import Clock, Observer


class Claim:
    """Own observations claimed for one message: released into it instead of broadcast."""

    def __init__(self, asker: str | None) -> None:
        self.asker = asker
        self.carried: dict[str, Observation] = {}
        self.changed = trio.Event()

    def carry(self, obs: Observation) -> None:
        self.carried[obs.round_id] = obs
        self.changed.set()


class OwnObservations:
    """Signing, keeping and releasing this node's observations, one per round."""

    def __init__(
        self,
        *,
        node_id: str,
        key: Ed25519PrivateKey,
        ids: AuditIdAllocator,
        observer: Observer,
        clock: Clock,
        stored: Callable[[str], Observation | None],
        persist: Callable[[Observation], Awaitable[None]],
    ) -> None:
        self._node_id = node_id
        self._key = key
        self._ids = ids
        self._observer = observer
        self._clock = clock
        self._stored = stored  # the signed row of a round that left memory
        self._persist = persist
        self._signed: dict[str, Observation] = {}
        self._begun: set[str] = set()
        # Round ids up to this may have a signed row on disk that `_signed` lacks (older
        # than what start-up loaded, or pruned since): only those need the store.
        self._on_disk_through = ""
        self._claims: dict[str, Claim] = {}

    def restore(self, signed: dict[str, Observation], on_disk_through: str) -> None:
        self._signed = dict(signed)
        self._on_disk_through = on_disk_through

    def restored(self) -> list[Observation]:
        """What start-up loaded, oldest round first: to be re-sent as it was."""
        return [self._signed[round_id] for round_id in sorted(self._signed)]

    def begin(self, round_id: str) -> bool:
        """Whether this round's signing is still to start (True once per round in memory)."""
        if round_id in self._begun:
            return False
        self._begun.add(round_id)
        return True

    def begun(self, round_id: str) -> bool:
        return round_id in self._begun

    def forget(self, round_id: str) -> None:
        """The engine pruned the round; the store keeps the signed row, so opening it
        again reuses that row and cannot lead to signing the round twice."""
        if self._signed.pop(round_id, None) is not None:
            self._on_disk_through = max(self._on_disk_through, round_id)
        self._begun.discard(round_id)

    async def sign_once(self, round_id: str, window_hours: int) -> Observation | None:
        """The round's observation: the one signed before, or a new one, durable before
        this returns. None when the observer cannot contribute to this round."""
        obs = self._signed.get(round_id)
        if obs is None and round_id <= self._on_disk_through:
            obs = self._stored(round_id)
        if obs is None:
            await failpoints.hit_async("observation.before_sign")
            measurement = await self._observer.measure(round_id, window_hours)
            if measurement is None:
                return None
            content = ObservationContent(
                node_id=self._node_id,
                audit_id=await self._ids.next_async(),
                round_id=round_id,
                window_hours=window_hours,
                timestamp=format_utc(datetime.fromtimestamp(self._clock.wall(), UTC)),
                **attrs.asdict(measurement, recurse=False),
            )
            obs = crypto.sign_observation(self._key, content)
            await self._persist(obs)
        self._signed[round_id] = obs
        return obs

    # --- one way out -----------------------------------------------------------------

    @contextlib.contextmanager
    def claim(
        self, round_ids: list[str], asker: str | None, *, released: Callable[[str], bool]
    ) -> Iterator[Claim]:
        """Claim the not yet released observations of these rounds for one message,
        before anything could sign them, so none is both broadcast and carried.
        `released` says whether the round's observation is already out."""
        claim = Claim(asker)
        claimed = [
            round_id
            for round_id in dict.fromkeys(round_ids)
            if round_id not in self._claims and not released(round_id)
        ]
        for round_id in claimed:
            self._claims[round_id] = claim
        try:
            yield claim
        finally:
            for round_id in claimed:
                if self._claims.get(round_id) is claim:
                    del self._claims[round_id]

    def release_to(self, round_id: str) -> Claim | None:
        """The claim waiting for this round's observation, which now carries it; None
        when no message claimed it (then it is broadcast)."""
        return self._claims.pop(round_id, None)

    def abandon(self, round_id: str) -> None:
        """No observation will come for this round (the observer could not measure)."""
        claim = self._claims.pop(round_id, None)
        if claim is not None:
            claim.changed.set()

    async def wait_for(self, claim: Claim, round_ids: list[str]) -> None:
        """Until every claimed round being signed now is carried (callers bound it)."""
        while any(
            self._claims.get(round_id) is claim and round_id in self._begun
            for round_id in round_ids
        ):
            await claim.changed.wait()
            claim.changed = trio.Event()
