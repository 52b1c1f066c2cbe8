"""The cluster's PKI, offline: a small CA, node certificates, CRLs, fingerprints, and the
check of configured TLS material (used by `annactl certs`, the testnet and config
validation). The daemon's connections use anna_trio.tls.

Material is made and checked with `cryptography`. Node certificates carry CN = node
id and serve for both server and client auth, so one certificate per node is enough.
Checking configured material reads the files and the clock at the edge
(`check_tls_material`); judging what was read is pure (`tls_material_problems`).
"""

from __future__ import annotations

import hashlib
import ipaddress
from collections.abc import Callable, Iterable, Mapping, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from ._exceptions import AnnaError
from .durable import atomic_write_bytes, make_dirs
from .models import NODE_ID_RE, TLS_FILES, TlsConfig

__all__ = [
    "CertificateError",
    "check_tls_material",
    "fingerprint",
    "fingerprint_der",
    "init_ca",
    "issue_cert",
    "read_tls_material",
    "revoke",
    "tls_material_problems",
]

CA_CERT_NAME = "ca.pem"
CA_KEY_NAME = "ca.key"
CRL_NAME = "crl.pem"
CLOCK_SKEW_ALLOWANCE = timedelta(minutes=5)
"""New certificates start this far in the past so that a peer whose clock is a little
behind does not refuse them as not yet valid."""


class CertificateError(AnnaError, ValueError):
    """Raised by the certificate tools (init_ca, issue_cert, revoke, fingerprint) on bad
    input: missing or unparsable files, a CA that already exists, a foreign certificate."""


# ---------------------------------------------------------------------------------------
# Files


def _read_bytes(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError as exc:
        raise CertificateError(f"{path}: file not found") from exc
    except OSError as exc:
        raise CertificateError(f"{path}: cannot read: {exc.strerror}") from exc


def _load_certificate(path: Path) -> x509.Certificate:
    """The first certificate in a PEM file (a DER file is accepted too)."""
    data = _read_bytes(path)
    try:
        if b"-----BEGIN" in data:
            return x509.load_pem_x509_certificates(data)[0]
        return x509.load_der_x509_certificate(data)
    except ValueError as exc:
        raise CertificateError(f"{path}: not a valid certificate") from exc


def _load_ca(ca_dir: Path) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    certificate = _load_certificate(ca_dir / CA_CERT_NAME)
    key_path = ca_dir / CA_KEY_NAME
    try:
        key = serialization.load_pem_private_key(_read_bytes(key_path), password=None)
    except (ValueError, TypeError) as exc:
        raise CertificateError(f"{key_path}: not a valid unencrypted private key") from exc
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise CertificateError(f"{key_path}: expected an EC key as made by init-ca")
    if not _same_public_key(certificate, key):
        raise CertificateError(f"{key_path}: key does not match {ca_dir / CA_CERT_NAME}")
    return certificate, key


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _same_public_key(certificate: x509.Certificate, key: Any) -> bool:
    spki = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    return bool(
        certificate.public_key().public_bytes(*spki) == key.public_key().public_bytes(*spki)
    )


# ---------------------------------------------------------------------------------------
# CA, certificates, CRL


def init_ca(out_dir: Path, *, common_name: str = "anna-trio cluster CA", days: int = 3650) -> None:
    """Create a self-signed cluster CA in `out_dir`: ca.pem, ca.key (0600) and an empty
    crl.pem. Refuses to replace an existing CA: every node certificate depends on it."""
    out_dir = Path(out_dir)
    for name in (CA_CERT_NAME, CA_KEY_NAME):
        if (out_dir / name).exists():
            raise CertificateError(f"{out_dir / name}: a CA already exists; refusing to overwrite")
    if days < 1:
        raise CertificateError(f"days must be at least 1, got {days}")
    make_dirs(out_dir)
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.now(UTC)
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    certificate = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - CLOCK_SKEW_ALLOWANCE)
        .not_valid_after(now + timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    atomic_write_bytes(out_dir / CA_KEY_NAME, _key_pem(key), mode=0o600)
    atomic_write_bytes(
        out_dir / CA_CERT_NAME, certificate.public_bytes(serialization.Encoding.PEM), mode=0o644
    )
    _write_crl(out_dir / CRL_NAME, certificate, key, revoked=[])


def _subject_alternative_names(sans: Iterable[str]) -> list[x509.GeneralName]:
    names: list[x509.GeneralName] = []
    for san in sans:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(san)))
        except ValueError:
            names.append(x509.DNSName(san))
    return names


def issue_cert(
    ca_dir: Path,
    *,
    node_id: str,
    sans: Sequence[str],
    out_dir: Path,
    days: int = 825,
    not_before: datetime | None = None,
    not_after: datetime | None = None,
) -> tuple[Path, Path]:
    """Issue a node certificate signed by the CA in `ca_dir`; returns (cert, key) paths,
    `out_dir/<node_id>.pem` and `out_dir/<node_id>.key` (0600).

    CN = node id; IP addresses in `sans` become IPAddress SANs, other names DNSName SANs;
    usable for server and client auth. Existing files are replaced atomically (renewal).
    `not_before` / `not_after` override the validity period (tests make expired ones).
    """
    if not NODE_ID_RE.fullmatch(node_id):
        raise CertificateError(f"node id {node_id!r} must match {NODE_ID_RE.pattern}")
    if not sans:
        raise CertificateError("at least one SAN (the address peers dial) is required")
    if days < 1:
        raise CertificateError(f"days must be at least 1, got {days}")
    ca_cert, ca_key = _load_ca(Path(ca_dir))
    out_dir = Path(out_dir)
    make_dirs(out_dir)
    now = datetime.now(UTC)
    start = not_before if not_before is not None else now - CLOCK_SKEW_ALLOWANCE
    end = not_after if not_after is not None else now + timedelta(days=days)
    key = ec.generate_private_key(ec.SECP256R1())
    ca_ski = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    certificate = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, node_id)]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(
            x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
            ),
            critical=False,
        )
        .add_extension(
            x509.SubjectAlternativeName(_subject_alternative_names(sans)), critical=False
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    cert_path, key_path = out_dir / f"{node_id}.pem", out_dir / f"{node_id}.key"
    atomic_write_bytes(key_path, _key_pem(key), mode=0o600)
    atomic_write_bytes(cert_path, certificate.public_bytes(serialization.Encoding.PEM), mode=0o644)
    return cert_path, key_path


def _write_crl(
    path: Path,
    ca_cert: x509.Certificate,
    ca_key: ec.EllipticCurvePrivateKey,
    revoked: Iterable[x509.RevokedCertificate],
) -> None:
    """Sign and write a CRL valid until the CA itself expires: a CRL past its next_update
    makes OpenSSL refuse every certificate, and nobody re-signs a test CA's CRL on a
    schedule."""
    now = datetime.now(UTC)
    builder = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(ca_cert.subject)
        .last_update(now - CLOCK_SKEW_ALLOWANCE)
        .next_update(max(ca_cert.not_valid_after_utc, now + timedelta(days=1)))
    )
    for entry in revoked:
        builder = builder.add_revoked_certificate(entry)
    crl = builder.sign(ca_key, hashes.SHA256())
    atomic_write_bytes(path, crl.public_bytes(serialization.Encoding.PEM), mode=0o644)


def revoke(ca_dir: Path, cert_path: Path) -> bool:
    """Add `cert_path`'s serial to `ca_dir/crl.pem` and re-sign it; False when it was
    already revoked (nothing changes). A certificate this CA did not issue is refused."""
    ca_dir = Path(ca_dir)
    ca_cert, ca_key = _load_ca(ca_dir)
    certificate = _load_certificate(Path(cert_path))
    try:
        certificate.verify_directly_issued_by(ca_cert)
    except (ValueError, TypeError, InvalidSignature) as exc:
        raise CertificateError(f"{cert_path}: not issued by the CA in {ca_dir}") from exc
    crl_path = ca_dir / CRL_NAME
    revoked: list[x509.RevokedCertificate] = []
    if crl_path.exists():
        crl = _load_crl(crl_path)
        if not crl.is_signature_valid(ca_cert.public_key()):  # type: ignore[arg-type]
            raise CertificateError(f"{crl_path}: not signed by the CA in {ca_dir}")
        if crl.get_revoked_certificate_by_serial_number(certificate.serial_number) is not None:
            return False
        revoked = list(crl)
    entry = (
        x509.RevokedCertificateBuilder()
        .serial_number(certificate.serial_number)
        .revocation_date(datetime.now(UTC))
        .build()
    )
    _write_crl(crl_path, ca_cert, ca_key, [*revoked, entry])
    return True


def _load_crl(path: Path) -> x509.CertificateRevocationList:
    data = _read_bytes(path)
    try:
        if b"-----BEGIN" in data:
            return x509.load_pem_x509_crl(data)
        return x509.load_der_x509_crl(data)
    except ValueError as exc:
        raise CertificateError(f"{path}: not a valid CRL") from exc


def fingerprint_der(der: bytes) -> str:
    """SHA-256 of a DER certificate: lowercase hex, no colons (peers.yml `fingerprint`)."""
    return hashlib.sha256(der).hexdigest()


def fingerprint(cert_path: Path) -> str:
    """SHA-256 fingerprint of the (first) certificate in `cert_path`, for pinning."""
    certificate = _load_certificate(Path(cert_path))
    return fingerprint_der(certificate.public_bytes(serialization.Encoding.DER))


# ---------------------------------------------------------------------------------------
# Checking configured material (start-up, reload, `annactl config check`)


def _validity_problems(
    field: str, path: Path, certificate: x509.Certificate, now: datetime
) -> list[str]:
    if now < certificate.not_valid_before_utc:
        start = certificate.not_valid_before_utc.isoformat()
        return [f"{field}: {path}: certificate not yet valid (valid from {start})"]
    if now > certificate.not_valid_after_utc:
        return [
            f"{field}: {path}: certificate expired at {certificate.not_valid_after_utc.isoformat()}"
        ]
    return []


def _issued_by_any(certificate: x509.Certificate, cas: Sequence[x509.Certificate]) -> bool:
    for ca in cas:
        try:
            certificate.verify_directly_issued_by(ca)
        except (ValueError, TypeError, InvalidSignature):
            continue
        return True
    return False


TlsMaterial = Mapping[str, bytes | str]
"""Each configured TLS file's bytes, by field (`ca_cert` …), or why it could not be read."""


def check_tls_material(tls: TlsConfig, *, now: datetime | None = None) -> list[str]:
    """Every problem with the configured TLS files, each naming the field and the file
    (`tls.server_cert: /x/server.pem: file not found`). Empty when TLS is off or good.
    The edge: reads the files, and the clock unless `now` is given."""
    if not tls.enabled:
        return []
    return tls_material_problems(tls, read_tls_material(tls), now or datetime.now(UTC))


def read_tls_material(tls: TlsConfig) -> dict[str, bytes | str]:
    """The bytes of every file `tls` names, or why each could not be read."""
    material: dict[str, bytes | str] = {}
    for field in (*TLS_FILES, "crl"):
        path: Path | None = getattr(tls, field)
        if path is None:
            continue
        try:
            material[field] = path.read_bytes()
        except FileNotFoundError:
            material[field] = "file not found"
        except OSError as exc:
            material[field] = f"cannot read: {exc.strerror}"
    return material


def tls_material_problems(tls: TlsConfig, material: TlsMaterial, now: datetime) -> list[str]:
    """What is wrong with the material read for `tls`, judged at `now` (pure)."""
    problems: list[str] = []

    def load(key: str, loader: Callable[[bytes], Any], what: str) -> Any:
        field, path, data = f"tls.{key}", getattr(tls, key), material.get(key)
        if path is None:
            problems.append(f"{field}: required when tls.enabled is true")
            return None
        if not isinstance(data, bytes):
            problems.append(f"{field}: {path}: {data or 'not read'}")
            return None
        try:
            return loader(data)
        except (ValueError, TypeError, IndexError):
            problems.append(f"{field}: {path}: not a valid PEM {what}")
            return None

    cas: list[x509.Certificate] | None = load(
        "ca_cert", x509.load_pem_x509_certificates, "certificate"
    )
    if cas is not None and tls.ca_cert is not None:
        for ca in cas:
            problems += _validity_problems("tls.ca_cert", tls.ca_cert, ca, now)

    crl: x509.CertificateRevocationList | None = None
    if tls.crl is not None:
        crl = load("crl", x509.load_pem_x509_crl, "CRL")
        if crl is not None and cas:
            if not any(crl.is_signature_valid(ca.public_key()) for ca in cas):  # type: ignore[arg-type]
                problems.append(f"tls.crl: {tls.crl}: not signed by the CA in tls.ca_cert")
            elif crl.next_update_utc is not None and now > crl.next_update_utc:
                problems.append(
                    f"tls.crl: {tls.crl}: CRL expired at {crl.next_update_utc.isoformat()} "
                    "(every certificate would be refused)"
                )

    for side in ("server", "client"):
        cert_key, key_key = f"{side}_cert", f"{side}_key"
        cert_path, key_path = getattr(tls, cert_key), getattr(tls, key_key)
        certificate: x509.Certificate | None = load(
            cert_key, lambda data: x509.load_pem_x509_certificates(data)[0], "certificate"
        )
        key = load(
            key_key,
            lambda data: serialization.load_pem_private_key(data, password=None),
            "private key (unencrypted)",
        )
        if certificate is None or cert_path is None:
            continue
        cert_field, key_field = f"tls.{cert_key}", f"tls.{key_key}"
        if key is not None and not _same_public_key(certificate, key):
            problems.append(f"{key_field}: {key_path}: key does not match {cert_field} {cert_path}")
        if cas and not _issued_by_any(certificate, cas):
            problems.append(
                f"{cert_field}: {cert_path}: certificate not signed by the CA in tls.ca_cert"
            )
        problems += _validity_problems(cert_field, cert_path, certificate, now)
        if crl is not None and crl.get_revoked_certificate_by_serial_number(
            certificate.serial_number
        ):
            problems.append(f"{cert_field}: {cert_path}: certificate is revoked by tls.crl")
    return problems
