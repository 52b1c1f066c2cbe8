"""Who may hold a connection to the server: pure bookkeeping, no I/O, no clock.

Connections are counted in total, per source address and by class. A *trusted*
connection (a validator's: known before the TLS handshake by its address, after it by
its certificate's CN) may take any slot up to `max_connections`; the others stop
`validator_connection_reserve` short of it and at `max_connections_per_address` for
one address, so outsiders, from however many addresses, cannot take the slots the
peers need. TLS handshakes in progress from outsiders are bounded on their own
(`max_pending_handshakes`): each holds an SSL object, and a slow one holds it for the
whole handshake timeout.

The limits are read at each decision, so a reload applies to the next connection;
connections already open are never closed by a lower limit.
"""

from __future__ import annotations

import collections
import enum
from typing import Protocol

import attrs

__all__ = ["AdmissionLimits", "ConnectionTable", "Counts", "Refusal", "Slot"]


class AdmissionLimits(Protocol):
    """The settings the table reads (peers.yml `limits:` in annad)."""

    @property
    def max_connections(self) -> int: ...
    @property
    def max_connections_per_address(self) -> int: ...
    @property
    def validator_connection_reserve(self) -> int: ...
    @property
    def max_pending_handshakes(self) -> int: ...


class Refusal(enum.Enum):
    """Why a connection was closed unserved; the value is a metric label."""

    CONNECTIONS = "connection_limit"
    ADDRESS = "address_limit"
    HANDSHAKES = "handshake_limit"


@attrs.define(eq=False)
class Slot:
    """One admitted connection, until `ConnectionTable.release`."""

    address: str
    trusted: bool
    handshaking: bool


@attrs.frozen
class Counts:
    """A snapshot of the table, for metrics and tests."""

    trusted: int
    others: int
    handshakes: int  # in progress, from either class


class ConnectionTable:
    """Open connections by class and address; decides who may open one more."""

    def __init__(self) -> None:
        self._trusted = 0
        self._others = 0
        self._handshakes = {True: 0, False: 0}  # by trusted: only outsiders' are bounded
        self._per_address: collections.Counter[str] = collections.Counter()

    def statistics(self) -> Counts:
        return Counts(self._trusted, self._others, sum(self._handshakes.values()))

    def admit(
        self, address: str, *, trusted: bool, handshake: bool, limits: AdmissionLimits
    ) -> Slot | Refusal:
        """A slot for a new connection from `address`, or why there is none. With
        `handshake`, the slot is in a TLS handshake until `handshake_done`."""
        if self._trusted + self._others >= limits.max_connections:
            return Refusal.CONNECTIONS
        if not trusted:
            refusal = self._outsider_refusal(address, limits)
            if refusal is not None:
                return refusal
            if handshake and self._handshakes[False] >= limits.max_pending_handshakes:
                return Refusal.HANDSHAKES
        slot = Slot(address, trusted, handshake)
        self._add(slot)
        return slot

    def handshake_done(
        self, slot: Slot, *, trusted: bool, limits: AdmissionLimits
    ) -> Refusal | None:
        """The handshake of `slot` finished and told who the peer is: the slot moves to
        that class, or the connection must close (an outsider from a validator's address
        past the outsiders' limits). The slot stays held until `release` either way."""
        self._remove(slot)
        slot.handshaking = False
        refusal = None
        if slot.trusted and not trusted:
            refusal = self._outsider_refusal(slot.address, limits)
        if refusal is None:
            slot.trusted = trusted
        self._add(slot)
        return refusal

    def release(self, slot: Slot) -> None:
        self._remove(slot)

    def _outsider_refusal(self, address: str, limits: AdmissionLimits) -> Refusal | None:
        if self._others >= limits.max_connections - limits.validator_connection_reserve:
            return Refusal.CONNECTIONS
        if self._per_address[address] >= limits.max_connections_per_address:
            return Refusal.ADDRESS
        return None

    def _add(self, slot: Slot) -> None:
        self._handshakes[slot.trusted] += slot.handshaking
        if slot.trusted:
            self._trusted += 1
        else:
            self._others += 1
            self._per_address[slot.address] += 1

    def _remove(self, slot: Slot) -> None:
        self._handshakes[slot.trusted] -= slot.handshaking
        if slot.trusted:
            self._trusted -= 1
        else:
            self._others -= 1
            self._per_address[slot.address] -= 1
            if not self._per_address[slot.address]:
                del self._per_address[slot.address]
