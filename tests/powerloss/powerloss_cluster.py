"""A testnet whose node directories each sit on a LazyFS mount of their own.

A testnet node directory is the node's whole state dir: state.json, node.db, keys, the
audit log, the pid file. `testnet.init` writes them on the real disk; each directory is
then moved to `disk/nodeN` and mounted back at its place through LazyFS, so what init
wrote is durable and whatever annad writes afterwards survives a power cut only once
fsynced. annad.log is a symlink (made on the disk) to `logs/nodeN.log` outside the
mount: the node's log, unlike its state, must outlive the cut to explain a failure.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import trio
from lazyfs import Mount

from _launch import LiveCluster
from anna_trio import testnet

ROUND_TIMEOUT = 2.0


class PowerLossCluster(LiveCluster):
    """LiveCluster plus one LazyFS mount per node and the power cut."""

    def __init__(self, directory: Path, count: int, lazyfs: Path) -> None:
        layout = testnet.free_layout(directory / "testnet", count, round_timeout=ROUND_TIMEOUT)
        testnet.init(layout)
        super().__init__(layout)
        self.logs = directory / "logs"
        self.logs.mkdir()
        self.mounts: dict[int, Mount] = {}
        for ep in layout.endpoints:
            node_dir = layout.node_dir(ep.n)
            disk = directory / "disk" / node_dir.name
            disk.parent.mkdir(exist_ok=True)
            os.rename(node_dir, disk)
            log = self.logs / f"{node_dir.name}.log"
            log.touch()
            os.symlink(log, disk / "annad.log")
            self.mounts[ep.n] = Mount(lazyfs, disk, node_dir, directory / "lazyfs" / node_dir.name)

    def disk(self, n: int) -> Path:
        """Node n's directory on the real disk, under LazyFS: write here before mounting."""
        return self.mounts[n].backing

    def audit_log(self, n: int) -> Path:
        return self.layout.node_dir(n) / "audit.jsonl"

    def power_cut(self, n: int) -> int:
        """kill -9 node n (when it is not dead already), then drop every byte it wrote
        and never fsynced. Returns its exit status."""
        status = self.kill(n)
        self.mounts[n].clear_cache()
        return status

    async def restart(self, n: int) -> str | None:
        """Start node n again: None once it is ready, else why not — it exited (a state
        it cannot read exits at once: no waiting out the ready timeout) or never got
        ready — with its log's tail."""
        self.start(n)
        process = self.processes[n]
        failure: str | None = None

        async def ready(scope: trio.CancelScope) -> None:
            nonlocal failure
            try:
                await self.wait_ready(n)
            except RuntimeError as exc:
                failure = str(exc)
            scope.cancel()

        async def exited(scope: trio.CancelScope) -> None:
            nonlocal failure
            while process.poll() is None:  # noqa: ASYNC110 - a child process has no event
                await trio.sleep(0.05)
            failure = f"annad exited with status {process.returncode}"
            del self.processes[n]
            scope.cancel()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(ready, nursery.cancel_scope)
            nursery.start_soon(exited, nursery.cancel_scope)
        return None if failure is None else f"{failure}:\n{self.log_tail(n)}"

    def pause(self, n: int) -> None:
        """SIGSTOP: node n stops answering, so a restarted peer cannot refill from it."""
        self.signal(n, signal.SIGSTOP)

    def resume(self, n: int) -> None:
        self.signal(n, signal.SIGCONT)

    def mount_all(self) -> None:
        for mount in self.mounts.values():
            mount.mount()

    def close(self) -> dict[int, int]:
        """Stop every annad (SIGTERM, then SIGKILL), then unmount: always, in this order."""
        try:
            return self.stop_all()
        finally:
            for mount in self.mounts.values():
                mount.unmount()


@contextmanager
def power_loss_cluster(directory: Path, count: int, lazyfs: Path) -> Iterator[PowerLossCluster]:
    """A cluster not mounted yet (write to `disk(n)`, then `mount_all()`), always
    stopped and unmounted at the end, even after a failure."""
    cluster = PowerLossCluster(directory, count, lazyfs)
    try:
        yield cluster
    finally:
        cluster.close()
