"""annactl is consistent: every command that talks to a running node takes the same
--node, --peers and TLS options, and every command that prints a table takes --json."""

from __future__ import annotations

from pathlib import Path

import pytest

from anna_trio.cli.annactl import build_parser, main

NODE_OPTIONS = [
    *("--node", "https://127.0.0.1:8001", "--peers", "p.yml"),
    *("--ca-cert", "ca.pem", "--client-cert", "c.pem", "--client-key", "c.key"),
]
TALKS_TO_A_NODE = [
    ["status"],
    ["round", "start"],
    ["round", "show", "r1"],
    ["reconcile"],
    ["reload"],
    ["sim", "submit", "--key", "k", "--node-id", "n", "--round-id", "r"],
]
PRINTS_A_TABLE = [
    ["status"],
    ["reload"],
    ["audit", "verify"],
    ["config", "check"],
    ["testnet", "up"],
    ["testnet", "run"],
    ["testnet", "scenarios"],
]


@pytest.mark.parametrize("command", TALKS_TO_A_NODE, ids=" ".join)
def test_every_command_that_talks_to_a_node_takes_the_same_options(command: list[str]) -> None:
    args = build_parser().parse_args([*command, *NODE_OPTIONS])
    assert (args.node, args.peers, args.ca_cert, args.client_cert, args.client_key) == (
        "https://127.0.0.1:8001",
        "p.yml",
        "ca.pem",
        "c.pem",
        "c.key",
    )


@pytest.mark.parametrize("command", PRINTS_A_TABLE, ids=" ".join)
def test_every_command_that_prints_a_table_takes_json(command: list[str]) -> None:
    assert build_parser().parse_args([*command, "--json"]).json is True


@pytest.mark.parametrize("in_the_way", [True, False], ids=["a file in the way", "under /proc"])
def test_a_keys_dir_that_cannot_be_made_is_an_error_not_a_traceback(
    in_the_way: bool, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """annactl names the path it could not write and exits 1, no traceback."""
    (tmp_path / "a_file").write_text("")
    keys_dir = tmp_path / "a_file" / "keys" if in_the_way else Path("/proc/none/keys")
    with pytest.raises(SystemExit) as exited:
        main(["keys", "init", "--keys-dir", str(keys_dir)])
    assert exited.value.code == 1
    error = capsys.readouterr().err
    assert error.startswith("annactl keys: ") and "Traceback" not in error
    assert str(keys_dir) in error or str(keys_dir.parent) in error
