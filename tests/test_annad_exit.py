"""annad maps deliberate errors to their exit codes, also when a nursery wrapped them."""

from __future__ import annotations

from anna_trio._exceptions import ConfigError, StateError
from anna_trio.cli.annad import _deliberate


def test_bare_and_singly_wrapped_errors_keep_their_exit_code() -> None:
    """A ConfigError alone in (nested) exception groups is still exit 78, not 1."""
    error = ConfigError("bad peers.yml")
    assert _deliberate(error) is error
    assert _deliberate(ExceptionGroup("root", [ExceptionGroup("peers", [error])])) is error
    assert _deliberate(error).exit_code == 78  # type: ignore[union-attr]


def test_unexpected_or_several_errors_are_internal() -> None:
    """Anything else, or several errors at once, is an unexpected internal error (exit 1)."""
    assert _deliberate(RuntimeError("bug")) is None
    several = ExceptionGroup("root", [StateError("a"), ConfigError("b")])
    assert _deliberate(several) is None
