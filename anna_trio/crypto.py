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
from .models import Observation, ObservationContent, content_of, unix_seconds

SECRET_KEY_FILE = "node_id.sec"
PUBLIC_KEY_FILE = "node_id.pub"


def signing_message(content: ObservationContent) -> bytes:
    """The exact bytes a node signs for an observation (an Observation is its content
    and a signature, so this gives the bytes its signature covers too)."""
    components = content.tis_components
    return (
        f"anna-obs-v1|{content.node_id}|{content.audit_id}|{content.round_id}|"
        f"{content.window_hours}|{unix_seconds(content.timestamp)}|{content.forecast_hash}|"
        f"{content.outcome_hash}|{content.tis_overall:.6f}|"
        f"{components.prediction_accuracy:.6f}|{components.ethical_alignment:.6f}|"
        f"{components.coherence_stability:.6f}|{','.join(sorted(content.bias_flags))}"
    ).encode()


def observation_message(obs: Observation) -> bytes:
    """The bytes the observation's signature covers (built once per observation)."""
    message: bytes | None = obs.memo.get("message")
    if message is None:
        message = obs.memo["message"] = signing_message(obs)
    return message


def observation_digest(obs: Observation) -> str:
    """Identity of an observation: two observations are the same iff digests match."""
    digest: str | None = obs.memo.get("digest")
    if digest is None:
        material = observation_message(obs) + b"|" + obs.signature.encode()
        digest = obs.memo["digest"] = hashlib.sha256(material).hexdigest()
    return digest


def sign_observation(key: Ed25519PrivateKey, content: ObservationContent) -> Observation:
    signature = key.sign(signing_message(content)).hex()
    return Observation(**content_of(content), signature=signature)


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
