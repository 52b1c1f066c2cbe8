"""What a batch of engine events means for the node, decided in pure code.

`effects_of` turns the events the engine returned into an `Effects` value: the rows to
commit, the audit entries to write, what to tell the peers, the metrics to move and the
node's own bookkeeping (signing, relays, timers). The node applies it in one place, so
that the durable part — commit, audit, broadcast — happens together or the node exits.
"""

from __future__ import annotations

import collections
from collections.abc import Callable, Container, Iterable
from typing import Any

import attrs

from . import crypto
from .consensus import COMPLETE, PENDING
from .consensus import events as ev
from .models import Observation
from .store import Statement, Store
from .wire import evidence_json


@attrs.frozen
class Broadcast:
    kind: str  # "rounds", "observations" or "evidence"
    item: dict[str, Any]
    exclude: tuple[str, ...] = ()


@attrs.frozen
class AuditEntry:
    event: str
    fields: dict[str, Any]


@attrs.frozen
class LogLine:
    warning: bool
    message: str
    args: tuple[Any, ...]


@attrs.define
class Effects:
    """Everything one batch of events asks of the node."""

    statements: list[Statement] = attrs.Factory(list)
    audits: list[AuditEntry] = attrs.Factory(list)
    broadcasts: list[Broadcast] = attrs.Factory(list)
    observation_results: collections.Counter[str] = attrs.Factory(collections.Counter)
    completed_durations: list[float] = attrs.Factory(list)  # rounds Complete for the first time
    completed_tis: list[tuple[str, float]] = attrs.Factory(list)  # for the average TIS
    rounds_failed: int = 0
    byzantine_changed: bool = False
    sign: list[tuple[str, int]] = attrs.Factory(list)  # (round, window): sign our own once
    watch: list[str] = attrs.Factory(list)  # newly opened rounds: check later they are not stuck
    relay: list[Observation] = attrs.Factory(list)  # to hold for relaying
    release_relays: list[str] = attrs.Factory(list)  # closed rounds: held relays go now
    forget: list[str] = attrs.Factory(list)  # rounds the engine pruned
    state_dirty: bool = False
    logs: list[LogLine] = attrs.Factory(list)

    @property
    def durable(self) -> bool:
        """Whether there is anything to commit, audit or broadcast."""
        return bool(self.statements or self.audits or self.broadcasts)


def effects_of(
    events: Iterable[ev.Event],
    *,
    node_id: str,
    relaying: Container[str],
    learned_at: float,
    status_of: Callable[[str], str | None],
) -> Effects:
    """The meaning of `events` (in order). `relaying` holds the rounds this node started
    and relays for, `learned_at` is the wall time rounds opened now are stored with,
    `status_of` reads the engine's round status after the events."""
    out = Effects()
    for event in events:
        _effect(event, out, node_id, relaying, learned_at, status_of)
    return out


def _effect(
    event: ev.Event,
    out: Effects,
    node_id: str,
    relaying: Container[str],
    learned_at: float,
    status_of: Callable[[str], str | None],
) -> None:
    match event:
        case ev.RoundPruned(round_id=round_id):
            out.forget.append(round_id)
        case ev.RoundOpened(round_id=round_id, window_hours=window):
            out.statements.append(Store.round_stmt(round_id, window, learned_at))
            out.sign.append((round_id, window))
            out.watch.append(round_id)
        case ev.Accepted(obs=obs):
            out.observation_results["accepted"] += 1
            if obs.node_id != node_id:  # ours was written when it was signed
                out.statements.append(Store.observation_stmt(obs, crypto.observation_digest(obs)))
                if obs.round_id in relaying:
                    out.relay.append(obs)
                    if status_of(obs.round_id) != PENDING:
                        out.release_relays.append(obs.round_id)
        case ev.Duplicate():
            out.observation_results["duplicate"] += 1
        case ev.NotAValidator():
            out.observation_results["unknown_node"] += 1
        case ev.ConflictDetected(evidence=evidence):
            out.statements.append(Store.evidence_stmt(evidence))
            out.observation_results["conflict"] += 1
            out.broadcasts.append(Broadcast("evidence", evidence_json(evidence)))
        case ev.ByzantineDetected(record=record, first_time=first):
            out.byzantine_changed = out.state_dirty = True
            if first:
                out.logs.append(
                    LogLine(
                        True,
                        "byzantine node detected: %s (%s) in round %s",
                        (record.node_id, record.reason, record.round_id),
                    )
                )
                out.audits.append(
                    AuditEntry(
                        "byzantine_detected",
                        {
                            "byzantine_node": record.node_id,
                            "reason": record.reason,
                            "round_id": record.round_id,
                        },
                    )
                )
        case ev.ByzantineCleared(node_id=cleared):
            out.byzantine_changed = out.state_dirty = True
            out.logs.append(
                LogLine(
                    True,
                    "byzantine mark on %s cleared: late rounds broke its deviation window",
                    (cleared,),
                )
            )
        case ev.RoundCompleted(round_id=round_id, result=result, first_time=first, duration=dur):
            out.release_relays.append(round_id)
            out.state_dirty = True
            if first:
                out.completed_durations.append(dur)
                out.logs.append(
                    LogLine(
                        False,
                        "consensus reached for %s: tis=%s quorum met with %d nodes",
                        (round_id, result.consensus_tis, len(result.participating_nodes)),
                    )
                )
            if result.consensus_tis is not None:
                out.completed_tis.append((round_id, result.consensus_tis))
        case ev.ResultChanged(round_id=round_id, result=result):
            if status_of(round_id) == COMPLETE and result.consensus_tis is not None:
                out.completed_tis.append((round_id, result.consensus_tis))
        case ev.RoundFailed(round_id=round_id):
            out.release_relays.append(round_id)
            out.rounds_failed += 1
            out.logs.append(
                LogLine(
                    True,
                    "round %s failed: quorum not reached before the round timeout",
                    (round_id,),
                )
            )
        case _:
            pass
