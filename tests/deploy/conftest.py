"""The deployment suites (`nox -s deploy`): the compose testnet on a real container engine
and annad under a real systemd (systemd-nspawn machines), following the runbooks.

They need root and Debian's docker.io, docker-compose, mmdebstrap and systemd-container
(.ci/run installs them). Under CI=true a missing one fails the suite; elsewhere it is
skipped, saying what is missing. Between runs the base image stays in dockerd's image
store (the README's command makes it only when it is missing) and the machines' root
filesystem in $ANNA_DEPLOY_CACHE (default /var/cache/anna-trio), keyed by its packages.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from nspawn import Machine, MachineError, machine_space, rootfs
from runbook import ShellBlock, section_blocks

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
CACHE = Path(os.environ.get("ANNA_DEPLOY_CACHE", "/var/cache/anna-trio"))


def require(ok: bool, what: str) -> None:
    """Fail under CI=true, skip elsewhere, when something the suite needs is missing."""
    if ok:
        return
    if os.environ.get("CI") == "true":
        pytest.fail(f"deploy suite: {what} (CI must provide it: .ci/run)")
    pytest.skip(f"deploy suite needs {what}")


def require_tools(*names: str) -> None:
    require(os.geteuid() == 0, "root")
    missing = [name for name in names if shutil.which(name) is None]
    require(not missing, f"{', '.join(missing)} on PATH")


def host_env(**extra: str) -> dict[str, str]:
    """The environment of a user in the quick start's virtual environment (annactl on PATH)."""
    return {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", **extra}


def sh(
    command: str, *, cwd: Path = ROOT, timeout: float = 600, check: bool = True
) -> subprocess.CompletedProcess[str]:
    """Run a shell command on the host as the runbooks' user does; its output on failure."""
    done = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", command],
        cwd=cwd,
        env=host_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    if check and done.returncode != 0:
        pytest.fail(f"`{command}` exited {done.returncode}:\n{done.stdout}\n{done.stderr}")
    return done


@pytest.fixture(scope="session")
def wheelhouse(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """docs/operations.md §1 on the build machine: the package and its dependencies as wheels
    (the checkout is `./anna-trio` there); its folder is what a node gets with `conf/`."""
    require_tools()
    build_machine = tmp_path_factory.mktemp("build-machine")
    (build_machine / "anna-trio").symlink_to(ROOT)
    (build_block, _node_block) = section_blocks(ROOT / "docs" / "operations.md", "1. Install")
    sh(build_block.script, cwd=build_machine)
    yield build_machine / "wheelhouse"


@pytest.fixture(scope="session")
def machine_rootfs() -> Iterator[Path]:
    """The Debian root filesystem every machine boots (cached; built on first use), and
    the tmpfs their writes go to."""
    require_tools("mmdebstrap", "systemd-nspawn", "nsenter", "ip", "mount")
    base = rootfs(CACHE)
    with machine_space():
        yield base


def follow(
    machine: Machine, block: ShellBlock, *, cwd: str, env: dict[str, str] | None = None
) -> None:
    """Run a runbook block inside a machine command by command, as an operator types it;
    the first failing command fails the test, named with its block."""
    for command in block.commands:
        try:
            machine.run(command, cwd=cwd, env=env)
        except MachineError as exc:
            pytest.fail(f"{block}: {exc}")


def install_anna(machine: Machine, wheelhouse: Path) -> None:
    """docs/operations.md §1 on a node: wheelhouse/ and conf/ copied to /root/anna-install,
    then the node block there, command by command."""
    folder = machine.path("/root/anna-install")
    shutil.copytree(wheelhouse, folder / "wheelhouse")
    shutil.copytree(ROOT / "conf", folder / "conf")
    (_build_block, node_block) = section_blocks(ROOT / "docs" / "operations.md", "1. Install")
    follow(machine, node_block, cwd="/root/anna-install")
