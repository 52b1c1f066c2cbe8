"""annad settings: flags > environment > --config YAML > defaults (SPEC §1)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import hypothesis.strategies as st
import pytest
from hypothesis import given, settings

from anna_trio import __version__
from anna_trio._exceptions import ConfigError
from anna_trio.cli.annad import build_annad_parser
from anna_trio.config import Settings, load_settings
from anna_trio.config import settings as settings_module
from anna_trio.models import FileObserver, SyntheticObserver


@pytest.fixture(autouse=True)
def no_default_config_file(
    tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch
) -> Path:
    """Point the default annad.yml at a file that does not exist (until a test writes it)."""
    path = tmp_path_factory.mktemp("etc") / "annad.yml"
    monkeypatch.setattr(settings_module, "DEFAULT_CONFIG_FILE", path)
    return path


def resolve(argv: list[str], environ: dict[str, str] | None = None) -> Settings:
    return load_settings(vars(build_annad_parser().parse_args(argv)), environ or {})


def problems(argv: list[str], environ: dict[str, str] | None = None) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        resolve(argv, environ)
    assert caught.value.exit_code == 78
    return caught.value.problems


def write_config(folder: Path, text: str) -> Path:
    path = folder / "annad.yml"
    path.write_text(text)
    return path


def test_defaults_apply_when_only_the_node_id_is_given() -> None:
    """Every setting but the node id has the SPEC §1 default."""
    assert resolve(["--node-id", "node_001"]) == Settings(
        node_id="node_001",
        state_dir=Path("/var/lib/anna"),
        peers_file=Path("/etc/anna/peers.yml"),
        audit_log=Path("/var/log/anna/audit.jsonl"),
        rpc_listen=None,
        metrics_listen=("0.0.0.0", 9090),
        pid_file=Path("/run/anna/annad.pid"),
        round_interval=0.0,
        round_timeout=10.0,
        log_level="info",
        log_format="text",
        observer=SyntheticObserver(),
        config_file=None,
    )


def test_missing_node_id_is_a_config_error() -> None:
    """Without a node id from any source, start-up fails with the documented message."""
    assert problems([]) == ["node id is required (--node-id or ANNA_NODE_ID)"]


def test_node_id_precedence_flag_then_anna_node_id_then_node_id(tmp_path: Path) -> None:
    """--node-id beats ANNA_NODE_ID, which beats NODE_ID, which beats the file."""
    path = str(write_config(tmp_path, "node_id: from_file\n"))
    env = {"ANNA_NODE_ID": "from_anna", "NODE_ID": "from_plain"}
    assert resolve(["--config", path, "--node-id", "from_flag"], env).node_id == "from_flag"
    assert resolve(["--config", path], env).node_id == "from_anna"
    assert resolve(["--config", path], {"NODE_ID": "from_plain"}).node_id == "from_plain"
    assert resolve(["--config", path], {"ANNA_NODE_ID": ""}).node_id == "from_file"


@pytest.mark.parametrize("bad", ["bad id", "x" * 65, "a/b", "é"])
def test_invalid_node_id_is_rejected(bad: str) -> None:
    """A node id outside ^[A-Za-z0-9_.-]{1,64}$ is a configuration error naming its source."""
    found = problems([], {"ANNA_NODE_ID": bad, "NODE_ID": "fine"})
    assert len(found) == 1 and found[0].startswith("ANNA_NODE_ID: node id must match"), found


def test_empty_environment_values_count_as_unset() -> None:
    """ANNA_NODE_ID= (empty) falls through to NODE_ID, as an unset variable would."""
    assert resolve([], {"ANNA_NODE_ID": "", "NODE_ID": "n2"}).node_id == "n2"


# (attribute, flag, env variable, YAML line, flag value, env value, expected flag, env, file)
LAYERED = [
    (
        "state_dir",
        "--state-dir",
        "ANNA_STATE_DIR",
        "state_dir: /f",
        "/a",
        "/b",
        Path("/a"),
        Path("/b"),
        Path("/f"),
    ),
    (
        "peers_file",
        "--peers",
        "ANNA_PEERS",
        "peers: /f.yml",
        "/a.yml",
        "/b.yml",
        Path("/a.yml"),
        Path("/b.yml"),
        Path("/f.yml"),
    ),
    (
        "audit_log",
        "--audit-log",
        "ANNA_AUDIT_LOG",
        "audit_log: /f",
        "/a",
        "/b",
        Path("/a"),
        Path("/b"),
        Path("/f"),
    ),
    (
        "pid_file",
        "--pid-file",
        "ANNA_PID_FILE",
        "pid_file: /f",
        "/a",
        "/b",
        Path("/a"),
        Path("/b"),
        Path("/f"),
    ),
    (
        "rpc_listen",
        "--rpc-listen",
        "ANNA_RPC_LISTEN",
        "rpc_listen: 10.0.0.3:3",
        "127.0.0.1:1",
        "[::1]:2",
        ("127.0.0.1", 1),
        ("::1", 2),
        ("10.0.0.3", 3),
    ),
    (
        "metrics_listen",
        "--metrics-listen",
        "ANNA_METRICS_LISTEN",
        "metrics_listen: ':3'",
        "h:1",
        "h:2",
        ("h", 1),
        ("h", 2),
        ("0.0.0.0", 3),
    ),
    (
        "round_interval",
        "--round-interval",
        "ANNA_ROUND_INTERVAL",
        "round_interval: 3",
        "0.5",
        "1.25",
        0.5,
        1.25,
        3.0,
    ),
    (
        "round_timeout",
        "--round-timeout",
        "ANNA_ROUND_TIMEOUT",
        "round_timeout: 0.003",
        "0.1",
        "2",
        0.1,
        2.0,
        0.003,
    ),
    (
        "log_level",
        "--log-level",
        "ANNA_LOG_LEVEL",
        "log_level: error",
        "debug",
        "WARNING",
        "debug",
        "warning",
        "error",
    ),
    (
        "log_format",
        "--log-format",
        "ANNA_LOG_FORMAT",
        "log_format: json",
        "json",
        "text",
        "json",
        "text",
        "json",
    ),
]


@pytest.mark.parametrize(
    ("attribute", "flag", "env", "yaml", "flag_value", "env_value", "by_flag", "by_env", "by_file"),
    LAYERED,
)
def test_flag_beats_env_beats_file_beats_default(
    tmp_path: Path,
    attribute: str,
    flag: str,
    env: str,
    yaml: str,
    flag_value: str,
    env_value: str,
    by_flag: Any,
    by_env: Any,
    by_file: Any,
) -> None:
    """Each setting is taken from the highest layer that sets it."""
    path = str(write_config(tmp_path, f"node_id: n1\n{yaml}\n"))
    environ = {env: env_value}
    assert getattr(resolve(["--config", path, flag, flag_value], environ), attribute) == by_flag
    assert getattr(resolve(["--config", path], environ), attribute) == by_env
    assert getattr(resolve(["--config", path]), attribute) == by_file
    assert getattr(resolve(["--node-id", "n1"]), attribute) != by_file


def test_rpc_port_sets_only_the_port() -> None:
    """RPC_PORT gives 0.0.0.0:<port>; ANNA_RPC_LISTEN and --rpc-listen beat it."""
    assert resolve(["--node-id", "n1"], {"RPC_PORT": "8003"}).rpc_listen == ("0.0.0.0", 8003)
    environ = {"RPC_PORT": "8003", "ANNA_RPC_LISTEN": "127.0.0.1:9"}
    assert resolve(["--node-id", "n1"], environ).rpc_listen == ("127.0.0.1", 9)
    assert resolve(["--node-id", "n1", "--rpc-listen", "h:7"], environ).rpc_listen == ("h", 7)
    assert problems(["--node-id", "n1"], {"RPC_PORT": "http"}) == [
        "RPC_PORT: must be a port number 1..65535; got 'http'"
    ]


def test_rpc_port_beats_the_file(tmp_path: Path) -> None:
    """RPC_PORT is environment, so it beats rpc_listen in annad.yml."""
    path = str(write_config(tmp_path, "rpc_listen: 10.0.0.1:1\n"))
    assert resolve(["--config", path, "--node-id", "n"], {"RPC_PORT": "2"}).rpc_listen == (
        "0.0.0.0",
        2,
    )


@pytest.mark.parametrize(
    ("environ", "message"),
    [
        ({"ANNA_ROUND_TIMEOUT": "0"}, "ANNA_ROUND_TIMEOUT: must be greater than 0 seconds"),
        ({"ANNA_ROUND_TIMEOUT": "-1"}, "ANNA_ROUND_TIMEOUT: must be greater than 0 seconds"),
        ({"ANNA_ROUND_TIMEOUT": "nan"}, "ANNA_ROUND_TIMEOUT: must be a finite number"),
        ({"ANNA_ROUND_INTERVAL": "-0.5"}, "ANNA_ROUND_INTERVAL: must not be negative"),
        ({"ANNA_ROUND_INTERVAL": "inf"}, "ANNA_ROUND_INTERVAL: must be a finite number"),
        ({"ANNA_ROUND_INTERVAL": "soon"}, "ANNA_ROUND_INTERVAL: must be a number of seconds"),
        ({"ANNA_METRICS_LISTEN": "9090"}, "ANNA_METRICS_LISTEN: expected HOST:PORT"),
        ({"ANNA_RPC_LISTEN": "::1:8001"}, "ANNA_RPC_LISTEN: IPv6 addresses need brackets"),
        ({"ANNA_LOG_LEVEL": "trace"}, "ANNA_LOG_LEVEL: must be one of debug, info, warning, error"),
        ({"ANNA_LOG_FORMAT": "xml"}, "ANNA_LOG_FORMAT: must be one of text, json"),
    ],
)
def test_invalid_environment_values_are_config_errors(
    environ: dict[str, str], message: str
) -> None:
    """A bad environment value names the variable and the rule."""
    found = problems(["--node-id", "n1"], environ)
    assert len(found) == 1 and found[0].startswith(message), found


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--round-timeout", "0"], "--round-timeout: must be greater than 0 seconds"),
        (["--round-timeout", "-1"], "--round-timeout: must be greater than 0 seconds"),
        (["--round-interval", "nan"], "--round-interval: must be a finite number"),
        (["--node-id", "a b"], "--node-id: node id must match"),
    ],
)
def test_invalid_flag_values_are_config_errors(argv: list[str], message: str) -> None:
    """Syntactically fine but invalid flag values exit 78 with the flag named."""
    found = problems(["--node-id", "n1", *argv])
    assert found[0].startswith(message), found


def test_all_problems_are_reported_together() -> None:
    """Several bad sources are all reported, not only the first."""
    found = problems(["--round-timeout", "0"], {"ANNA_LOG_LEVEL": "loud", "RPC_PORT": "0"})
    assert [problem.split(":")[0] for problem in found] == [
        "RPC_PORT",
        "--round-timeout",
        "ANNA_LOG_LEVEL",
        "node id is required (--node-id or ANNA_NODE_ID)",
    ]


def test_round_interval_zero_and_fractional_durations_are_accepted() -> None:
    """0 means rounds only on request; durations may be fractional."""
    resolved = resolve(["--node-id", "n1", "--round-interval", "0", "--round-timeout", "0.5"])
    assert (resolved.round_interval, resolved.round_timeout) == (0.0, 0.5)


# --- annad.yml ------------------------------------------------------------------------


def test_default_config_file_is_used_only_when_it_exists(no_default_config_file: Path) -> None:
    """/etc/anna/annad.yml is read when present and ignored when absent."""
    assert resolve(["--node-id", "n1"]).config_file is None
    no_default_config_file.write_text("round_timeout: 4\n")
    resolved = resolve(["--node-id", "n1"])
    assert resolved.config_file == no_default_config_file and resolved.round_timeout == 4.0


def test_explicit_missing_config_file_is_an_error(tmp_path: Path) -> None:
    """--config naming a file that does not exist is a configuration error."""
    assert problems(["--node-id", "n1", "--config", str(tmp_path / "no.yml")]) == [
        f"--config: no such file: {tmp_path / 'no.yml'}"
    ]


def test_relative_paths_in_the_file_resolve_against_its_folder(tmp_path: Path) -> None:
    """state_dir: data in /x/annad.yml means /x/data; absolute paths are kept."""
    path = write_config(
        tmp_path,
        "state_dir: data\npid_file: /run/x.pid\nobserver:\n  kind: file\n  path: mirror/latest.json\n",
    )
    resolved = resolve(["--node-id", "n1", "--config", str(path)])
    assert resolved.state_dir == tmp_path / "data"
    assert resolved.pid_file == Path("/run/x.pid")
    assert resolved.observer == FileObserver(path=tmp_path / "mirror/latest.json")


def test_synthetic_observer_settings_are_read(tmp_path: Path) -> None:
    """kind: synthetic takes tis and jitter; an empty file gives the default observer."""
    path = write_config(tmp_path, "observer:\n  kind: synthetic\n  tis: 0.5\n  jitter: 0\n")
    observer = resolve(["--node-id", "n1", "--config", str(path)]).observer
    assert observer == SyntheticObserver(tis=0.5, jitter=0.0)
    write_config(tmp_path, "")
    assert resolve(["--node-id", "n1", "--config", str(path)]).observer == SyntheticObserver()


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("colour: red\n", ":1: colour: unknown key"),
        ("round_timeout: 10\nrpc_port: 1\n", ":2: rpc_port: unknown key"),
        ("- a\n", ":1: top level: must be a mapping"),
        ("round_timeout: [\n", ":2: yaml: not valid YAML"),
        ("node_id: 'a b'\n", ":1: node_id: must match"),
        ("round_timeout: 0\n", ":1: round_timeout: must be greater than 0 seconds"),
        ("round_timeout: '10'\n", ":1: round_timeout: must be a number of seconds"),
        ("round_interval: true\n", ":1: round_interval: must be a number of seconds"),
        ("round_interval: -1\n", ":1: round_interval: must not be negative"),
        ("round_interval: .inf\n", ":1: round_interval: must be a finite number"),
        ("metrics_listen: 9090\n", ":1: metrics_listen: must be a non-empty string"),
        ("rpc_listen: 'h:0'\n", ":1: rpc_listen: port must be an integer"),
        ("log_format: yaml\n", ":1: log_format: must be one of text, json"),
        ("state_dir: ''\n", ":1: state_dir: must be a non-empty string"),
        ("observer: synthetic\n", ":1: observer: must be a mapping"),
        ("observer:\n  kind: camera\n", ":2: observer.kind: must be one of synthetic, file"),
        ("observer:\n  tis: 1.5\n", ":2: observer.tis: must be a finite number in [0, 1]"),
        ("observer:\n  jitter: -0.1\n", ":2: observer.jitter: must be a finite number in [0, 1]"),
        ("observer:\n  kind: file\n", ":1: observer.path: is required for kind: file"),
        (
            "observer:\n  kind: file\n  tis: 0.5\n  path: x\n",
            ":3: observer.tis: only valid with kind: synthetic",
        ),
        ("observer:\n  path: x\n", ":2: observer.path: only valid with kind: file"),
        ("observer:\n  sensor: x\n", ":2: observer.sensor: unknown key"),
    ],
)
def test_config_file_problems_name_their_line(tmp_path: Path, text: str, expected: str) -> None:
    """Each annad.yml problem is reported as <file>:<line>: <key>: <message>."""
    path = write_config(tmp_path, text)
    found = problems(["--node-id", "n1", "--config", str(path)])
    assert any(problem.startswith(f"{path}{expected}") for problem in found), found


def test_invalid_node_id_in_file_is_not_also_reported_missing(tmp_path: Path) -> None:
    """A wrong node_id in annad.yml is one problem, not also 'node id is required'."""
    path = write_config(tmp_path, "node_id: 'a b'\n")
    assert len(problems(["--config", str(path)])) == 1


# --- the command line itself --------------------------------------------------------


@pytest.mark.parametrize(
    "argv",
    [
        ["--bogus"],
        ["--node-id"],
        ["positional"],
        ["--log-level", "trace"],
        ["--log-format", "xml"],
        ["--round-timeout", "soon"],
        ["--rpc-listen", "nowhere"],
        ["--metrics-listen", "h:99999"],
    ],
)
def test_usage_errors_exit_64(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    """Malformed command lines print usage and exit 64, not argparse's 2."""
    with pytest.raises(SystemExit) as caught:
        build_annad_parser().parse_args(argv)
    assert caught.value.code == 64
    err = capsys.readouterr().err
    assert err.startswith("usage: annad") and "annad: error:" in err


def test_version_and_help(capsys: pytest.CaptureFixture[str]) -> None:
    """--version prints the package version, --help lists every SPEC flag; both exit 0."""
    with pytest.raises(SystemExit) as caught:
        build_annad_parser().parse_args(["--version"])
    assert caught.value.code == 0
    assert capsys.readouterr().out == f"annad {__version__}\n"
    with pytest.raises(SystemExit) as caught:
        build_annad_parser().parse_args(["--help"])
    assert caught.value.code == 0
    out = capsys.readouterr().out
    for flag in (
        "--config",
        "--node-id",
        "--state-dir",
        "--peers",
        "--audit-log",
        "--rpc-listen",
        "--metrics-listen",
        "--pid-file",
        "--round-interval",
        "--round-timeout",
        "--log-level",
        "--log-format",
    ):
        assert flag in out


@settings(max_examples=100)
@given(st.floats(allow_nan=True, allow_infinity=True))
def test_environment_durations_accepted_exactly_when_finite_and_in_range(seconds: float) -> None:
    """Any float text: round_interval needs finite >= 0, round_timeout finite > 0."""
    environ = {
        "ANNA_NODE_ID": "n1",
        "ANNA_ROUND_INTERVAL": repr(seconds),
        "ANNA_ROUND_TIMEOUT": repr(seconds),
    }
    try:
        resolved = resolve([], environ)
    except ConfigError as exc:
        interval_ok = math.isfinite(seconds) and seconds >= 0
        timeout_ok = math.isfinite(seconds) and seconds > 0
        assert len(exc.problems) == (not interval_ok) + (not timeout_ok)
    else:
        assert math.isfinite(seconds) and seconds > 0
        assert resolved.round_interval == resolved.round_timeout == seconds


def test_console_switch_flag_beats_env_beats_file_beats_default(tmp_path: Path) -> None:
    """The console is on by default; `console: false`, ANNA_CONSOLE and --[no-]console
    turn it off or on, the highest layer winning."""
    off = str(write_config(tmp_path, "node_id: n1\nconsole: false\n"))
    assert resolve(["--node-id", "n1"]).console is True
    assert resolve(["--config", off]).console is False
    assert resolve(["--config", off], {"ANNA_CONSOLE": "true"}).console is True
    assert resolve(["--config", off, "--console"], {"ANNA_CONSOLE": "0"}).console is True
    assert resolve(["--node-id", "n1", "--no-console"], {"ANNA_CONSOLE": "on"}).console is False
    for text, expected in (("1", True), ("yes", True), ("OFF", False), ("false", False)):
        assert resolve(["--node-id", "n1"], {"ANNA_CONSOLE": text}).console is expected


def test_console_switch_rejects_anything_but_a_boolean(tmp_path: Path) -> None:
    """A console value that is not a boolean is an error naming its source (and line)."""
    assert problems(["--node-id", "n1"], {"ANNA_CONSOLE": "maybe"}) == [
        "ANNA_CONSOLE: must be true or false; got 'maybe'"
    ]
    path = str(write_config(tmp_path, "node_id: n1\nconsole: 'no'\n"))
    (line,) = problems(["--config", path])
    assert line.endswith(
        ":2: console: must be true or false (a YAML boolean, not yes/no or a string)"
    )
