"""annad's settings (SPEC §1): each from a flag, else the environment, else annad.yml,
else its default.

`load_settings` is the edge: it finds annad.yml (`--config`, else the default path when
that file exists) and reads it. `resolve_settings` is pure: it takes the flags (as
argparse leaves them, None where not given), the environment and the file's text,
and returns the Settings or raises ConfigError listing every problem — a flag or
variable by its name, a file's by `<file>:<line>: <key>`. Each key of annad.yml is
structured on its own, so a bad one costs only itself (a wrong node_id there is not
also reported missing).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import attrs

from .._exceptions import ConfigError
from ..addresses import parse_host_port, parse_port
from ..converter import WrongType, duration, duration_problem, matches, one_of, optional
from ..models import NODE_ID_RE, ObserverConfig, SyntheticObserver, lowered
from .yamlfile import Document, Source, resolve_paths

DEFAULT_CONFIG_FILE = Path("/etc/anna/annad.yml")
DEFAULT_STATE_DIR = Path("/var/lib/anna")
DEFAULT_PEERS_FILE = Path("/etc/anna/peers.yml")
DEFAULT_AUDIT_LOG = Path("/var/log/anna/audit.jsonl")
DEFAULT_METRICS_LISTEN = ("0.0.0.0", 9090)
DEFAULT_PID_FILE = Path("/run/anna/annad.pid")
DEFAULT_ROUND_INTERVAL = 0.0
DEFAULT_ROUND_TIMEOUT = 10.0
LOG_LEVELS = ("debug", "info", "warning", "error")
LOG_FORMATS = ("text", "json")

Flags = Mapping[str, Any]
"""The command line's values by argparse dest (`node_id`, `rpc_listen` …), None
where not given."""


@attrs.frozen
class Settings:
    """Resolved annad settings; durations are floats in seconds.

    ``rpc_listen`` None means 0.0.0.0 on this node's port in peers.yml, which the
    daemon resolves once it has read peers.yml.
    """

    node_id: str
    state_dir: Path
    peers_file: Path
    audit_log: Path
    rpc_listen: tuple[str, int] | None
    metrics_listen: tuple[str, int]
    pid_file: Path
    round_interval: float
    round_timeout: float
    log_level: str
    log_format: str
    observer: ObserverConfig
    config_file: Path | None
    console: bool = True
    """The read-only web console at / on the metrics listener."""


def _host_port(value: Any, _: Any) -> tuple[str, int]:
    if not isinstance(value, str) or not value:
        raise WrongType("string")
    return parse_host_port(value)


def _listen() -> Any:
    return attrs.field(default=None, metadata={"structure": _host_port})


@attrs.frozen
class SettingsFile:
    """annad.yml: the same settings, snake_case; paths relative to the file's folder.
    None: not set here."""

    node_id: str | None = attrs.field(default=None, validator=optional(matches(NODE_ID_RE)))
    state_dir: Path | None = None
    peers: Path | None = None
    audit_log: Path | None = None
    rpc_listen: tuple[str, int] | None = _listen()
    metrics_listen: tuple[str, int] | None = _listen()
    pid_file: Path | None = None
    round_interval: float | None = attrs.field(default=None, validator=duration(positive=False))
    round_timeout: float | None = attrs.field(default=None, validator=duration(positive=True))
    log_level: str | None = attrs.field(
        default=None, converter=lowered, validator=optional(one_of(LOG_LEVELS))
    )
    log_format: str | None = attrs.field(
        default=None, converter=lowered, validator=optional(one_of(LOG_FORMATS))
    )
    observer: ObserverConfig = attrs.field(factory=SyntheticObserver)
    console: bool | None = None


@attrs.frozen
class _FileValues:
    """What annad.yml sets, key by key, and the keys it sets wrongly (reported)."""

    values: dict[str, Any]
    failed: frozenset[str]


def _file_values(source: Source, problems: list[str]) -> _FileValues:
    document = Document.parse(source)
    values: dict[str, Any] = {}
    failed: set[str] = set()
    data = document.data
    if data is not None and not isinstance(data, dict):
        document.add((), "must be a mapping of settings")
    elif data:
        for key, value in data.items():
            one = document.structure({key: value}, SettingsFile)
            if one is None:
                failed.add(str(key))
            else:
                values[str(key)] = getattr(resolve_paths(one, source.path.parent), str(key))
    problems += document.problems.lines
    return _FileValues(values, frozenset(failed))


class _Layers:
    """Picks each setting from flag > environment > annad.yml > default."""

    def __init__(self, flags: Flags, environ: Mapping[str, str], file: _FileValues) -> None:
        self.flags = flags
        self.environ = environ
        self.file = file
        self.problems: list[str] = []
        self.failed: set[str] = set()

    def pick(
        self,
        key: str,
        flag: str,
        env: Sequence[tuple[str, Callable[[Any], Any]]],
        convert: Callable[[Any], Any],
        default: Any,
    ) -> Any:
        """The first layer that sets it (`key` in annad.yml); flag and environment text
        pass through a converter."""
        flag_value = self.flags.get(flag.removeprefix("--").replace("-", "_"))
        candidates = [(flag, flag_value, convert)]
        candidates += [(name, self.environ.get(name) or None, conv) for name, conv in env]
        for source, value, converter in candidates:
            if value is None:
                continue
            try:
                return converter(value)
            except ValueError as exc:  # ConfigError is a ValueError
                self.problems.append(f"{source}: {exc}")
                self.failed.add(key)
                return default
        if key in self.file.failed:
            self.failed.add(key)
        value = self.file.values.get(key)
        return default if value is None else value

    def simple(self, key: str, env_name: str, convert: Callable[[Any], Any], default: Any) -> Any:
        """A setting whose flag is --<key> and whose one variable is env_name."""
        flag = "--" + key.replace("_", "-")
        return self.pick(key, flag, [(env_name, convert)], convert, default)


def _node_id_value(value: Any) -> str:
    text = str(value).strip()
    if not NODE_ID_RE.fullmatch(text):
        raise ValueError(f"node id must match {NODE_ID_RE.pattern}; got {text!r}")
    return text


def _path_value(value: Any) -> Path:
    if not str(value).strip():
        raise ValueError("must be a non-empty path")
    return Path(value)


def _host_port_value(value: Any) -> tuple[str, int]:
    if isinstance(value, tuple):
        return value
    return parse_host_port(str(value))


def _rpc_port_value(value: Any) -> tuple[str, int]:
    port = parse_port(str(value).strip())
    if port is None:
        raise ValueError(f"must be a port number 1..65535; got {value!r}")
    return "0.0.0.0", port


def _duration_value(*, positive: bool) -> Callable[[Any], float]:
    def convert(value: Any) -> float:
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise ValueError(
                f"must be a number of seconds, e.g. 10 or 0.5; got {value!r}"
            ) from None
        problem = duration_problem(number, positive=positive)
        if problem is not None:
            raise ValueError(f"{problem}; got {value!r}")
        return number

    return convert


def _switch_value(value: Any) -> bool:
    """A flag's bool, or an environment variable's true/false (1/0, yes/no, on/off)."""
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("true", "1", "yes", "on"):
        return True
    if text in ("false", "0", "no", "off"):
        return False
    raise ValueError(f"must be true or false; got {value!r}")


def _choice_value(choices: Sequence[str]) -> Callable[[Any], str]:
    def convert(value: Any) -> str:
        text = str(value).strip().lower()
        if text not in choices:
            raise ValueError(f"must be one of {', '.join(choices)}; got {value!r}")
        return text

    return convert


def load_settings(flags: Flags, environ: Mapping[str, str]) -> Settings:
    """The edge: find and read annad.yml, then resolve_settings."""
    explicit = flags.get("config")
    if explicit is not None:
        path = Path(explicit)
        if not path.is_file():
            return resolve_settings(flags, environ, None, [f"--config: no such file: {path}"])
        return resolve_settings(flags, environ, Source.read(path))
    default = DEFAULT_CONFIG_FILE
    return resolve_settings(flags, environ, Source.read(default) if default.is_file() else None)


def resolve_settings(
    flags: Flags,
    environ: Mapping[str, str],
    config_file: Source | None,
    problems: Sequence[str] = (),
) -> Settings:
    """Merge flag > environment > annad.yml (`config_file`, as read) > default;
    ConfigError lists every problem, `problems` found before included."""
    found = list(problems)
    file = _FileValues({}, frozenset())
    if config_file is not None:
        file = _file_values(config_file, found)
    layers = _Layers(flags, environ, file)
    node_id = layers.pick(
        "node_id",
        "--node-id",
        [("ANNA_NODE_ID", _node_id_value), ("NODE_ID", _node_id_value)],
        _node_id_value,
        None,
    )
    rpc_listen = layers.pick(
        "rpc_listen",
        "--rpc-listen",
        [("ANNA_RPC_LISTEN", _host_port_value), ("RPC_PORT", _rpc_port_value)],
        _host_port_value,
        None,
    )
    settings = Settings(
        node_id=node_id or "",
        state_dir=layers.simple("state_dir", "ANNA_STATE_DIR", _path_value, DEFAULT_STATE_DIR),
        peers_file=layers.pick(
            "peers", "--peers", [("ANNA_PEERS", _path_value)], _path_value, DEFAULT_PEERS_FILE
        ),
        audit_log=layers.simple("audit_log", "ANNA_AUDIT_LOG", _path_value, DEFAULT_AUDIT_LOG),
        rpc_listen=rpc_listen,
        metrics_listen=layers.simple(
            "metrics_listen", "ANNA_METRICS_LISTEN", _host_port_value, DEFAULT_METRICS_LISTEN
        ),
        pid_file=layers.simple("pid_file", "ANNA_PID_FILE", _path_value, DEFAULT_PID_FILE),
        round_interval=layers.simple(
            "round_interval",
            "ANNA_ROUND_INTERVAL",
            _duration_value(positive=False),
            DEFAULT_ROUND_INTERVAL,
        ),
        round_timeout=layers.simple(
            "round_timeout",
            "ANNA_ROUND_TIMEOUT",
            _duration_value(positive=True),
            DEFAULT_ROUND_TIMEOUT,
        ),
        log_level=layers.simple("log_level", "ANNA_LOG_LEVEL", _choice_value(LOG_LEVELS), "info"),
        log_format=layers.simple(
            "log_format", "ANNA_LOG_FORMAT", _choice_value(LOG_FORMATS), "text"
        ),
        observer=file.values.get("observer", SyntheticObserver()),
        config_file=None if config_file is None else config_file.path,
        console=layers.simple("console", "ANNA_CONSOLE", _switch_value, True),
    )
    found += layers.problems
    if node_id is None and "node_id" not in layers.failed:
        found.append("node id is required (--node-id or ANNA_NODE_ID)")
    if found:
        raise ConfigError("; ".join(found), found)
    return settings
