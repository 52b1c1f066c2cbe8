"""Why a TLS handshake failed, as one short label from a fixed set, on either side.

One classifier for `anna_tls_handshake_failures_total{side,reason}`: the server (a
client's certificate refused, a handshake that never finished) and the client (the
peer's certificate refused, or the peer refused ours) say the same thing the same way.
The label names what *this* side found wrong; an alert from the other side is
`rejected_by_peer`, and that side's own series says why.
"""

from __future__ import annotations

import ssl
from collections.abc import Iterable

__all__ = ["TLS_FAILURE_REASONS", "classify_tls_failure", "failure_label"]

TLS_FAILURE_REASONS = (
    "no_certificate",  # the peer presented none
    "unknown_ca",  # not issued by the cluster CA
    "certificate_expired",
    "certificate_not_yet_valid",  # most often a clock behind
    "certificate_revoked",  # in the CRL
    "crl_unavailable",
    "hostname_mismatch",  # the server's certificate does not name the address dialled
    "bad_certificate",  # any other verification failure
    "cn_mismatch",  # a valid certificate of another node than the one dialled
    "fingerprint_mismatch",  # not the pinned certificate
    "rejected_by_peer",  # the peer's alert refused us
    "closed_after_handshake",  # the peer closed before answering (TLS 1.3 refusal without alert)
    "timeout",  # the handshake did not finish in time
    "protocol",  # not TLS, no shared version or cipher, a broken record, EOF mid-handshake
    "other",
)

# OpenSSL X509_V_ERR_* codes of this side's certificate check.
_VERIFY_CODE_REASONS = {
    2: "unknown_ca",  # UNABLE_TO_GET_ISSUER_CERT
    3: "crl_unavailable",  # UNABLE_TO_GET_CRL
    7: "unknown_ca",  # CERT_SIGNATURE_FAILURE
    9: "certificate_not_yet_valid",  # CERT_NOT_YET_VALID
    10: "certificate_expired",  # CERT_HAS_EXPIRED
    18: "unknown_ca",  # DEPTH_ZERO_SELF_SIGNED_CERT
    19: "unknown_ca",  # SELF_SIGNED_CERT_IN_CHAIN
    20: "unknown_ca",  # UNABLE_TO_GET_ISSUER_CERT_LOCALLY
    21: "unknown_ca",  # UNABLE_TO_VERIFY_LEAF_SIGNATURE
    23: "certificate_revoked",  # CERT_REVOKED
    62: "hostname_mismatch",  # HOSTNAME_MISMATCH
    64: "hostname_mismatch",  # IP_ADDRESS_MISMATCH
}

# OpenSSL reasons that are not an alert from the peer.
_SSL_REASONS = {
    "PEER_DID_NOT_RETURN_A_CERTIFICATE": "no_certificate",
    "CERTIFICATE_VERIFY_FAILED": "bad_certificate",
    "HTTP_REQUEST": "protocol",
    "HTTPS_PROXY_REQUEST": "protocol",
    "WRONG_VERSION_NUMBER": "protocol",
    "UNSUPPORTED_PROTOCOL": "protocol",
    "UNKNOWN_PROTOCOL": "protocol",
    "VERSION_TOO_LOW": "protocol",
    "NO_SHARED_CIPHER": "protocol",
    "NO_APPLICATION_PROTOCOL": "protocol",
    "PACKET_LENGTH_TOO_LONG": "protocol",
    "RECORD_LAYER_FAILURE": "protocol",
    "UNEXPECTED_EOF_WHILE_READING": "protocol",
}


def _causes(exc: BaseException) -> Iterable[BaseException]:
    """`exc`, the exceptions it was raised from, and members of exception groups (a TLS
    failure reaches us as BrokenResourceError from the ssl.SSLError)."""
    pending, seen = [exc], set()
    while pending:
        current = pending.pop(0)
        if id(current) in seen:
            continue
        seen.add(id(current))
        yield current
        if isinstance(current, BaseExceptionGroup):
            pending.extend(current.exceptions)
        for linked in (current.__cause__, current.__context__):
            if linked is not None:
                pending.append(linked)


def classify_tls_failure(exc: BaseException) -> str:
    """One of TLS_FAILURE_REASONS for the ssl error in `exc`, however wrapped: this
    side's verify code, a peer's alert, then OpenSSL's reason; "other" when none."""
    for cause in _causes(exc):
        if isinstance(cause, ssl.SSLCertVerificationError):
            return _VERIFY_CODE_REASONS.get(cause.verify_code, "bad_certificate")
        if isinstance(cause, ssl.SSLEOFError):
            return "protocol"
        if isinstance(cause, ssl.SSLError):
            reason = str(cause.reason or "")
            if "_ALERT_" in reason:
                return "rejected_by_peer"
            return _SSL_REASONS.get(reason, "other")
    return "other"


def failure_label(refusal: str) -> str:
    """The label of a refusal that may carry detail after a colon
    (``cn_mismatch: got node_002, expected node_001``); "other" for an unknown kind."""
    kind = refusal.partition(":")[0].strip()
    return kind if kind in TLS_FAILURE_REASONS else "other"
