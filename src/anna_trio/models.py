"""Wire and domain models: frozen attrs classes plus their strict parsers.

Patterns are applied with `fullmatch`: `$` alone also accepts a trailing newline, and
`bytes.fromhex` skips it, so a signature with "\n" appended would verify as a
*different* observation — forged evidence against an honest node.

Parsing is hand-written rather than generic so that every rejection names the
field that is wrong; unknown fields are rejected (SPEC §3).
"""

from __future__ import annotations

import functools
import math
import re
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import attrs

from ._exceptions import ObservationError

NODE_ID_RE = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
ROUND_ID_RE = re.compile(r"^[A-Za-z0-9_.:-]{1,64}$")
BIAS_FLAG_RE = re.compile(r"^[A-Za-z][A-Za-z0-9_]{0,63}$")
HASH_RE = re.compile(r"^sha256:[0-9a-f]{64}$")
SIGNATURE_RE = re.compile(r"^[0-9a-f]{128}$")
MAX_BIAS_FLAGS = 16
COMPONENT_NAMES = ("prediction_accuracy", "ethical_alignment", "coherence_stability")
OBSERVATION_FIELDS = frozenset(
    {
        "node_id",
        "audit_id",
        "round_id",
        "window_hours",
        "timestamp",
        "forecast_hash",
        "outcome_hash",
        "tis_components",
        "tis_overall",
        "bias_flags",
        "signature",
    }
)


@attrs.frozen
class TisComponents:
    prediction_accuracy: float
    ethical_alignment: float
    coherence_stability: float


@attrs.frozen
class Observation:
    """One node's signed TIS measurement for one round (SPEC §3)."""

    node_id: str
    audit_id: int
    round_id: str
    window_hours: int
    timestamp: str
    forecast_hash: str
    outcome_hash: str
    tis_components: TisComponents
    tis_overall: float
    bias_flags: tuple[str, ...]
    signature: str

    @functools.cached_property
    def memo(self) -> dict[str, Any]:
        """Values derived from this (immutable) observation, kept once computed: crypto
        stores its signed bytes and digest here, which a node needs several times per
        observation (verify, engine, store). Not a field: not compared, hashed or sent."""
        return {}

    def to_dict(self) -> dict[str, Any]:
        return {
            "node_id": self.node_id,
            "audit_id": self.audit_id,
            "round_id": self.round_id,
            "window_hours": self.window_hours,
            "timestamp": self.timestamp,
            "forecast_hash": self.forecast_hash,
            "outcome_hash": self.outcome_hash,
            "tis_components": {
                "prediction_accuracy": self.tis_components.prediction_accuracy,
                "ethical_alignment": self.tis_components.ethical_alignment,
                "coherence_stability": self.tis_components.coherence_stability,
            },
            "tis_overall": self.tis_overall,
            "bias_flags": list(self.bias_flags),
            "signature": self.signature,
        }


MAX_WINDOW_HOURS = 8760


def is_round_id(value: Any) -> bool:
    return isinstance(value, str) and ROUND_ID_RE.fullmatch(value) is not None


def is_window_hours(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= MAX_WINDOW_HOURS


def unix_seconds(timestamp: str) -> int:
    """Integer unix seconds of an RFC 3339 UTC timestamp, fraction dropped."""
    return math.floor(parse_utc_timestamp(timestamp).timestamp())


def parse_utc_timestamp(value: str) -> datetime:
    """Parse RFC 3339 with a `Z` or `+00:00` offset; anything else is an error."""
    if not isinstance(value, str) or len(value) > 40:
        raise ObservationError("timestamp: expected an RFC 3339 UTC string")
    if "T" not in value and "t" not in value:
        raise ObservationError("timestamp: expected an RFC 3339 date-time (YYYY-MM-DDTHH:MM:SSZ)")
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError as exc:
        raise ObservationError(f"timestamp: not RFC 3339: {value!r}") from exc
    if parsed.tzinfo is None or parsed.utcoffset() != UTC.utcoffset(None):
        raise ObservationError("timestamp: must be UTC ('Z' or '+00:00')")
    return parsed


def format_utc(moment: datetime) -> str:
    """RFC 3339 UTC with a `Z`, second precision: the form this node writes."""
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def format_utc_ms(wall: float) -> str:
    """Unix seconds as RFC 3339 UTC with milliseconds and a `Z` (audit entries, reloads)."""
    return datetime.fromtimestamp(wall, UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def _require_str(data: dict[str, Any], key: str, pattern: re.Pattern[str]) -> str:
    value = data[key]
    if not isinstance(value, str) or not pattern.fullmatch(value):
        raise ObservationError(f"{key}: must match {pattern.pattern}")
    return value


def _require_int(data: dict[str, Any], key: str, low: int, high: int) -> int:
    value = data[key]
    if isinstance(value, bool) or not isinstance(value, int):
        raise ObservationError(f"{key}: must be an integer")
    if not low <= value <= high:
        raise ObservationError(f"{key}: must be between {low} and {high}")
    return value


def _require_unit_float(value: Any, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ObservationError(f"{name}: must be a number")
    if isinstance(value, int) and not 0 <= value <= 1:  # before float(): 10**400 overflows
        raise ObservationError(f"{name}: must be a finite number in [0, 1]")
    number = float(value)
    if not math.isfinite(number) or not 0.0 <= number <= 1.0:
        raise ObservationError(f"{name}: must be a finite number in [0, 1]")
    return number


def parse_observation(data: Any) -> Observation:
    """Validate a decoded JSON object against SPEC §3 (signature not checked here)."""
    if not isinstance(data, dict):
        raise ObservationError("observation: must be a JSON object")
    unknown = set(data) - OBSERVATION_FIELDS
    if unknown:
        raise ObservationError(f"observation: unknown fields {sorted(unknown)}")
    missing = OBSERVATION_FIELDS - set(data)
    if missing:
        raise ObservationError(f"observation: missing fields {sorted(missing)}")
    timestamp = data["timestamp"]
    parse_utc_timestamp(timestamp)
    components = data["tis_components"]
    if not isinstance(components, dict) or set(components) != set(COMPONENT_NAMES):
        raise ObservationError(f"tis_components: must have exactly {list(COMPONENT_NAMES)}")
    flags = data["bias_flags"]
    if not isinstance(flags, list) or len(flags) > MAX_BIAS_FLAGS:
        raise ObservationError(f"bias_flags: must be a list of at most {MAX_BIAS_FLAGS}")
    for flag in flags:
        if not isinstance(flag, str) or not BIAS_FLAG_RE.fullmatch(flag):
            raise ObservationError(f"bias_flags: each must match {BIAS_FLAG_RE.pattern}")
    if len(set(flags)) != len(flags):
        raise ObservationError("bias_flags: must be unique")
    return Observation(
        node_id=_require_str(data, "node_id", NODE_ID_RE),
        audit_id=_require_int(data, "audit_id", 1, 2**63 - 1),
        round_id=_require_str(data, "round_id", ROUND_ID_RE),
        window_hours=_require_int(data, "window_hours", 1, MAX_WINDOW_HOURS),
        timestamp=timestamp,
        forecast_hash=_require_str(data, "forecast_hash", HASH_RE),
        outcome_hash=_require_str(data, "outcome_hash", HASH_RE),
        tis_components=TisComponents(
            *(_require_unit_float(components[n], f"tis_components.{n}") for n in COMPONENT_NAMES)
        ),
        tis_overall=_require_unit_float(data["tis_overall"], "tis_overall"),
        bias_flags=tuple(flags),
        signature=_require_str(data, "signature", SIGNATURE_RE),
    )


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


@attrs.frozen
class ObserverConfig:
    """What this node measures each round (annad.yml's `observer:`): a synthetic TIS or
    a mirror-audit JSON file."""

    kind: str = "synthetic"
    tis: float = 0.85
    jitter: float = 0.01
    path: Path | None = None


# --- cluster configuration (peers.yml, SPEC §6) -------------------------------------

QUORUM_RULES = ("majority", "two_thirds")


@attrs.frozen
class TlsConfig:
    """The `tls:` block; paths are absolute or relative to peers.yml's folder, resolved."""

    enabled: bool = False
    ca_cert: Path | None = None
    server_cert: Path | None = None
    server_key: Path | None = None
    client_cert: Path | None = None
    client_key: Path | None = None
    crl: Path | None = None


@attrs.frozen
class PeerConfig:
    node_id: str
    address: str
    port: int
    pubkey: str
    fingerprint: str | None = None


@attrs.frozen
class Limits:
    """Server-side limits (`limits:` in peers.yml); times in seconds.

    The connection bounds are the RPC listener's (anna_trio.transport): a validator is
    known before the TLS handshake by its peers.yml address, after it by its
    certificate's CN; everyone else shares `max_connections -
    validator_connection_reserve` slots, at most `max_connections_per_address` each,
    and their requests are answered `max_outsider_requests` at a time.
    """

    rate_per_client: float = 100.0
    burst: int = 200
    max_body_bytes: int = 64 * 1024
    request_timeout: float = 5.0
    idempotency_ttl: float = 86400.0  # seconds an Idempotency-Key's answer is kept
    idempotency_keys: int = 100_000  # answers kept at most (the oldest go first)
    pending_rounds: int = 64  # rounds short of quorum before new starts get 503
    max_connections: int = 512
    max_connections_per_address: int = 32
    validator_connection_reserve: int = 64
    max_pending_handshakes: int = 64
    handshake_timeout: float = 5.0
    send_timeout: float = 10.0
    keep_alive_timeout: float = 15.0
    max_outsider_requests: int = 16


@attrs.frozen
class ClusterConfig:
    """A validated peers.yml. Frozen: a reload swaps the whole object at once."""

    peers: tuple[PeerConfig, ...]
    allow_insecure_peers: bool = False
    tls: TlsConfig = TlsConfig()
    quorum_rule: str = "majority"
    byzantine_deviation_threshold: float = 0.3
    byzantine_window_count: int = 3
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
