"""sd_notify without libsystemd: READY, RELOADING, STOPPING and the watchdog.

systemd hands a `Type=notify` service the address of a unix datagram socket in
`$NOTIFY_SOCKET` (a path, or an abstract name written with a leading `@`) and, when
`WatchdogSec=` is set, the watchdog period in `$WATCHDOG_USEC`. Notifications are
best effort: a daemon must keep running when nobody is listening, so nothing here
raises on a failed send — it logs and reports `False`.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Callable

import trio

log = logging.getLogger(__name__)

READY = "READY=1"
RELOADING = "RELOADING=1"
STOPPING = "STOPPING=1"
WATCHDOG = "WATCHDOG=1"


def _socket_address(raw: str) -> str | bytes:
    """Translate `$NOTIFY_SOCKET` into an address `socket.sendto` accepts."""
    if raw.startswith("@"):
        return b"\0" + raw[1:].encode()
    return raw


def notify(message: str) -> bool:
    """Send one notification to systemd; True when it was handed to the socket.

    False, without raising, when `$NOTIFY_SOCKET` is unset (not run by systemd) or the
    send fails (logged as a warning).
    """
    raw = os.environ.get("NOTIFY_SOCKET", "")
    if not raw:
        return False
    if not raw.startswith(("/", "@")):
        log.warning("NOTIFY_SOCKET=%r is neither a path nor an abstract name; not notifying", raw)
        return False
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.setblocking(False)
            sock.sendto(message.encode(), _socket_address(raw))
    except OSError as exc:
        log.warning("systemd notification %r to %s failed: %s", message, raw, exc)
        return False
    return True


def watchdog_interval() -> float | None:
    """Seconds between watchdog pings (half of `$WATCHDOG_USEC`), or None if no watchdog.

    None as well when `$WATCHDOG_PID` names another process (the watchdog is not ours)
    or either variable is not a positive integer.
    """
    raw_usec = os.environ.get("WATCHDOG_USEC", "")
    raw_pid = os.environ.get("WATCHDOG_PID", "")
    try:
        usec = int(raw_usec)
        if raw_pid and int(raw_pid) != os.getpid():
            return None
    except ValueError:
        return None
    if usec <= 0:
        return None
    return usec / 2 / 1_000_000


async def watchdog_loop(
    is_healthy: Callable[[], bool],
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Ping `WATCHDOG=1` every `watchdog_interval()` seconds while `is_healthy()` holds.

    Returns at once when there is no watchdog. While `is_healthy()` is False no ping is
    sent, so a wedged daemon is killed and restarted by systemd instead of limping on.
    """
    interval = watchdog_interval()
    task_status.started()
    if interval is None:
        return
    while True:
        if is_healthy():
            notify(WATCHDOG)
        else:
            log.warning("health check failed; withholding systemd watchdog ping")
        await trio.sleep(interval)
