"""Named failpoints, armed by ANNA_FAILPOINTS at start or HTTP at run time (gofail's model).

A failpoint is a named hook at a durable step. Unarmed it costs one dict lookup.
Actions: ``off``, ``error`` (raise FailpointError), ``exit`` (SIGKILL ourselves, as
kill -9 would), ``sleep(MS)``, ``corrupt`` (the caller damages what it just wrote).
"""

from __future__ import annotations

import os
import re
import signal
import time

import attrs
import trio

from ._exceptions import ConfigError, FailpointError

NAMES: tuple[str, ...] = (
    "migrate.after_backup",
    "migrate.after_checksum",
    "migrate.after_load",
    "migrate.after_convert",
    "migrate.after_save_v2",
    "migrate.after_verify",
    "migrate.after_replace",
    "migrate.after_audit",
    "observation.before_sign",
    "observation.before_send",
    "store.before_commit",
    "store.after_commit",
    "store.after_sync",
    "audit.before_append",
    "rpc.before_reply",
)
_ACTION_RE = re.compile(r"^(off|error|exit|corrupt|sleep\((\d{1,7})\))$")


@attrs.frozen
class Action:
    kind: str
    sleep_ms: int = 0


_armed: dict[str, Action] = {}


def parse_action(text: str) -> Action:
    match = _ACTION_RE.fullmatch(text.strip())
    if not match:
        raise ConfigError(
            f"failpoint action {text.strip()!r}: expected off, error, exit, corrupt or sleep(MS)"
        )
    if match.group(2) is not None:
        return Action("sleep", int(match.group(2)))
    return Action(match.group(1))


def arm(name: str, action_text: str) -> None:
    if name not in NAMES:
        raise ConfigError(f"unknown failpoint {name!r}; known: {', '.join(NAMES)}")
    action = parse_action(action_text)
    if action.kind == "off":
        _armed.pop(name, None)
    else:
        _armed[name] = action


def disarm(name: str) -> None:
    _armed.pop(name, None)


def armed() -> dict[str, str]:
    return {
        name: (f"sleep({a.sleep_ms})" if a.kind == "sleep" else a.kind)
        for name, a in _armed.items()
    }


def load_from_env(spec: str | None) -> None:
    """Arm `name=action;name2=action` (the ANNA_FAILPOINTS format); ConfigError on junk."""
    _armed.clear()
    for item in (spec or "").split(";"):
        if not item.strip():
            continue
        name, sep, action = item.partition("=")
        if not sep:
            raise ConfigError(f"ANNA_FAILPOINTS: {item!r} is not name=action")
        arm(name.strip(), action)


def _fire_common(name: str, action: Action) -> bool:
    if action.kind == "error":
        raise FailpointError(f"failpoint {name} fired (error)")
    if action.kind == "exit":
        os.kill(os.getpid(), signal.SIGKILL)
    return action.kind == "corrupt"


def hit(name: str) -> bool:
    """Synchronous hook (for code running before Trio or in a worker thread).

    Returns True when the caller should corrupt what it just wrote.
    """
    action = _armed.get(name)
    if action is None:
        return False
    if action.kind == "sleep":
        time.sleep(action.sleep_ms / 1000)
        return False
    return _fire_common(name, action)


async def hit_async(name: str) -> bool:
    """The same hook inside Trio: `sleep(MS)` is a trio.sleep."""
    action = _armed.get(name)
    if action is None:
        return False
    if action.kind == "sleep":
        await trio.sleep(action.sleep_ms / 1000)
        return False
    return _fire_common(name, action)
