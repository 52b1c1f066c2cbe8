"""`annactl testnet up` and `testnet run` print each node's console URL (issue 17), and
the URLs printed are the consoles of the nodes that were started."""

from __future__ import annotations

import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

from anna_trio import testnet
from anna_trio.cli import annactl

BIN = Path(sys.executable).parent


def console_urls(out: str) -> list[str]:
    return [line.split(" console ", 1)[1] for line in out.splitlines() if " console " in line]


@pytest.mark.integration
def test_testnet_up_prints_the_three_console_urls(tmp_path: Path) -> None:
    """A testnet on free ports: `up` prints three console URLs, each serving its node's
    console page."""
    layout = testnet.free_layout(tmp_path / "testnet", 3)
    testnet.init(layout)
    annactl_bin = str(BIN / "annactl")
    up = subprocess.run(
        [annactl_bin, "testnet", "up", "--dir", str(layout.directory)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    try:
        assert up.returncode == 0, up.stdout + up.stderr
        urls = console_urls(up.stdout)
        assert urls == [f"http://127.0.0.1:{ep.metrics_port}/" for ep in layout.endpoints]
        for url, ep in zip(urls, layout.endpoints, strict=True):
            with urllib.request.urlopen(url, timeout=10) as page:
                assert page.status == 200
                assert f"The cluster as {ep.node_id} sees it" in page.read().decode()
    finally:
        subprocess.run(
            [annactl_bin, "testnet", "down", "--dir", str(layout.directory)],
            capture_output=True,
            check=False,
        )


def test_testnet_run_prints_the_console_urls_before_the_scenarios(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """`testnet run` prints the URLs once the nodes are up (nodes and scenarios faked:
    `run` itself uses the fixed SPEC ports)."""
    calls: list[str] = []
    monkeypatch.setattr(testnet, "init", lambda layout, **kw: calls.append("init"))
    monkeypatch.setattr(testnet, "up", lambda layout: calls.append("up"))

    def down(layout: testnet.Layout) -> list[str]:
        calls.append("down")
        return []

    monkeypatch.setattr(testnet, "down", down)

    async def scenarios(layout: testnet.Layout) -> list[testnet.ScenarioResult]:
        calls.append("scenarios")
        return [testnet.ScenarioResult(1, "healthy quorum", "r", passed=True)]

    monkeypatch.setattr(testnet, "run_scenarios", scenarios)
    with pytest.raises(SystemExit) as exited:
        annactl.main(["testnet", "run", "--dir", str(tmp_path / "testnet")])
    assert exited.value.code == 0
    assert calls == ["init", "up", "scenarios", "down"]
    out = capsys.readouterr().out
    assert console_urls(out) == [f"http://127.0.0.1:{port}/" for port in (9001, 9002, 9003)]
    assert out.index(" console ") < out.index("PASS")


def test_testnet_up_on_an_empty_folder_makes_the_testnet_first(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """As `docker compose up`: no testnet in DIR is not an error, it is made first."""
    calls: list[str] = []
    monkeypatch.setattr(testnet, "init", lambda layout, **kw: calls.append("init"))
    monkeypatch.setattr(testnet, "up", lambda layout: calls.append("up"))
    with pytest.raises(SystemExit) as exited:
        annactl.main(["testnet", "up", "--dir", str(tmp_path / "fresh")])
    assert exited.value.code == 0
    assert calls == ["init", "up"]
    assert "initialised one" in capsys.readouterr().out
