"""The transport (HTTP server, client, TLS stream) is a package of its own (issue 16):
it imports nothing of anna_trio's but itself and the error hierarchy, so the routes,
limits and idempotency that use it can change without touching it."""

from __future__ import annotations

import ast
from pathlib import Path

import anna_trio.transport

ALLOWED = {"anna_trio.transport", "anna_trio._exceptions"}


def imported_modules(path: Path) -> set[str]:
    """The anna_trio modules `path` imports, relative imports resolved."""
    package = "anna_trio.transport"
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                found.add(f"{base}.{node.module}" if node.module else base)
            elif node.module:
                found.add(node.module)
    return {name for name in found if name == "anna_trio" or name.startswith("anna_trio.")}


def test_the_transport_imports_only_itself_and_the_errors() -> None:
    folder = Path(anna_trio.transport.__file__).parent
    outside = {
        path.name: sorted(
            name
            for name in imported_modules(path)
            if not any(name == a or name.startswith(a + ".") for a in ALLOWED)
        )
        for path in sorted(folder.glob("*.py"))
    }
    assert {name: mods for name, mods in outside.items() if mods} == {}
    assert len(outside) >= 5  # server, client, tlsstream, tlsfailure, admission, ...
