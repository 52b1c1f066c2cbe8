"""Ed25519 keys, the canonical observation message (SPEC §3), sign and verify."""

from __future__ import annotations

import functools
import hashlib
import os
import stat
from pathlib import Path

import nacl.exceptions
import nacl.signing
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from . import durable
from ._exceptions import ConfigError
from .models import Observation, TisComponents, unix_seconds

SECRET_KEY_FILE = "node_id.sec"
PUBLIC_KEY_FILE = "node_id.pub"


def signing_message(
    *,
    node_id: str,
    audit_id: int,
    round_id: str,
    window_hours: int,
    timestamp: str,
    forecast_hash: str,
    outcome_hash: str,
    tis_components: TisComponents,
    tis_overall: float,
    bias_flags: tuple[str, ...] | list[str],
) -> bytes:
    """The exact bytes a node signs for an observation."""
    return (
        f"anna-obs-v1|{node_id}|{audit_id}|{round_id}|{window_hours}|"
        f"{unix_seconds(timestamp)}|{forecast_hash}|{outcome_hash}|{tis_overall:.6f}|"
        f"{tis_components.prediction_accuracy:.6f}|{tis_components.ethical_alignment:.6f}|"
        f"{tis_components.coherence_stability:.6f}|{','.join(sorted(bias_flags))}"
    ).encode()


def observation_message(obs: Observation) -> bytes:
    """The bytes the observation's signature covers (built once per observation)."""
    message: bytes | None = obs.memo.get("message")
    if message is None:
        message = obs.memo["message"] = signing_message(
            node_id=obs.node_id,
            audit_id=obs.audit_id,
            round_id=obs.round_id,
            window_hours=obs.window_hours,
            timestamp=obs.timestamp,
            forecast_hash=obs.forecast_hash,
            outcome_hash=obs.outcome_hash,
            tis_components=obs.tis_components,
            tis_overall=obs.tis_overall,
            bias_flags=obs.bias_flags,
        )
    return message


def observation_digest(obs: Observation) -> str:
    """Identity of an observation: two observations are the same iff digests match."""
    digest: str | None = obs.memo.get("digest")
    if digest is None:
        material = observation_message(obs) + b"|" + obs.signature.encode()
        digest = obs.memo["digest"] = hashlib.sha256(material).hexdigest()
    return digest


def sign_observation(
    key: Ed25519PrivateKey,
    *,
    node_id: str,
    audit_id: int,
    round_id: str,
    window_hours: int,
    timestamp: str,
    forecast_hash: str,
    outcome_hash: str,
    tis_components: TisComponents,
    tis_overall: float,
    bias_flags: tuple[str, ...],
) -> Observation:
    fields = {
        "node_id": node_id,
        "audit_id": audit_id,
        "round_id": round_id,
        "window_hours": window_hours,
        "timestamp": timestamp,
        "forecast_hash": forecast_hash,
        "outcome_hash": outcome_hash,
        "tis_components": tis_components,
        "tis_overall": tis_overall,
        "bias_flags": bias_flags,
    }
    signature = key.sign(signing_message(**fields)).hex()  # type: ignore[arg-type]
    return Observation(signature=signature, **fields)  # type: ignore[arg-type]


def verify_observation(obs: Observation, public_key: Ed25519PublicKey) -> bool:
    """Verified by libsodium: twice as fast as OpenSSL's Ed25519 here (55 against 110 µs),
    and every node verifies every other validator's observation in every round."""
    try:
        _verify_key(public_key.public_bytes_raw()).verify(
            observation_message(obs), bytes.fromhex(obs.signature)
        )
    except (nacl.exceptions.BadSignatureError, ValueError):
        return False
    return True


@functools.lru_cache(maxsize=1024)
def _verify_key(raw: bytes) -> nacl.signing.VerifyKey:
    return nacl.signing.VerifyKey(raw)


def parse_public_key(hex_text: str) -> Ed25519PublicKey:
    """A public key from 64 lowercase hex chars; ValueError if it is not one."""
    text = hex_text.strip()
    if len(text) != 64 or text != text.lower():
        raise ValueError("an Ed25519 public key is 64 lowercase hex characters")
    return Ed25519PublicKey.from_public_bytes(bytes.fromhex(text))


def public_key_hex(key: Ed25519PrivateKey | Ed25519PublicKey) -> str:
    public = key.public_key() if isinstance(key, Ed25519PrivateKey) else key
    return public.public_bytes_raw().hex()


def load_private_key(keys_dir: Path) -> Ed25519PrivateKey:
    """Load the node's secret key; refuse a file group or others can read."""
    path = keys_dir / SECRET_KEY_FILE
    try:
        mode = path.stat().st_mode
        text = path.read_text().strip()
    except OSError as exc:
        raise ConfigError(f"cannot read secret key {path}: {exc.strerror}") from exc
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise ConfigError(
            f"secret key {path} is accessible by group/others (mode {stat.S_IMODE(mode):04o}); "
            "run: chmod 600 " + str(path)
        )
    if len(text) != 64:
        raise ConfigError(f"secret key {path}: expected 64 hex characters")
    try:
        return Ed25519PrivateKey.from_private_bytes(bytes.fromhex(text))
    except ValueError as exc:
        raise ConfigError(f"secret key {path}: not hex") from exc


def create_keypair(keys_dir: Path) -> Ed25519PrivateKey:
    """Write a new key pair (keys/ 0700, .sec 0600); refuses to overwrite one.

    Durable with its directory entries: a key that vanished at a power cut would make
    the node sign with a new key its peers do not know."""
    durable.make_dirs(keys_dir, mode=0o700)
    os.chmod(keys_dir, 0o700)
    key = Ed25519PrivateKey.generate()
    durable.create_new(keys_dir / SECRET_KEY_FILE, (key.private_bytes_raw().hex() + "\n").encode())
    durable.atomic_write_bytes(
        keys_dir / PUBLIC_KEY_FILE, (public_key_hex(key) + "\n").encode(), mode=0o644
    )
    return key


def load_or_create_key(keys_dir: Path) -> Ed25519PrivateKey:
    if (keys_dir / SECRET_KEY_FILE).exists():
        return load_private_key(keys_dir)
    return create_keypair(keys_dir)
