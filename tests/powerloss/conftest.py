"""Fixtures of the power-loss suite: LazyFS, built once and shown to drop un-synced data.

Where LazyFS cannot run (not root, no /dev/fuse, no C++ toolchain to build it), CI
(CI=true) fails every power-loss test; elsewhere they are skipped, saying why.
"""

from __future__ import annotations

import os
from pathlib import Path

import lazyfs
import pytest


@pytest.fixture(scope="session")
def lazyfs_binary(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The lazyfs binary, after a probe mount proved that a power cut drops un-synced data."""
    try:
        lazyfs.check_fuse()
        binary = lazyfs.build()
        lazyfs.probe(binary, tmp_path_factory.mktemp("lazyfs-probe"))
    except lazyfs.LazyFSUnavailable as exc:
        if os.environ.get("CI") == "true":
            pytest.fail(f"power-loss suite cannot run in CI: {exc}")
        pytest.skip(f"power-loss suite needs LazyFS (root, FUSE, g++/cmake): {exc}")
    return binary
