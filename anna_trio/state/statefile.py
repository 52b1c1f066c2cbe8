"""The v2 state.json kept current (SPEC §5): after every completed round and reload.

Every write replaces the whole file atomically. Blocking: the daemon calls `update`
through ``trio.to_thread.run_sync``; a lock serialises concurrent updaters.
"""

from __future__ import annotations

import copy
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import attrs

from .._exceptions import StateError
from ..audit import utc_now_rfc3339
from ..durable import atomic_write_bytes
from .migration import STATE_NAME
from .schema import encode_state, parse_state, state_version, validate_v2


class StateFile:
    """The node's v2 state document and its file. Load it after `migrate_state`."""

    def __init__(
        self, path: Path, data: dict[str, Any], now: Callable[[], str] = utc_now_rfc3339
    ) -> None:
        self.path = path
        self._data = data
        self._now = now
        self._lock = threading.Lock()

    @classmethod
    def load(cls, state_dir: Path, *, now: Callable[[], str] = utc_now_rfc3339) -> StateFile:
        """Read state.json; StateError unless it is a valid v2 state."""
        path = state_dir / STATE_NAME
        try:
            raw = path.read_bytes()
        except OSError as exc:
            raise StateError(f"cannot read {path}: {exc.strerror}") from exc
        data = parse_state(raw)
        if state_version(data) != 2:
            raise StateError(f"{path} is still v1; run the migration first")
        return cls(path, data, now)

    @property
    def data(self) -> dict[str, Any]:
        """A copy of the current document (mutate it only through `update`)."""
        with self._lock:
            return copy.deepcopy(self._data)

    def update(self, changes: Callable[[dict[str, Any]], None]) -> None:
        """Apply ``changes`` to a copy, stamp updated_at, validate and write atomically.

        If ``changes`` raises or the result is not valid v2, nothing is written.
        """
        with self._lock:
            updated = copy.deepcopy(self._data)
            changes(updated)
            updated["updated_at"] = self._now()
            validate_v2(updated)
            atomic_write_bytes(self.path, encode_state(updated))
            self._data = updated


@attrs.frozen
class StateSnapshot:
    """What the node's state.json says about its rounds and network, taken at one moment."""

    validator_count: int
    rounds_completed: int
    last_round_id: str | None
    last_round_at: str | None
    byzantine_nodes: list[str]
    peer_count: int
    last_peer_reload: str | None
    tls_enabled: bool

    def update_into(self, state: dict[str, Any]) -> None:
        consensus = state.setdefault("consensus", {})
        consensus.update(
            validator_count=self.validator_count,
            rounds_completed=self.rounds_completed,
            byzantine_nodes=self.byzantine_nodes,
        )
        if self.last_round_id is not None:
            consensus.update(last_round_id=self.last_round_id, last_round_at=self.last_round_at)
        network = state.setdefault("network", {})
        network.update(peer_count=self.peer_count, tls_enabled=self.tls_enabled)
        if self.last_peer_reload is not None:
            network["last_peer_reload"] = self.last_peer_reload
