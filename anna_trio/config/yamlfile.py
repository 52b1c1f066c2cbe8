"""YAML files with line numbers: what peers.yml and annad.yml share.

Reading a file is the one I/O here (`Source.read`, at the edge); the rest is pure. A
document is parsed with ruamel's round-trip loader, which keeps line numbers, into
plain data for the strict converter. The converter's problems come back with paths
(`("peers", 2, "port")`), which the tree turns into lines: every problem is reported
as `<file>:<line>: <field>: <message>`, so that start-up, a SIGHUP reload and
`annactl config check` say the same. YAML 1.2 rules apply, so `yes`/`no` are
strings, and booleans must be `true`/`false`. A key set to null counts as absent,
and a string's surrounding spaces are not part of it.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeVar

import attrs
from cattrs.errors import BaseValidationError
from ruamel.yaml import YAML
from ruamel.yaml.error import MarkedYAMLError, YAMLError
from ruamel.yaml.scalarbool import ScalarBoolean

from .._exceptions import ConfigError
from ..converter import Invalid, Key, Location, Problem, converter, format_path, problems

T = TypeVar("T")

YAML_WORDS = {
    "bool": "must be true or false (a YAML boolean, not yes/no or a string)",
    "string": "must be a non-empty string (quote it if it looks like a number)",
}
"""How a YAML file is told about a type error the converter worded generically."""


@attrs.frozen
class Source:
    """A file's text as read at the edge, or why it could not be read."""

    path: Path
    text: str | None
    error: str | None = None

    @classmethod
    def read(cls, path: Path) -> Source:
        try:
            return cls(path, path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError) as exc:
            return cls(path, None, f"cannot read: {exc}")


class Problems:
    """Collects `<file>:<line>: <field>: <message>` lines."""

    def __init__(self, file: Path) -> None:
        self.file = file
        self._found: list[tuple[int, str, str]] = []  # (line, field, text)

    def add(self, line: int, field: str, message: str) -> None:
        self._found.append((line, field, f"{self.file}:{line}: {field}: {message}"))

    def __len__(self) -> int:
        return len(self._found)

    def under(self, key: str) -> bool:
        """Whether any problem is about `key` or something in it."""
        return any(field == key or field.startswith(f"{key}.") for _, field, _ in self._found)

    @property
    def lines(self) -> list[str]:
        """Every problem, in file order (stable for problems on the same line)."""
        return [text for _, _, text in sorted(self._found, key=lambda found: found[0])]

    def raise_if_any(self) -> None:
        """ConfigError naming the one problem, or summarising several (all in .problems)."""
        lines = self.lines
        if len(lines) == 1:
            raise ConfigError(lines[0], lines)
        if lines:
            raise ConfigError(f"{self.file}: {len(lines)} problems", lines)


@attrs.frozen
class Document:
    """A parsed YAML file: its ruamel tree (for lines) and the plain data the converter
    structures, in which problems are recorded by line."""

    tree: Any
    data: Any
    problems: Problems

    @classmethod
    def parse(cls, source: Source) -> Document:
        """The document of `source`; a file that cannot be read or parsed is one problem
        (and an empty document), an empty file is None data."""
        problems = Problems(source.path)
        tree = None
        if source.text is None:
            problems.add(1, "file", source.error or "cannot read")
        else:
            tree = _load(source.text, problems)
        try:
            data = _plain(tree)
        except RecursionError:  # an alias inside itself: `&a [*a]`
            problems.add(1, "yaml", "not valid YAML: nested too deeply (or inside itself)")
            tree = data = None
        return cls(tree, data, problems)

    def line(self, path: Location) -> int:
        """The line of the key or item `path` names, or of the nearest one that holds
        it (an absent key is reported where its mapping starts)."""
        node: Any = self.tree
        line = 1
        for step in path:
            part = step.value if isinstance(step, Key) else step
            marks: Any = getattr(node, "lc", None)
            try:
                if isinstance(node, Mapping) and part in node:
                    line = int(marks.key(part)[0]) + 1
                elif isinstance(node, list) and isinstance(part, int) and part < len(node):
                    line = int(marks.item(part)[0]) + 1
                else:
                    break
                node = node[part]
            except (AttributeError, KeyError, TypeError, IndexError):
                break
        return line

    def report(self, problem: Problem) -> None:
        message = YAML_WORDS.get(problem.wrong_type or "", problem.message)
        self.problems.add(self.line(problem.path), format_path(problem.path), message)

    def add(self, path: Location, message: str, *, line: int | None = None) -> None:
        """Record a problem found by a rule of the file at `path` (at its line)."""
        self.problems.add(self.line(path) if line is None else line, format_path(path), message)

    def structure(self, data: Any, cls: type[T], at: Location = ()) -> T | None:
        """`data` (found at `at`) as a `cls`, or None with its problems recorded."""
        try:
            return converter.structure(data, cls)
        except (BaseValidationError, Invalid) as exc:
            for problem in problems(exc):
                self.report(attrs.evolve(problem, path=(*at, *problem.path)))
            return None


def resolve_paths(value: T, base: Path) -> T:
    """`value` with every relative Path in it (an attrs class's fields, and theirs)
    made relative to `base`, the folder of the file it was read from."""
    cls: Any = type(value)
    if not attrs.has(cls):
        return value
    changes = {}
    for field in attrs.fields(cls):
        item = getattr(value, field.name)
        if isinstance(item, Path):
            changes[field.name] = base / item
        elif attrs.has(type(item)):
            changes[field.name] = resolve_paths(item, base)
    return attrs.evolve(value, **changes)  # type: ignore[misc]


def _load(text: str, problems: Problems) -> Any:
    try:
        with warnings.catch_warnings(action="ignore"):
            return YAML(typ="rt").load(text)
    except MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark is not None else 1
        reason = exc.problem or str(exc)
        if exc.context:
            reason = f"{reason} ({exc.context})"
        problems.add(line, "yaml", f"not valid YAML: {reason}")
    except YAMLError as exc:
        problems.add(1, "yaml", f"not valid YAML: {exc}")
    except RecursionError:
        problems.add(1, "yaml", "not valid YAML: nested too deeply")
    return None


def _plain(node: Any) -> Any:
    """ruamel's tree as plain data: dicts without null-valued keys, lists, stripped
    strings, and real booleans (an anchored one is a ScalarBoolean, an int)."""
    if isinstance(node, Mapping):
        return {key: _plain(value) for key, value in node.items() if value is not None}
    if isinstance(node, list):
        return [_plain(item) for item in node]
    if isinstance(node, ScalarBoolean):
        return bool(node)
    if isinstance(node, str):
        return str(node).strip()
    if isinstance(node, bool):
        return node
    if isinstance(node, int):
        return int(node)
    if isinstance(node, float):
        return float(node)
    return node
