"""annad settings (flags, environment, annad.yml) and peers.yml (SPEC §1, §6).

Everything here is pure and synchronous: read a file, return frozen models or raise
ConfigError listing *every* problem as ``<file>:<line>: <field>: <message>``, so that
start-up, a SIGHUP reload and ``annactl config check`` report the same thing.
YAML is read with ruamel's round-trip loader because it keeps line numbers; YAML 1.2
rules apply, so ``yes``/``no`` are strings, and booleans must be ``true``/``false``.
"""

from __future__ import annotations

import argparse
import ipaddress
import math
import re
import sys
import warnings
from collections.abc import Callable, Collection, Mapping, Sequence
from pathlib import Path
from typing import Any, NoReturn

import attrs
from ruamel.yaml import YAML
from ruamel.yaml.error import MarkedYAMLError, YAMLError
from ruamel.yaml.scalarbool import ScalarBoolean

from . import __version__
from ._exceptions import ConfigError
from .crypto import parse_public_key
from .models import (
    NODE_ID_RE,
    QUORUM_RULES,
    ClusterConfig,
    Limits,
    ObserverConfig,
    PeerConfig,
    TlsConfig,
)

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
OBSERVER_KINDS = ("synthetic", "file")
TLS_REQUIRED_MESSAGE = (
    "TLS is required: set tls.enabled: true with certificates, or allow_insecure_peers: true"
)
MAX_BODY_BYTES_CEILING = 64 * 1024 * 1024

_PEERS_TOP_KEYS = (
    "allow_insecure_peers",
    "tls",
    "quorum",
    "byzantine_deviation_threshold",
    "byzantine_window_count",
    "peers",
    "limits",
)
_PEER_KEYS = ("node_id", "address", "port", "pubkey", "fingerprint")
_TLS_FILES = ("ca_cert", "server_cert", "server_key", "client_cert", "client_key")
_TLS_KEYS = ("enabled", *_TLS_FILES, "crl")
_LIMIT_KEYS = (
    "rate_per_client",
    "burst",
    "max_body_bytes",
    "request_timeout",
    "idempotency_ttl",
    "idempotency_keys",
    "pending_rounds",
    "max_connections",
    "max_connections_per_address",
    "validator_connection_reserve",
    "max_pending_handshakes",
    "handshake_timeout",
    "send_timeout",
    "keep_alive_timeout",
    "max_outsider_requests",
)
MAX_CONNECTIONS_CEILING = 1_000_000
_OBSERVER_KEYS = {"synthetic": ("kind", "tis", "jitter"), "file": ("kind", "path")}
_ANNAD_KEYS = (
    "node_id",
    "state_dir",
    "peers",
    "audit_log",
    "rpc_listen",
    "metrics_listen",
    "pid_file",
    "round_interval",
    "round_timeout",
    "log_level",
    "log_format",
    "observer",
    "console",
)
_ANNAD_PATH_KEYS = (  # (annad.yml key, Settings field)
    ("state_dir", "state_dir"),
    ("peers", "peers_file"),
    ("audit_log", "audit_log"),
    ("pid_file", "pid_file"),
)
_HOST_LABEL_RE = re.compile(r"^[A-Za-z0-9_]([A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?$")
_PORT_RE = re.compile(r"^[0-9]{1,5}$")
_FINGERPRINT_RE = re.compile(r"^[0-9a-f]{64}$")
_INVALID = object()  # an annad.yml value that was present but wrong (already reported)


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


# --- small value checks shared by every source ----------------------------------------


def _is_hostname(text: str) -> bool:
    if not 1 <= len(text) <= 253:
        return False
    labels = text[:-1].split(".") if text.endswith(".") else text.split(".")
    return all(_HOST_LABEL_RE.fullmatch(label) for label in labels)


def _normalise_address(text: str) -> str | None:
    """A hostname, IPv4 or IPv6 address (brackets optional), or None if it is none."""
    if text.startswith("[") and text.endswith("]"):
        text = text[1:-1]
        try:
            ipaddress.IPv6Address(text)
        except ValueError:
            return None
        return text
    if _is_hostname(text):
        return text
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return None
    return text


def _parse_port(text: str) -> int | None:
    if not _PORT_RE.fullmatch(text):
        return None
    port = int(text)
    return port if 1 <= port <= 65535 else None


def parse_host_port(text: str) -> tuple[str, int]:
    """`HOST:PORT`, `[IPv6]:PORT` or `:PORT` (all interfaces) as (host, port)."""
    if not isinstance(text, str):
        raise ConfigError(f"expected HOST:PORT, got {text!r}")
    value = text.strip()
    expected = f"expected HOST:PORT (e.g. 0.0.0.0:8001 or [::1]:8001), got {text!r}"
    if value.startswith("["):
        end = value.find("]")
        if end < 0 or value[end + 1 : end + 2] != ":":
            raise ConfigError(expected)
        host, port_text = value[1:end], value[end + 2 :]
        try:
            ipaddress.IPv6Address(host)
        except ValueError as exc:
            raise ConfigError(f"{host!r} is not an IPv6 address, in {text!r}") from exc
    else:
        host, separator, port_text = value.rpartition(":")
        if not separator:
            raise ConfigError(expected)
        if ":" in host:
            raise ConfigError(f"IPv6 addresses need brackets ([::1]:8001), got {text!r}")
        host = host or "0.0.0.0"
        if _normalise_address(host) is None:
            raise ConfigError(f"{host!r} is not a host name or IP address, in {text!r}")
    port = _parse_port(port_text)
    if port is None:
        raise ConfigError(f"port must be an integer 1..65535, in {text!r}")
    return host, port


def _as_bool(value: Any) -> bool | None:
    """A real YAML boolean (ruamel gives anchored ones as ScalarBoolean, an int)."""
    if isinstance(value, bool | ScalarBoolean):
        return bool(value)
    return None


def _as_int(value: Any) -> int | None:
    if isinstance(value, bool | ScalarBoolean) or not isinstance(value, int):
        return None
    return int(value)


def _as_number(value: Any) -> float | None:
    if isinstance(value, bool | ScalarBoolean) or not isinstance(value, int | float):
        return None
    try:
        return float(value)
    except OverflowError:
        return math.inf


def _duration_problem(value: float, *, positive: bool) -> str | None:
    if not math.isfinite(value):
        return "must be a finite number of seconds"
    if positive and value <= 0:
        return "must be greater than 0 seconds"
    if value < 0:
        return "must not be negative"
    return None


# --- YAML with line numbers ----------------------------------------------------------


class _Problems:
    """Collects `<file>:<line>: <field>: <message>` lines."""

    def __init__(self, file: Path) -> None:
        self.file = file
        self._found: list[tuple[int, str]] = []

    def add(self, line: int, field: str, message: str) -> None:
        self._found.append((line, f"{self.file}:{line}: {field}: {message}"))

    def __len__(self) -> int:
        return len(self._found)

    @property
    def lines(self) -> list[str]:
        """Every problem, in file order (stable for problems on the same line)."""
        return [text for _, text in sorted(self._found, key=lambda found: found[0])]

    def raise_if_any(self) -> None:
        """ConfigError naming the one problem, or summarising several (all in .problems)."""
        lines = self.lines
        if len(lines) == 1:
            raise ConfigError(lines[0], lines)
        if lines:
            raise ConfigError(f"{self.file}: {len(lines)} problems", lines)


def _start_line(node: Any, default: int = 1) -> int:
    line = getattr(getattr(node, "lc", None), "line", None)
    return line + 1 if isinstance(line, int) else default


def _key_line(mapping: Any, key: Any, default: int) -> int:
    try:
        return int(mapping.lc.key(key)[0]) + 1
    except (AttributeError, KeyError, TypeError, IndexError):
        return default


def _item_line(sequence: Any, index: int, default: int) -> int:
    try:
        return int(sequence.lc.item(index)[0]) + 1
    except (AttributeError, KeyError, TypeError, IndexError):
        return default


def _load_yaml(path: Path, problems: _Problems) -> Any:
    """The parsed document, or None with a problem recorded when it cannot be read."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        problems.add(1, "file", f"cannot read: {exc}")
        return None
    try:
        with warnings.catch_warnings(action="ignore"):
            return YAML(typ="rt").load(text)
    except MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark is not None else 1
        reason = exc.problem or str(exc)
        if exc.context:
            reason = f"{reason} ({exc.context})"
        problems.add(line, "yaml", f"not valid YAML: {reason}")
    except YAMLError as exc:
        problems.add(1, "yaml", f"not valid YAML: {exc}")
    except RecursionError:
        problems.add(1, "yaml", "not valid YAML: nested too deeply")
    return None


def _key_text(key: Any) -> str:
    return key if isinstance(key, str) else repr(key)


class _Section:
    """One YAML mapping under validation: typed getters that record problems.

    A getter returns the default when the key is absent or null, and also after
    recording a problem, so that validation goes on and reports everything.
    """

    def __init__(self, mapping: Any, prefix: str, problems: _Problems, line: int) -> None:
        self.mapping = mapping
        self.prefix = prefix
        self.problems = problems
        self.start = line

    def field(self, key: Any) -> str:
        return f"{self.prefix}{_key_text(key)}"

    def line(self, key: Any) -> int:
        return _key_line(self.mapping, key, self.start)

    def error(self, key: Any, message: str) -> None:
        self.problems.add(self.line(key), self.field(key), message)

    def missing(self, key: str, message: str = "is required") -> None:
        """Report a key that is absent (at the mapping's line) or null (at its own)."""
        self.problems.add(self.line(key), self.field(key), message)

    def has(self, key: str) -> bool:
        return self.mapping.get(key) is not None

    def raw(self, key: str) -> Any:
        return self.mapping.get(key)

    def reject_unknown(
        self, allowed: Collection[str], known: Mapping[str, str] | None = None
    ) -> None:
        for key in self.mapping:
            if isinstance(key, str) and key in allowed:
                continue
            if known and isinstance(key, str) and key in known:
                self.error(key, known[key])
            else:
                self.error(key, f"unknown key (allowed: {', '.join(sorted(allowed))})")

    def boolean(self, key: str, default: bool) -> bool:
        if not self.has(key):
            return default
        value = _as_bool(self.raw(key))
        if value is None:
            self.error(key, "must be true or false (a YAML boolean, not yes/no or a string)")
            return default
        return value

    def integer(self, key: str, default: int, low: int, high: int) -> int:
        if not self.has(key):
            return default
        value = _as_int(self.raw(key))
        if value is None or not low <= value <= high:
            self.error(key, f"must be an integer {low}..{high}")
            return default
        return value

    def number(
        self, key: str, default: float, *, check: Callable[[float], bool], expected: str
    ) -> float:
        if not self.has(key):
            return default
        value = _as_number(self.raw(key))
        if value is None or not math.isfinite(value) or not check(value):
            self.error(key, f"must be {expected}")
            return default
        return value

    def text(self, key: str) -> str | None:
        if not self.has(key):
            return None
        value = self.raw(key)
        if not isinstance(value, str) or not value.strip():
            self.error(key, "must be a non-empty string (quote it if it looks like a number)")
            return None
        return str(value).strip()

    def choice(self, key: str, choices: Sequence[str], default: str) -> str:
        value = self.text(key)
        if value is None:
            return default
        if value.lower() not in choices:
            self.error(key, f"must be one of {', '.join(choices)}; got {value!r}")
            return default
        return value.lower()

    def path(self, key: str, base: Path) -> Path | None:
        value = self.text(key)
        return None if value is None else base / value

    def mapping_section(self, key: str) -> _Section | None:
        """The nested mapping under key, None when absent, null or not a mapping."""
        if not self.has(key):
            return None
        value = self.raw(key)
        if not isinstance(value, Mapping):
            self.error(key, "must be a mapping")
            return None
        return _Section(value, f"{self.field(key)}.", self.problems, self.line(key))


# --- peers.yml ------------------------------------------------------------------------


@attrs.frozen
class _PeerEntry:
    """One item of `peers:` as far as it is valid, with the lines cross-checks cite."""

    index: int
    node_id: str | None
    node_id_line: int
    endpoint: tuple[str, int] | None
    address_line: int
    peer: PeerConfig | None  # only when every field is valid


def _parse_peer(item: Any, index: int, line: int, problems: _Problems) -> _PeerEntry:
    field = f"peers[{index}]"
    if not isinstance(item, Mapping):
        problems.add(line, field, "must be a mapping with node_id, address, port, pubkey")
        return _PeerEntry(index, None, line, None, line, None)
    section = _Section(item, f"{field}.", problems, line)
    before = len(problems)
    section.reject_unknown(_PEER_KEYS)
    for key in ("node_id", "address", "port", "pubkey"):
        if not section.has(key):
            section.missing(key)
    node_id = section.text("node_id")
    if node_id is not None and not NODE_ID_RE.fullmatch(node_id):
        section.error("node_id", f"must match {NODE_ID_RE.pattern}; got {node_id!r}")
        node_id = None
    address = section.text("address")
    if address is not None:
        address = _normalise_address(address)
        if address is None:
            section.error("address", "must be a host name or IP address (no scheme, no port)")
    port = section.integer("port", 0, 1, 65535) or None
    pubkey = section.text("pubkey")
    if pubkey is not None:
        try:
            parse_public_key(pubkey)
        except ValueError as exc:
            section.error("pubkey", f"not a valid Ed25519 public key: {exc}")
    fingerprint = section.text("fingerprint")
    if fingerprint is not None:
        fingerprint = fingerprint.replace(":", "").lower()
        if not _FINGERPRINT_RE.fullmatch(fingerprint):
            section.error("fingerprint", "must be a SHA-256 fingerprint: 64 hex characters")
    endpoint = (address, port) if address is not None and port is not None else None
    peer = None
    if len(problems) == before and node_id and endpoint and pubkey:
        peer = PeerConfig(node_id, endpoint[0], endpoint[1], pubkey, fingerprint)
    return _PeerEntry(
        index, node_id, section.line("node_id"), endpoint, section.line("address"), peer
    )


def _check_unique(entries: list[_PeerEntry], problems: _Problems) -> None:
    """Node ids and address:port pairs must each appear once (SPEC §6)."""
    first_id: dict[str, int] = {}
    first_endpoint: dict[tuple[str, int], int] = {}
    for entry in entries:
        if entry.node_id is not None:
            if entry.node_id in first_id:
                problems.add(
                    entry.node_id_line,
                    f"peers[{entry.index}].node_id",
                    f"duplicate node id {entry.node_id!r} "
                    f"(first at line {first_id[entry.node_id]})",
                )
            first_id.setdefault(entry.node_id, entry.node_id_line)
        if entry.endpoint is not None:
            address, port = entry.endpoint
            key = (address.lower(), port)
            if key in first_endpoint:
                problems.add(
                    entry.address_line,
                    f"peers[{entry.index}].address",
                    f"duplicate address:port {address}:{port} "
                    f"(first at line {first_endpoint[key]})",
                )
            first_endpoint.setdefault(key, entry.address_line)


def _parse_peers(top: _Section, node_id: str | None) -> list[PeerConfig]:
    if not top.has("peers"):
        top.missing("peers", "at least one peer is required")
        return []
    items = top.raw("peers")
    if not isinstance(items, list):
        top.error("peers", "must be a list of peers")
        return []
    if not items:
        top.error("peers", "at least one peer is required")
        return []
    entries = [
        _parse_peer(item, index, _item_line(items, index, top.line("peers")), top.problems)
        for index, item in enumerate(items)
    ]
    _check_unique(entries, top.problems)
    if node_id is not None and all(entry.node_id != node_id for entry in entries):
        top.error("peers", f"this node ({node_id}) is not in the peer list")
    return [entry.peer for entry in entries if entry.peer is not None]


def _parse_tls(top: _Section, base: Path) -> tuple[TlsConfig, _Section | None]:
    """The tls block, and its section when it is complete enough to check the files."""
    section = top.mapping_section("tls")
    if section is None:
        return TlsConfig(), None
    section.reject_unknown(_TLS_KEYS)
    before = len(top.problems)
    enabled = section.boolean("enabled", False)
    paths = {key: section.path(key, base) for key in _TLS_KEYS[1:]}
    if enabled:
        for key in _TLS_FILES:
            if not section.has(key):
                section.missing(key, "is required when tls.enabled is true")
    complete = enabled and len(top.problems) == before
    tls = TlsConfig(
        enabled=enabled,
        ca_cert=paths["ca_cert"],
        server_cert=paths["server_cert"],
        server_key=paths["server_key"],
        client_cert=paths["client_cert"],
        client_key=paths["client_key"],
        crl=paths["crl"],
    )
    return tls, section if complete else None


def _parse_limits(top: _Section) -> Limits:
    section = top.mapping_section("limits")
    defaults = Limits()
    if section is None:
        return defaults
    section.reject_unknown(_LIMIT_KEYS)

    def seconds(key: str, default: float) -> float:
        return section.number(
            key, default, check=lambda value: value > 0, expected="a finite number of seconds > 0"
        )

    def count(key: str, default: int, low: int = 1) -> int:
        return section.integer(key, default, low, MAX_CONNECTIONS_CEILING)

    limits = Limits(
        rate_per_client=section.number(
            "rate_per_client",
            defaults.rate_per_client,
            check=lambda value: value > 0,
            expected="a finite number of requests per second > 0",
        ),
        burst=section.integer("burst", defaults.burst, 1, 10**9),
        max_body_bytes=section.integer(
            "max_body_bytes", defaults.max_body_bytes, 1, MAX_BODY_BYTES_CEILING
        ),
        request_timeout=seconds("request_timeout", defaults.request_timeout),
        max_connections=count("max_connections", defaults.max_connections, 2),
        max_connections_per_address=count(
            "max_connections_per_address", defaults.max_connections_per_address
        ),
        idempotency_ttl=section.number(
            "idempotency_ttl",
            defaults.idempotency_ttl,
            check=lambda value: value > 0,
            expected="a finite number of seconds > 0",
        ),
        idempotency_keys=section.integer("idempotency_keys", defaults.idempotency_keys, 1, 10**9),
        pending_rounds=section.integer("pending_rounds", defaults.pending_rounds, 1, 10**6),
        validator_connection_reserve=count(
            "validator_connection_reserve", defaults.validator_connection_reserve, 0
        ),
        max_pending_handshakes=count("max_pending_handshakes", defaults.max_pending_handshakes),
        handshake_timeout=seconds("handshake_timeout", defaults.handshake_timeout),
        send_timeout=seconds("send_timeout", defaults.send_timeout),
        keep_alive_timeout=seconds("keep_alive_timeout", defaults.keep_alive_timeout),
        max_outsider_requests=count("max_outsider_requests", defaults.max_outsider_requests),
    )
    if limits.validator_connection_reserve >= limits.max_connections:
        section.error(
            "validator_connection_reserve",
            f"must be less than max_connections ({limits.max_connections}),"
            " or no one else could connect",
        )
    return limits


def _add_tls_material_problems(tls: TlsConfig, section: _Section, tls_line: int) -> None:
    """Ask anna_trio.tls whether the files exist, parse, match and verify.

    Its messages start with the field (`tls.server_cert: ...`); each is reported at
    that key's line, or at the `tls:` line when it names no key of the block.
    """
    from . import tls as tls_module  # imported here: ssl and x509 are only needed with TLS

    for message in tls_module.check_tls_material(tls):
        field, separator, rest = message.partition(": ")
        key = field.removeprefix("tls.")
        if separator and field.startswith("tls.") and key in section.mapping:
            section.problems.add(section.line(key), field, rest)
        else:
            section.problems.add(tls_line, "tls", message)


def load_cluster_config(
    path: Path, *, node_id: str | None, check_tls_files: bool = True
) -> ClusterConfig:
    """Read and validate peers.yml; ConfigError.problems lists every problem found."""
    path = Path(path)
    problems = _Problems(path)
    document = _load_yaml(path, problems)
    problems.raise_if_any()
    if document is None:
        problems.add(1, "top level", "the file is empty; expected the settings of SPEC §6")
    elif not isinstance(document, Mapping):
        problems.add(_start_line(document), "top level", "must be a mapping (see SPEC §6)")
    problems.raise_if_any()
    top = _Section(document, "", problems, 1)
    top.reject_unknown(_PEERS_TOP_KEYS)
    allow_insecure = top.boolean("allow_insecure_peers", False)
    quorum_rule = top.choice("quorum", QUORUM_RULES, "majority")
    threshold = top.number(
        "byzantine_deviation_threshold",
        0.3,
        check=lambda value: 0 < value <= 1,
        expected="a finite number in (0, 1]",
    )
    window = top.integer("byzantine_window_count", 3, 1, 1000)
    limits = _parse_limits(top)
    tls, tls_section = _parse_tls(top, path.parent)
    peers = _parse_peers(top, node_id)
    if not allow_insecure and not tls.enabled:
        anchor = next((k for k in ("tls", "allow_insecure_peers") if k in document), None)
        problems.add(top.line(anchor) if anchor else 1, "tls", TLS_REQUIRED_MESSAGE)
    if tls_section is not None and check_tls_files:
        _add_tls_material_problems(tls, tls_section, top.line("tls"))
    problems.raise_if_any()
    return ClusterConfig(
        peers=tuple(peers),
        allow_insecure_peers=allow_insecure,
        tls=tls,
        quorum_rule=quorum_rule,
        byzantine_deviation_threshold=threshold,
        byzantine_window_count=window,
        limits=limits,
    )


def diff_peers(old: ClusterConfig, new: ClusterConfig) -> tuple[list[str], list[str], list[str]]:
    """Node ids (added, removed, changed), each sorted: what a reload must restart."""
    old_peers = {peer.node_id: peer for peer in old.peers}
    new_peers = {peer.node_id: peer for peer in new.peers}
    added = sorted(new_peers.keys() - old_peers.keys())
    removed = sorted(old_peers.keys() - new_peers.keys())
    changed = sorted(
        node for node in old_peers.keys() & new_peers.keys() if old_peers[node] != new_peers[node]
    )
    return added, removed, changed


def self_port_change(old: ClusterConfig, new: ClusterConfig, node_id: str) -> str | None:
    """Why a reload must be refused when it moves this node's own port, else None."""
    before, after = old.peer(node_id), new.peer(node_id)
    if before is None or after is None or before.port == after.port:
        return None
    return f"restart required: this node's port changed from {before.port} to {after.port}"


# --- annad flags, environment and annad.yml ------------------------------------------


class _AnnadArgumentParser(argparse.ArgumentParser):
    """Usage errors exit 64 (EX_USAGE), as SPEC §1 says, not argparse's 2."""

    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        self.exit(64, f"{self.prog}: error: {message}\n")


def _duration_arg(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected seconds, e.g. 10 or 0.5; got {text!r}"
        ) from None


def _host_port_arg(text: str) -> tuple[str, int]:
    try:
        return parse_host_port(text)
    except ConfigError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def build_annad_parser() -> argparse.ArgumentParser:
    """annad's command line (SPEC §1); every setting defaults to None so layers apply."""
    parser = _AnnadArgumentParser(
        prog="annad",
        description="The anna-trio audit-consensus node. Flags override ANNA_* environment "
        "variables, which override the --config YAML file, which overrides defaults.",
    )
    parser.add_argument("--version", action="version", version=f"annad {__version__}")
    add = parser.add_argument
    add(
        "--config",
        metavar="FILE",
        help=f"settings YAML (default {DEFAULT_CONFIG_FILE} if it exists)",
    )
    add("--node-id", metavar="ID", help="this node's id (env ANNA_NODE_ID, then NODE_ID); required")
    add("--state-dir", metavar="DIR", help=f"state directory (default {DEFAULT_STATE_DIR})")
    add("--peers", metavar="FILE", help=f"cluster config (default {DEFAULT_PEERS_FILE})")
    add("--audit-log", metavar="FILE", help=f"audit log (default {DEFAULT_AUDIT_LOG})")
    add(
        "--rpc-listen",
        metavar="HOST:PORT",
        type=_host_port_arg,
        help="RPC address (default 0.0.0.0:<this node's port in peers.yml>; env RPC_PORT sets the port)",
    )
    add(
        "--metrics-listen",
        metavar="HOST:PORT",
        type=_host_port_arg,
        help="metrics address (default 0.0.0.0:9090)",
    )
    add("--pid-file", metavar="FILE", help=f"pid file (default {DEFAULT_PID_FILE})")
    add(
        "--round-interval",
        metavar="SECONDS",
        type=_duration_arg,
        help="start a round every SECONDS; 0 (default) starts rounds only when asked",
    )
    add(
        "--round-timeout",
        metavar="SECONDS",
        type=_duration_arg,
        help="round deadline in seconds (default 10; fractions allowed)",
    )
    add("--log-level", choices=LOG_LEVELS, help="default info")
    add("--log-format", choices=LOG_FORMATS, help="default text")
    add(
        "--console",
        action=argparse.BooleanOptionalAction,
        help="serve the read-only web console at / on the metrics listener (default on)",
    )
    return parser


def _observer_from_yaml(top: _Section, base: Path) -> ObserverConfig:
    section = top.mapping_section("observer")
    if section is None:
        return ObserverConfig()
    kind = section.choice("kind", OBSERVER_KINDS, "synthetic")
    other = "file" if kind == "synthetic" else "synthetic"
    section.reject_unknown(
        _OBSERVER_KEYS[kind],
        known={key: f"only valid with kind: {other}" for key in _OBSERVER_KEYS[other]},
    )
    if kind == "file":
        path = section.path("path", base)
        if path is None and not section.has("path"):
            section.missing("path", "is required for kind: file")
        return ObserverConfig(kind="file", path=path)
    unit = "a finite number in [0, 1]"
    return ObserverConfig(
        kind="synthetic",
        tis=section.number("tis", 0.85, check=lambda value: 0 <= value <= 1, expected=unit),
        jitter=section.number("jitter", 0.01, check=lambda value: 0 <= value <= 1, expected=unit),
    )


def _settings_from_yaml(path: Path, problems: _Problems) -> dict[str, Any]:
    """annad.yml values that are present and valid, keyed like Settings' fields."""
    document = _load_yaml(path, problems)
    if document is None:
        return {}
    if not isinstance(document, Mapping):
        problems.add(_start_line(document), "top level", "must be a mapping of settings")
        return {}
    top = _Section(document, "", problems, 1)
    top.reject_unknown(_ANNAD_KEYS)
    base = path.parent
    values: dict[str, Any] = {"observer": _observer_from_yaml(top, base)}
    node_id = top.text("node_id")
    if node_id is not None:
        if NODE_ID_RE.fullmatch(node_id):
            values["node_id"] = node_id
        else:
            top.error("node_id", f"must match {NODE_ID_RE.pattern}; got {node_id!r}")
            values["node_id"] = _INVALID
    for key, setting in _ANNAD_PATH_KEYS:
        values[setting] = top.path(key, base)
    for key in ("rpc_listen", "metrics_listen"):
        text = top.text(key)
        if text is not None:
            try:
                values[key] = parse_host_port(text)
            except ConfigError as exc:
                top.error(key, str(exc))
    for key, positive in (("round_interval", False), ("round_timeout", True)):
        if top.has(key):
            number = _as_number(top.raw(key))
            if number is None:
                problem: str | None = "must be a number of seconds"
            else:
                problem = _duration_problem(number, positive=positive)
            if problem is None:
                values[key] = number
            else:
                top.error(key, problem)
    values["log_level"] = top.choice("log_level", LOG_LEVELS, "") or None
    values["log_format"] = top.choice("log_format", LOG_FORMATS, "") or None
    if top.has("console"):
        values["console"] = top.boolean("console", True)
    return {key: value for key, value in values.items() if value is not None}


class _Layers:
    """Picks each setting from flag > environment > annad.yml > default."""

    def __init__(
        self, args: argparse.Namespace, environ: Mapping[str, str], file_values: dict[str, Any]
    ) -> None:
        self.args = args
        self.environ = environ
        self.file_values = file_values
        self.problems: list[str] = []
        self.failed: set[str] = set()

    def pick(
        self,
        setting: str,
        flag: str,
        env: Sequence[tuple[str, Callable[[Any], Any]]],
        convert: Callable[[Any], Any],
        default: Any,
    ) -> Any:
        """The first layer that sets it; flag and environment text pass through a converter."""
        flag_value = getattr(self.args, flag.removeprefix("--").replace("-", "_"), None)
        candidates = [(flag, flag_value, convert)]
        candidates += [(name, self.environ.get(name) or None, conv) for name, conv in env]
        for source, value, converter in candidates:
            if value is None:
                continue
            try:
                return converter(value)
            except ValueError as exc:  # ConfigError is a ValueError
                self.problems.append(f"{source}: {exc}")
                self.failed.add(setting)
                return default
        value = self.file_values.get(setting, default)
        if value is _INVALID:
            self.failed.add(setting)
            return default
        return value

    def simple(
        self, setting: str, env_name: str, convert: Callable[[Any], Any], default: Any
    ) -> Any:
        """A setting whose flag is --<setting> and whose one variable is env_name."""
        flag = "--" + setting.replace("_", "-")
        return self.pick(setting, flag, [(env_name, convert)], convert, default)


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
    port = _parse_port(str(value).strip())
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
        problem = _duration_problem(number, positive=positive)
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


def _config_file(args: argparse.Namespace, problems: list[str]) -> Path | None:
    explicit = getattr(args, "config", None)
    if explicit is not None:
        path = Path(explicit)
        if not path.is_file():
            problems.append(f"--config: no such file: {path}")
            return None
        return path
    return DEFAULT_CONFIG_FILE if DEFAULT_CONFIG_FILE.is_file() else None


def resolve_settings(args: argparse.Namespace, environ: Mapping[str, str]) -> Settings:
    """Merge flag > environment > --config YAML > default; ConfigError lists every problem."""
    problems: list[str] = []
    config_file = _config_file(args, problems)
    file_values: dict[str, Any] = {}
    if config_file is not None:
        file_problems = _Problems(config_file)
        file_values = _settings_from_yaml(config_file, file_problems)
        problems += file_problems.lines
    layers = _Layers(args, environ, file_values)
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
            "peers_file", "--peers", [("ANNA_PEERS", _path_value)], _path_value, DEFAULT_PEERS_FILE
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
        observer=file_values.get("observer", ObserverConfig()),
        config_file=config_file,
        console=layers.simple("console", "ANNA_CONSOLE", _switch_value, True),
    )
    problems += layers.problems
    if node_id is None and "node_id" not in layers.failed:
        problems.append("node id is required (--node-id or ANNA_NODE_ID)")
    if problems:
        raise ConfigError("; ".join(problems), problems)
    return settings
