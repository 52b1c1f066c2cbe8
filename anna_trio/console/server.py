"""The metrics listener: the console app on hypercorn (`hypercorn.trio.serve`), behind
the capped front door (listener.py).

hypercorn's own limits are set here, with the reasons: at most 16 KiB of a request head
still incomplete (the app refuses any longer head: app.py), keep-alive idle connections
closed after 10 s (Prometheus scrapes every 15 s and reconnects cheaply; an idle slot is
a slot an attacker could hold), a read timeout of 10 s for a body that stalls, at most
16 concurrent HTTP/2 streams per connection (hypercorn speaks h2c when asked), and the
backlog. Body size and the body and response timeouts are the app's (app.py).

hypercorn listens on a pathname Unix socket (not an abstract one: any local process
could connect to that, past the cap) in a directory of its own, made by
`tempfile.mkdtemp` with mode 0700 and removed when `serve` returns or is cancelled. The
directory's permissions are what protect it: other users cannot connect (root and the
daemon's own user can). Every start makes a directory of a fresh name, so one a killed
daemon left behind is never in the way. Under conf/annad.service the directory is in
the unit's private /tmp (`PrivateTmp=true`: writable under `ProtectSystem=strict`,
removed by systemd when the unit stops); elsewhere in $TMPDIR or /tmp.
"""

from __future__ import annotations

import logging
import shutil
import socket
import tempfile
from functools import partial
from pathlib import Path
from typing import Any

import hypercorn.trio
import trio
from hypercorn.config import Config

from .app import MAX_HEAD_BYTES
from .listener import CappedRelay

KEEP_ALIVE_TIMEOUT = 10.0
KEEP_ALIVE_MAX_REQUESTS = 1000
READ_TIMEOUT = 10
H2_MAX_STREAMS = 16
BACKEND_BACKLOG = 128

SOCKET_NAME = "hypercorn.sock"
SOCKET_DIR_PREFIX = "anna-console-"

# hypercorn's "Running on http://unix:…" names the private socket: keep its warnings only.
_hypercorn_log = logging.getLogger("anna.console.hypercorn")
_hypercorn_log.setLevel(logging.WARNING)


def hypercorn_config(backend_fd: int, *, graceful_timeout: float) -> Config:
    """hypercorn serving the already-bound private socket `backend_fd`, within bounds."""
    config = Config()
    config.bind = [f"fd://{backend_fd}"]
    config.backlog = BACKEND_BACKLOG
    config.h11_max_incomplete_size = MAX_HEAD_BYTES
    config.h2_max_header_list_size = MAX_HEAD_BYTES
    config.h2_max_concurrent_streams = H2_MAX_STREAMS
    config.keep_alive_timeout = KEEP_ALIVE_TIMEOUT
    config.keep_alive_max_requests = KEEP_ALIVE_MAX_REQUESTS
    config.read_timeout = READ_TIMEOUT
    config.graceful_timeout = graceful_timeout
    config.include_server_header = False
    config.accesslog = None
    config.errorlog = _hypercorn_log
    return config


class ConsoleServer:
    """Serves `app` on one address until `shutdown()`: hypercorn on a Unix socket in a
    directory only this user can enter, and `front` (the capped relay) on the public
    address."""

    def __init__(self, app: Any, front: CappedRelay, *, graceful_timeout: float) -> None:
        self._app = app
        self._front = front
        self._graceful_timeout = graceful_timeout
        self._stopping = trio.Event()

    async def serve(
        self,
        host: str,
        port: int,
        *,
        task_status: trio.TaskStatus[tuple[str, int]] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Start hypercorn, then open the public address; report it once both are up.
        Returns after `shutdown()`, when hypercorn's grace period and the last
        connection are over."""
        directory = Path(tempfile.mkdtemp(prefix=SOCKET_DIR_PREFIX))
        try:
            path = str(directory / SOCKET_NAME)
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as backend:
                backend.bind(path)
                config = hypercorn_config(backend.detach(), graceful_timeout=self._graceful_timeout)
            async with trio.open_nursery() as nursery:
                await nursery.start(
                    partial(
                        hypercorn.trio.serve,
                        self._app,
                        config,
                        shutdown_trigger=self._stopping.wait,
                    )
                )
                bound = await nursery.start(self._front.serve, host, port, path)
                task_status.started(bound)
        finally:
            shutil.rmtree(directory, ignore_errors=True)

    def shutdown(self) -> None:
        """Stop accepting; hypercorn finishes what is in flight within its grace period."""
        self._front.close()
        self._stopping.set()
