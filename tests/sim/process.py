"""One simulated annad process: the gate every side effect of an incarnation passes.

A kill in the simulator is kill -9: the process's tasks are cancelled, but Trio lets
shielded steps (a commit, its audit entries) run on. A real process would not get to
finish them, so every way out of a process — its disk writes and syncs, audit-log and
reservation writes, requests and answers on the network — checks `alive` first, and
what a dead process does after the kill reaches nothing.
"""

from __future__ import annotations

import contextvars
from collections.abc import Callable

import trio

current_node: contextvars.ContextVar[str] = contextvars.ContextVar("sim_node", default="sim")
"""Which node the running task works for (tasks inherit it): labels the trace's log lines."""


class Process:
    """An incarnation of a node; `number` counts from 0 for each node."""

    def __init__(self, node_id: str, number: int) -> None:
        self.node_id = node_id
        self.number = number
        self.alive = True

    def __repr__(self) -> str:
        return f"{self.node_id}#{self.number}"

    def kill(self) -> None:
        self.alive = False

    async def run_blocking(self, work: Callable[[], object]) -> object:
        """The node's BlockingRunner: inline on the Trio thread, where the autojump clock
        sees it finish (a worker thread looks idle to it); skipped once the process is
        dead. It yields first, as a hand-off to a worker thread does."""
        await trio.lowlevel.checkpoint()
        if not self.alive:
            return None
        return work()
