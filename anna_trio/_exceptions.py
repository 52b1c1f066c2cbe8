"""Errors anna_trio raises on purpose.

    AnnaError
    ├── ConfigError          configuration invalid (exit 78 at start-up)
    ├── StateError           state file unreadable, corrupt or too new (exit 65)
    ├── MigrationRolledBack  verification failed, v1 restored (exit 78)
    ├── LockHeldError        another process holds the state-dir lock (exit 78)
    ├── ObservationError     an observation failed validation (HTTP 422)
    ├── PeerError            a peer could not be reached or answered badly
    ├── NodeHalted           a decision could not be made durable (exit 1)
    └── FailpointError       an armed `error` failpoint fired

Library errors are translated at the boundary with ``raise ... from exc``.
"""

from __future__ import annotations


class AnnaError(Exception):
    """Base of every error anna_trio raises deliberately."""

    exit_code = 1


class ConfigError(AnnaError, ValueError):
    """Raised when settings or peers.yml are invalid; carries every problem found."""

    exit_code = 78

    def __init__(self, message: str, problems: list[str] | None = None) -> None:
        super().__init__(message)
        self.problems = problems or [message]


class StateError(AnnaError):
    """Raised when state.json is unparseable or written by a newer schema."""

    exit_code = 65


class MigrationRolledBack(AnnaError):
    """Raised after a failed migration verification restored the v1 state."""

    exit_code = 78


class LockHeldError(AnnaError):
    """Raised when another process holds the state-dir lock."""

    exit_code = 78


class ObservationError(AnnaError, ValueError):
    """Raised when an observation does not match SPEC §3."""


class PeerError(AnnaError, OSError):
    """Raised when a peer cannot be reached, times out or answers garbage."""


class NodeHalted(AnnaError):
    """Raised in the node's own task when a decision's commit, audit entries and
    broadcasts could not all be carried out: the node stops rather than run on with a
    decision whose audit entry is missing (fail-stop, as etcd does on a WAL error)."""


class FailpointError(AnnaError):
    """Raised by a failpoint armed with the `error` action."""
