"""The GitHub Actions workflow (the seed's "CI smoke tests") runs what .ci/run runs, and
passes the offline checks: GitHub's workflow schema (check-jsonschema's vendored copy)
and zizmor's security audits, with no high finding."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from ruamel.yaml import YAML

ROOT = Path(__file__).resolve().parent.parent
WORKFLOW = ROOT / ".github" / "workflows" / "ci.yml"


def tool(name: str) -> str:
    found = shutil.which(name, path=str(Path(sys.executable).parent)) or shutil.which(name)
    if found is None:
        message = f"{name} is not installed (pip install '.[test]')"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    return found


def test_the_workflow_runs_ci_run_which_runs_the_readme_test_command() -> None:
    workflow = YAML(typ="safe").load(WORKFLOW.read_text())
    (job,) = workflow["jobs"].values()
    assert [step.get("run") for step in job["steps"]][-1] == "bash .ci/run"
    assert job["env"]["CI"] == "true"
    assert (ROOT / ".ci" / "run").read_text().rstrip().endswith("\nnox")


def test_the_workflow_matches_github_s_schema() -> None:
    checked = subprocess.run(
        [tool("check-jsonschema"), "--builtin-schema", "vendor.github-workflows", str(WORKFLOW)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr


def test_zizmor_finds_nothing_high_offline() -> None:
    audited = subprocess.run(
        [tool("zizmor"), "--offline", "--format", "json", str(WORKFLOW)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    findings = json.loads(audited.stdout or "[]")
    high = [f for f in findings if f["determinations"]["severity"] == "High"]
    assert high == [], high
