"""Wire and domain models: frozen attrs classes, validated by their fields' validators.

The strict converter (converter.py) structures them from JSON and YAML at the edges;
the validators also hold when code builds one. Patterns are applied with `fullmatch`:
`$` alone also accepts a trailing newline, and `bytes.fromhex` skips it, so a
signature with "\n" appended would verify as a *different* observation — forged
evidence against an honest node.
"""

from __future__ import annotations

import functools
import math
import re
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

import attrs
from cattrs.errors import BaseValidationError

from ._exceptions import ObservationError
from .addresses import is_address, unbracketed
from .converter import (
    Invalid,
    all_of,
    between,
    converter,
    each,
    format_path,
    items,
    less_than,
    matches,
    number_in,
    one_of,
    optional,
    positive,
    problems,
    satisfies,
    tagged_union,
    unique,
    utc_timestamp_problem,
)

NODE_ID_RE = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
ROUND_ID_RE = re.compile(r"^[A-Za-z0-9_.:-]{1,64}$")
BIAS_FLAG_RE = re.compile(r"^[A-Za-z][A-Za-z0-9_]{0,63}$")
HASH_RE = re.compile(r"^sha256:[0-9a-f]{64}$")
SIGNATURE_RE = re.compile(r"^[0-9a-f]{128}$")
MAX_BIAS_FLAGS = 16
MAX_WINDOW_HOURS = 8760
MAX_AUDIT_ID = 2**63 - 1

T = TypeVar("T")


def _integer_as_float(value: Any) -> Any:
    """An integer TIS (`1`) as the float it stands for; anything else as it is, for
    the validator to judge (a bool is no integer here)."""
    return float(value) if type(value) is int else value


_UNIT = number_in("[0, 1]")


@attrs.frozen
class TisComponents:
    prediction_accuracy: float = attrs.field(converter=_integer_as_float, validator=_UNIT)
    ethical_alignment: float = attrs.field(converter=_integer_as_float, validator=_UNIT)
    coherence_stability: float = attrs.field(converter=_integer_as_float, validator=_UNIT)


@attrs.frozen
class ObservationContent:
    """What a node signs for a round (SPEC §3): an observation but for its signature."""

    node_id: str = attrs.field(validator=matches(NODE_ID_RE))
    audit_id: int = attrs.field(validator=between(1, MAX_AUDIT_ID))
    round_id: str = attrs.field(validator=matches(ROUND_ID_RE))
    window_hours: int = attrs.field(validator=between(1, MAX_WINDOW_HOURS))
    timestamp: str = attrs.field(validator=satisfies(utc_timestamp_problem))
    forecast_hash: str = attrs.field(validator=matches(HASH_RE))
    outcome_hash: str = attrs.field(validator=matches(HASH_RE))
    tis_components: TisComponents
    tis_overall: float = attrs.field(converter=_integer_as_float, validator=_UNIT)
    bias_flags: tuple[str, ...] = attrs.field(
        validator=all_of(
            items(0, MAX_BIAS_FLAGS, f"must be a list of at most {MAX_BIAS_FLAGS}"),
            each(matches(BIAS_FLAG_RE)),
            unique(),
        )
    )


@attrs.frozen
class Observation(ObservationContent):
    """One node's signed TIS measurement for one round (SPEC §3)."""

    signature: str = attrs.field(validator=matches(SIGNATURE_RE))

    @functools.cached_property
    def memo(self) -> dict[str, Any]:
        """Values derived from this (immutable) observation, kept once computed: crypto
        stores its signed bytes and digest here, which a node needs several times per
        observation (verify, engine, store). Not a field: not compared, hashed or sent."""
        return {}

    def to_dict(self) -> dict[str, Any]:
        """The wire form (SPEC §3)."""
        data: dict[str, Any] = converter.unstructure(self)
        return data


CONTENT_FIELDS = tuple(field.name for field in attrs.fields(ObservationContent))
OBSERVATION_FIELDS = frozenset(field.name for field in attrs.fields(Observation))
COMPONENT_NAMES = tuple(field.name for field in attrs.fields(TisComponents))
_COMPONENT_KEYS = frozenset(COMPONENT_NAMES)


def content_of(content: ObservationContent) -> dict[str, Any]:
    """The signed fields of an observation (or of its content), by name."""
    return {name: getattr(content, name) for name in CONTENT_FIELDS}


def is_round_id(value: Any) -> bool:
    return isinstance(value, str) and ROUND_ID_RE.fullmatch(value) is not None


def is_window_hours(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= MAX_WINDOW_HOURS


def unix_seconds(timestamp: str) -> int:
    """Integer unix seconds of an RFC 3339 UTC timestamp, fraction dropped."""
    return math.floor(parse_utc_timestamp(timestamp).timestamp())


def parse_utc_timestamp(value: str) -> datetime:
    """Parse RFC 3339 with a `Z` or `+00:00` offset; anything else is an error."""
    problem = utc_timestamp_problem(value) if isinstance(value, str) else "must be a string"
    if problem is not None:
        raise ObservationError(f"timestamp: {problem}")
    return datetime.fromisoformat(value)


def format_utc(moment: datetime) -> str:
    """RFC 3339 UTC with a `Z`, second precision: the form this node writes."""
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def format_utc_ms(wall: float) -> str:
    """Unix seconds as RFC 3339 UTC with milliseconds and a `Z` (audit entries, reloads)."""
    return datetime.fromtimestamp(wall, UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def structure_message(data: Any, cls: type[T], what: str) -> T:
    """`data` as a `cls`, or ObservationError naming every problem (`what` names the
    whole: `observation: must be a mapping`)."""
    try:
        return converter.structure(data, cls)
    except (BaseValidationError, Invalid) as exc:
        found = problems(exc)
        raise ObservationError(
            "; ".join(f"{format_path(p.path) if p.path else what}: {p.message}" for p in found)
        ) from None


def parse_observation(data: Any) -> Observation:
    """Validate a decoded JSON object against SPEC §3 (signature not checked here).

    The hot path: every node parses every other node's observation every round. A
    valid one is built directly by the classes' own field validators, from a dict
    whose keys are exactly their fields, which is faster than the converter (how much:
    docs/benchmarks.md, "Parsing with cattrs"); anything else goes through the
    converter, which names every problem (and builds what the shortcut may have
    refused for a detail of type)."""
    if type(data) is dict and data.keys() == OBSERVATION_FIELDS:
        parts, flags = data["tis_components"], data["bias_flags"]
        if type(parts) is dict and parts.keys() == _COMPONENT_KEYS and type(flags) is list:
            try:
                return Observation(
                    **{**data, "tis_components": TisComponents(**parts), "bias_flags": tuple(flags)}
                )
            except (ValueError, TypeError, ArithmeticError):
                pass
    return structure_message(data, Observation, "observation")


def parse_evidence(data: Any) -> Evidence:
    """`{"first": observation, "second": observation}` (signatures not checked here)."""
    return structure_message(data, Evidence, "evidence")


@attrs.frozen
class Evidence:
    """Two validly signed, different observations by one node for one round."""

    first: Observation
    second: Observation

    @property
    def node_id(self) -> str:
        return self.first.node_id

    @property
    def round_id(self) -> str:
        return self.first.round_id


# --- annad.yml's observer ------------------------------------------------------------


@attrs.frozen
class SyntheticObserver:
    """A TIS around `tis`, give or take `jitter`: testnets and demos (the default)."""

    kind: str = attrs.field(default="synthetic", validator=one_of(["synthetic"]))
    tis: float = attrs.field(default=0.85, validator=number_in("[0, 1]"))
    jitter: float = attrs.field(default=0.01, validator=number_in("[0, 1]"))


@attrs.frozen
class FileObserver:
    """The JSON the local mirror audit writes, read at each round."""

    path: Path = attrs.field(metadata={"missing": "is required for kind: file"})
    kind: str = attrs.field(default="file", validator=one_of(["file"]))


ObserverConfig = SyntheticObserver | FileObserver
"""What this node measures each round (annad.yml's `observer:`, told apart by `kind`)."""
converter.register_structure_hook(
    ObserverConfig,
    tagged_union([SyntheticObserver, FileObserver], tag="kind", default=SyntheticObserver),
)


# --- cluster configuration (peers.yml, SPEC §6) -------------------------------------

QUORUM_RULES = ("majority", "two_thirds")
MAX_BODY_BYTES_CEILING = 64 * 1024 * 1024
MAX_CONNECTIONS_CEILING = 1_000_000
TLS_FILES = ("ca_cert", "server_cert", "server_key", "client_cert", "client_key")


@attrs.frozen
class TlsConfig:
    """The `tls:` block; paths are absolute or relative to peers.yml's folder, resolved.
    With `enabled`, the five files are required (a rule of the file: cluster.py)."""

    enabled: bool = False
    ca_cert: Path | None = None
    server_cert: Path | None = None
    server_key: Path | None = None
    client_cert: Path | None = None
    client_key: Path | None = None
    crl: Path | None = None


def lowered(value: Any) -> Any:
    """A field converter: a string in lower case (`Majority`, `INFO`); anything else as
    it is, for the validator to judge."""
    return value.lower() if isinstance(value, str) else value


def _fingerprint_digits(value: Any) -> Any:
    """`AB:CD:…` (openssl's form) as `abcd…`."""
    return value.replace(":", "").lower() if isinstance(value, str) else value


def _unbracketed(value: Any) -> Any:
    return unbracketed(value) if isinstance(value, str) else value


def _not_an_address(value: str) -> str | None:
    if is_address(value):
        return None
    return "must be a host name or IP address (no scheme, no port)"


def _not_a_public_key(value: str) -> str | None:
    from .crypto import parse_public_key  # crypto builds on these models

    try:
        parse_public_key(value)
    except ValueError as exc:
        return f"not a valid Ed25519 public key: {exc}"
    return None


def _not_a_fingerprint(value: str) -> str | None:
    if FINGERPRINT_RE.fullmatch(value):
        return None
    return "must be a SHA-256 fingerprint: 64 hex characters"


FINGERPRINT_RE = re.compile(r"^[0-9a-f]{64}$")


@attrs.frozen
class PeerConfig:
    node_id: str = attrs.field(validator=matches(NODE_ID_RE))
    address: str = attrs.field(converter=_unbracketed, validator=satisfies(_not_an_address))
    port: int = attrs.field(validator=between(1, 65535))
    pubkey: str = attrs.field(validator=satisfies(_not_a_public_key))
    fingerprint: str | None = attrs.field(
        default=None,
        converter=_fingerprint_digits,
        validator=optional(satisfies(_not_a_fingerprint)),
    )


def _seconds(default: float) -> Any:
    return attrs.field(default=default, validator=positive("seconds"))


@attrs.frozen
class Limits:
    """Server-side limits (`limits:` in peers.yml); times in seconds.

    The connection bounds are the RPC listener's (anna_trio.transport): a validator is
    known before the TLS handshake by its peers.yml address, after it by its
    certificate's CN; everyone else shares `max_connections -
    validator_connection_reserve` slots, at most `max_connections_per_address` each,
    and their requests are answered `max_outsider_requests` at a time.
    """

    rate_per_client: float = attrs.field(default=100.0, validator=positive("requests per second"))
    burst: int = attrs.field(default=200, validator=between(1, 10**9))
    max_body_bytes: int = attrs.field(
        default=64 * 1024, validator=between(1, MAX_BODY_BYTES_CEILING)
    )
    request_timeout: float = _seconds(5.0)
    idempotency_ttl: float = _seconds(86400.0)  # seconds an Idempotency-Key's answer is kept
    idempotency_keys: int = attrs.field(  # answers kept at most (the oldest go first)
        default=100_000, validator=between(1, 10**9)
    )
    pending_rounds: int = attrs.field(  # rounds short of quorum before new starts get 503
        default=64, validator=between(1, 10**6)
    )
    max_connections: int = attrs.field(default=512, validator=between(2, MAX_CONNECTIONS_CEILING))
    max_connections_per_address: int = attrs.field(
        default=32, validator=between(1, MAX_CONNECTIONS_CEILING)
    )
    validator_connection_reserve: int = attrs.field(
        default=64,
        validator=all_of(
            between(0, MAX_CONNECTIONS_CEILING),
            less_than("max_connections", "or no one else could connect"),
        ),
    )
    max_pending_handshakes: int = attrs.field(
        default=64, validator=between(1, MAX_CONNECTIONS_CEILING)
    )
    handshake_timeout: float = _seconds(5.0)
    send_timeout: float = _seconds(10.0)
    keep_alive_timeout: float = _seconds(15.0)
    max_outsider_requests: int = attrs.field(
        default=16, validator=between(1, MAX_CONNECTIONS_CEILING)
    )


@attrs.frozen
class ClusterConfig:
    """A validated peers.yml. Frozen: a reload swaps the whole object at once."""

    peers: tuple[PeerConfig, ...] = attrs.field(
        validator=items(
            1, MAX_CONNECTIONS_CEILING, "at least one peer is required", "a list of peers"
        ),
        metadata={"missing": "at least one peer is required"},
    )
    allow_insecure_peers: bool = False
    tls: TlsConfig = TlsConfig()
    quorum_rule: str = attrs.field(
        default="majority",
        converter=lowered,
        validator=one_of(QUORUM_RULES),
        metadata={"key": "quorum"},
    )
    byzantine_deviation_threshold: float = attrs.field(default=0.3, validator=number_in("(0, 1]"))
    byzantine_window_count: int = attrs.field(default=3, validator=between(1, 1000))
    limits: Limits = Limits()

    @property
    def validator_ids(self) -> frozenset[str]:
        return frozenset(p.node_id for p in self.peers)

    @property
    def quorum(self) -> int:
        return quorum_for(len(self.peers), self.quorum_rule)

    def peer(self, node_id: str) -> PeerConfig | None:
        for peer in self.peers:
            if peer.node_id == node_id:
                return peer
        return None


def quorum_for(validator_count: int, rule: str) -> int:
    """majority: N//2+1; two_thirds: 2N//3+1."""
    if rule == "two_thirds":
        return 2 * validator_count // 3 + 1
    return validator_count // 2 + 1
