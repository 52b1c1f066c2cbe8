"""sd_notify against a real unix datagram socket, as systemd would listen on it."""

from __future__ import annotations

import os
import socket
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio
import trio.testing
from hypothesis import given
from hypothesis import strategies as st

from anna_trio import systemd


@pytest.fixture
def notify_socket(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[socket.socket]:
    """A bound, non-blocking datagram socket named by $NOTIFY_SOCKET."""
    path = tmp_path / "n.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(path))
        sock.setblocking(False)
        monkeypatch.setenv("NOTIFY_SOCKET", str(path))
        monkeypatch.delenv("WATCHDOG_USEC", raising=False)
        monkeypatch.delenv("WATCHDOG_PID", raising=False)
        yield sock


def received(sock: socket.socket) -> list[str]:
    """Every datagram waiting on the socket, decoded."""
    messages = []
    while True:
        try:
            messages.append(sock.recv(4096).decode())
        except BlockingIOError:
            return messages


@pytest.mark.parametrize("message", [systemd.READY, systemd.RELOADING, systemd.STOPPING])
def test_notify_delivers_message_to_path_socket(notify_socket: socket.socket, message: str) -> None:
    """Each lifecycle message arrives verbatim on the socket systemd named."""
    assert systemd.notify(message) is True
    assert received(notify_socket) == [message]


def test_notify_supports_abstract_socket(monkeypatch: pytest.MonkeyPatch) -> None:
    """An '@name' NOTIFY_SOCKET addresses the abstract socket '\\0name'."""
    name = f"anna-test-{uuid.uuid4().hex}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(b"\0" + name.encode())
        sock.setblocking(False)
        monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
        assert systemd.notify(systemd.READY) is True
        assert received(sock) == [systemd.READY]


def test_notify_without_socket_returns_false(monkeypatch: pytest.MonkeyPatch) -> None:
    """Not run by systemd: nothing is sent and the call says so."""
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert systemd.notify(systemd.READY) is False


def test_notify_to_missing_socket_logs_and_returns_false(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A socket that nobody listens on is a logged warning, never an exception."""
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "gone.sock"))
    assert systemd.notify(systemd.STOPPING) is False
    assert "STOPPING=1" in caplog.text


def test_notify_rejects_relative_socket_name(monkeypatch: pytest.MonkeyPatch) -> None:
    """A NOTIFY_SOCKET that is neither absolute nor abstract is ignored."""
    monkeypatch.setenv("NOTIFY_SOCKET", "relative.sock")
    assert systemd.notify(systemd.READY) is False


def test_watchdog_interval_is_half_the_period(monkeypatch: pytest.MonkeyPatch) -> None:
    """WATCHDOG_USEC=30s means a ping every 15 s."""
    monkeypatch.setenv("WATCHDOG_USEC", "30000000")
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    assert systemd.watchdog_interval() == 15.0


def test_watchdog_interval_honours_own_pid(monkeypatch: pytest.MonkeyPatch) -> None:
    """WATCHDOG_PID naming this process keeps the watchdog."""
    monkeypatch.setenv("WATCHDOG_USEC", "2000000")
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    assert systemd.watchdog_interval() == 1.0


def test_watchdog_interval_ignores_other_pid(monkeypatch: pytest.MonkeyPatch) -> None:
    """WATCHDOG_PID naming another process means the watchdog is not ours."""
    monkeypatch.setenv("WATCHDOG_USEC", "2000000")
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid() + 1))
    assert systemd.watchdog_interval() is None


ENV_TEXT = st.text(
    alphabet=st.characters(blacklist_categories=["Cs"], blacklist_characters="\0"), max_size=8
)


@given(raw=st.one_of(st.sampled_from(["", "0", "-5", "1.5", "abc"]), ENV_TEXT))
def test_watchdog_interval_none_unless_positive_integer(raw: str) -> None:
    """Anything but a positive integer in WATCHDOG_USEC disables the watchdog."""
    try:
        expected = int(raw) / 2e6 if int(raw) > 0 else None
    except ValueError:
        expected = None
    with pytest.MonkeyPatch.context() as monkeypatch:
        monkeypatch.setenv("WATCHDOG_USEC", raw)
        monkeypatch.delenv("WATCHDOG_PID", raising=False)
        assert systemd.watchdog_interval() == expected


async def test_watchdog_loop_returns_at_once_without_watchdog(
    notify_socket: socket.socket, autojump_clock: trio.testing.MockClock
) -> None:
    """No WATCHDOG_USEC: the loop reports started, returns, and sends nothing."""
    start = trio.current_time()
    async with trio.open_nursery() as nursery:
        await nursery.start(systemd.watchdog_loop, lambda: True)
    assert trio.current_time() == start
    assert received(notify_socket) == []


async def test_watchdog_loop_pings_every_half_period(
    notify_socket: socket.socket,
    monkeypatch: pytest.MonkeyPatch,
    autojump_clock: trio.testing.MockClock,
) -> None:
    """With a 10 s watchdog, a healthy daemon pings at 0, 5, 10, 15 and 20 s."""
    monkeypatch.setenv("WATCHDOG_USEC", "10000000")
    with trio.move_on_after(22):
        await systemd.watchdog_loop(lambda: True)
    assert received(notify_socket) == [systemd.WATCHDOG] * 5


async def test_watchdog_loop_withholds_pings_while_unhealthy(
    notify_socket: socket.socket,
    monkeypatch: pytest.MonkeyPatch,
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Pings stop while is_healthy() is False and resume when it holds again."""
    monkeypatch.setenv("WATCHDOG_USEC", "2000000")
    checked_at: list[float] = []

    def wedged_between_2_and_4_seconds() -> bool:
        checked_at.append(trio.current_time())
        return not 2 <= trio.current_time() < 4

    with trio.move_on_after(5.5):
        await systemd.watchdog_loop(wedged_between_2_and_4_seconds)
    assert checked_at == [0, 1, 2, 3, 4, 5]
    assert received(notify_socket) == [systemd.WATCHDOG] * 4
