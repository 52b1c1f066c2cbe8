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
from pathlib import Path

import pytest

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
