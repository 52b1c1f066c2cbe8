"""Developer and CI sessions. `nox` with no arguments runs what CI runs."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import nox

# The test sessions install the package as `pip install .` does (a wheel built from
# the checkout, not an editable install), so the tests run what operators install.
WHEEL = ".[test]"
# What the browser session drives chromium with (lint type-checks its tests against it).
BROWSER_DRIVER = ("playwright>=1.40", "pillow>=10")

nox.options.sessions = ["lint", "tests", "sim", "chaos", "browser", "powerloss", "deploy"]
nox.options.reuse_existing_virtualenvs = True


@nox.session(python="3.11")
def lint(session: nox.Session) -> None:
    """ruff check, ruff format --check and strict mypy over the package, the benchmarks
    and every test.

    pytest puts each test folder that is not a package on sys.path (with tests/, whose
    helpers they share) and imports its conftest as `conftest`; mypy checks each such
    folder the same way, one run apiece, so the four conftests never collide.
    """
    session.install("-e", ".[test]", "ruff>=0.6", "mypy>=1.11", *BROWSER_DRIVER)
    session.run("ruff", "check", "anna_trio", "tests", "benchmarks", "noxfile.py")
    session.run("ruff", "format", "--check", "anna_trio", "tests", "benchmarks", "noxfile.py")
    session.run("mypy")
    for folder in test_folders():
        files = sorted(str(path) for path in folder.glob("*.py"))
        session.run("mypy", *files, env={"MYPYPATH": f"{folder}{os.pathsep}tests"})


def test_folders() -> list[Path]:
    """The test folders pytest imports by path (tests/sim, a package, is in pyproject's
    mypy files)."""
    folders = {path.parent for path in Path("tests").rglob("*.py")}
    return sorted(folder for folder in folders if not (folder / "__init__.py").exists())


@nox.session(python="3.11")
def tests(session: nox.Session) -> None:
    """Unit, property and integration tests (real annad processes, real TLS)."""
    session.install(WHEEL)
    args = session.posargs or ["-q", "-p", "no:cacheprovider"]
    session.run(
        "pytest",
        "--ignore=tests/chaos",
        "--ignore=tests/powerloss",
        "--ignore=tests/deploy",
        "--ignore=tests/browser",
        "--ignore=tests/sim",
        *args,
        env={"PYTHONHASHSEED": os.environ.get("PYTHONHASHSEED", "0")},
    )


@nox.session(python="3.11")
def sim(session: nox.Session) -> None:
    """The deterministic cluster simulator (tests/sim): 2,000 seeded runs of 3-7 real
    nodes in one process, 25- and 50-node clusters, determinism and its own failure.

    ANNA_SIM_SEED=N replays seed N alone (ANNA_SIM_TRACE=DIR writes its trace there);
    ANNA_SIM_SEEDS sets how many seeds run, ANNA_SIM_WORKERS over how many processes.
    PYTHONHASHSEED is pinned: set iteration order is part of a run.
    """
    session.install(WHEEL)
    args = session.posargs or ["-q", "-p", "no:cacheprovider", "-s"]
    session.run("pytest", "tests/sim", *args, env={"PYTHONHASHSEED": "0"})


@nox.session(python="3.11")
def chaos(session: nox.Session) -> None:
    """Chaos suite: each node in its own network namespace (needs root and iproute2).

    Fails in CI (CI=true) when namespaces cannot be made; skips elsewhere, saying why.
    ANNA_CHAOS_ROUNDS (default 40) sizes the kill -9 scenario: the issue's full run is
    `ANNA_CHAOS_ROUNDS=100 nox -s chaos`; ANNA_CHAOS_SEED picks the victims.
    """
    session.install(WHEEL)
    args = session.posargs or ["-q", "-p", "no:cacheprovider", "-rs"]
    session.run("pytest", "tests/chaos", *args)


@nox.session(python="3.11")
def powerloss(session: nox.Session) -> None:
    """Power-loss suite: each node's state on LazyFS, which drops what was never fsynced.

    Needs root and FUSE; builds LazyFS once from shared/tools/lazyfs into
    ANNA_LAZYFS_CACHE (default ~/.cache/anna-trio/lazyfs). Fails in CI (CI=true) when it
    cannot run; skips elsewhere, saying why. ANNA_POWERLOSS_SEED (default 1,2,3) and
    ANNA_POWERLOSS_CRASH (default every crash point) choose the cases; a failure prints
    the line that replays it.
    """
    session.install(WHEEL)
    args = session.posargs or ["-q", "-p", "no:cacheprovider", "-rs"]
    session.run("pytest", "tests/powerloss", *args)


@nox.session(python="3.11")
def deploy(session: nox.Session) -> None:
    """The deployment forms run for real (root, docker.io, docker-compose, mmdebstrap,
    systemd-container): the README's no-registry compose commands on a dockerd of its own,
    and annad under systemd in systemd-nspawn machines — one, then a 3-machine mTLS cluster
    — installed by following docs/operations.md. After chaos: dockerd changes the host's
    firewall (the suite restores it). Fails in CI (CI=true) when something is missing;
    skips elsewhere, saying why. The base image stays in dockerd's image store, the
    machines' root filesystem in $ANNA_DEPLOY_CACHE (default /var/cache/anna-trio).
    """
    session.install(WHEEL)
    args = session.posargs or ["tests/deploy", "-q", "-p", "no:cacheprovider", "-rs"]
    session.run("pytest", *args)


@nox.session(python="3.11")
def browser(session: nox.Session) -> None:
    """The operator console in a real browser: Debian's chromium, headless, driven by
    Playwright (never `playwright install`: no browser download), against a live 3-node
    testnet after the three scenarios; axe-core from npm, cached here, checks
    accessibility. Fails in CI (CI=true) when chromium or npm is missing; skips
    elsewhere, saying why.
    """
    session.install(WHEEL, *BROWSER_DRIVER)
    axe = session.cache_dir / "axe-core"
    if shutil.which("npm"):
        session.run(
            *("npm", "install", "--prefix", str(axe), "--no-save", "--no-audit", "--no-fund"),
            *("--loglevel", "error", "axe-core@4"),
            external=True,
        )
    args = session.posargs or ["-q", "-p", "no:cacheprovider", "-rs"]
    session.run(
        "pytest",
        "tests/browser",
        *args,
        env={"ANNA_AXE_JS": str(axe / "node_modules" / "axe-core" / "axe.min.js")},
    )


@nox.session(python="3.11")
def bench(session: nox.Session) -> None:
    """Issue 7 benchmarks (annactl --help, migration, etcd side by side, 3/5/9/15-node
    mTLS clusters, RSS over 10,000 rounds): one JSON document with the targets judged.

    `nox -s bench -- --quick` tries the scripts in about two minutes; other arguments go to
    benchmarks/bench_suite.py (e.g. `-- --nodes 3 --skip rss,submit`).
    """
    session.install("-e", ".[test]")
    session.run("python", "benchmarks/bench_suite.py", *session.posargs)
