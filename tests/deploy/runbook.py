"""The runbooks as the tests' script: shell blocks of a Markdown section, command by command.

A section is a heading and everything up to the next heading of the same or a higher
level; its ```sh blocks are what an operator types. `ShellBlock.commands` cuts a block
into the commands a person would paste one at a time: a line, or several joined by a
trailing backslash or pipe, a here-document or a loop — whatever bash needs to see whole.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import attrs

_FENCE = re.compile(r"^```(\w*)\s*$")
_HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*$")
_HEREDOC = re.compile(r"<<-?\s*(['\"]?)(\w+)\1")


class RunbookError(Exception):
    """The runbook does not have the section or block a test follows."""


@attrs.frozen
class ShellBlock:
    path: Path
    line: int
    script: str

    def __str__(self) -> str:
        return f"{self.path.name}:{self.line}"

    @property
    def commands(self) -> list[str]:
        commands: list[str] = []
        pending: list[str] = []
        heredoc_end: str | None = None
        for line in self.script.splitlines():
            if not pending and (not line.strip() or line.lstrip().startswith("#")):
                continue
            pending.append(line)
            if heredoc_end is not None:
                if line.strip() == heredoc_end:
                    heredoc_end = None
                else:
                    continue
            elif match := _HEREDOC.search(line):
                heredoc_end = match.group(2)
                continue
            text = "\n".join(pending)
            if line.endswith("\\") or not _complete(text):
                continue
            commands.append(text)
            pending = []
        if pending:
            raise RunbookError(f"{self}: the block ends inside a command: {pending[0]!r}")
        return commands


def _complete(text: str) -> bool:
    """bash parses the text as whole commands (no open pipe, quote, loop or `||`)."""
    checked = subprocess.run(
        ["bash", "-n", "-c", text], capture_output=True, text=True, timeout=10, check=False
    )
    return checked.returncode == 0


def section_blocks(path: Path, heading: str) -> list[ShellBlock]:
    """The ```sh blocks of the section whose heading is `heading` (RunbookError if none)."""
    level: int | None = None
    blocks: list[ShellBlock] = []
    fence: tuple[int, str, list[str]] | None = None  # first line, language, lines
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if fence is not None:
            if line.strip() != "```":
                fence[2].append(line)
            else:
                if level is not None and fence[1] in ("sh", "bash"):
                    blocks.append(ShellBlock(path, fence[0], "\n".join(fence[2]) + "\n"))
                fence = None
        elif (match := _FENCE.match(line)) is not None:
            fence = (number + 1, match.group(1), [])
        elif (match := _HEADING.match(line)) is not None:
            depth = len(match.group(1))
            if level is not None and depth <= level:
                break
            if match.group(2) == heading:
                level = depth
    if level is None:
        raise RunbookError(f"{path.name} has no section headed {heading!r}")
    if not blocks:
        raise RunbookError(f"{path.name}, section {heading!r}: no ```sh block")
    return blocks
