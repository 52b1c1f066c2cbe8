"""TLS at run time: the mTLS contexts of the daemon, its peer links and annactl's client,
the reloadable server context, and who answered a handshake. Certificates are made
offline by anna_trio.pki.

The server context wants a client certificate signed by the cluster CA (and not
revoked when a CRL is set); the client context checks the server's certificate
against the same CA and the address dialled. Which *node* answered is checked after
the handshake by `check_peer_identity`.

`ReloadableServerContext` exists because a server takes its SSLContext once, at
start. It hands out one context object whose `wrap_bio` (what trio.SSLStream calls)
delegates to the current inner context, so a reload (new certificates, CA or CRL)
applies in full to every connection accepted afterwards; open connections keep theirs.
"""

from __future__ import annotations

import ssl
from pathlib import Path
from typing import Literal, Protocol

from cryptography import x509
from cryptography.x509.oid import NameOID

from .models import TlsConfig
from .pki import CertificateError, fingerprint_der

__all__ = [
    "PeerCertificateSource",
    "ReloadableServerContext",
    "check_peer_identity",
    "client_context",
    "server_context",
]

ALPN_PROTOCOLS = ["http/1.1"]


# ---------------------------------------------------------------------------------------
# SSL contexts


def _require(field: str, path: Path | None) -> Path:
    if path is None:
        raise CertificateError(f"{field}: required when tls.enabled is true")
    return path


def _harden(context: ssl.SSLContext, tls: TlsConfig) -> None:
    """Settings both sides share: TLS 1.2 or newer, no compression or renegotiation,
    only the cluster CA (no system roots), the CRL when one is set, HTTP/1.1 via ALPN."""
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.options |= ssl.OP_NO_COMPRESSION | ssl.OP_NO_RENEGOTIATION
    context.verify_mode = ssl.CERT_REQUIRED
    context.load_verify_locations(cafile=str(_require("tls.ca_cert", tls.ca_cert)))
    if tls.crl is not None:
        context.load_verify_locations(cafile=str(tls.crl))
        context.verify_flags |= ssl.VERIFY_CRL_CHECK_LEAF
    context.set_alpn_protocols(ALPN_PROTOCOLS)


def server_context(tls: TlsConfig) -> ssl.SSLContext:
    """Server side of mTLS: presents server_cert, requires a client certificate from the
    cluster CA, not revoked by the CRL. No session tickets, so a client is re-verified
    on every connection (a reload's new CRL applies to it at once)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    _harden(context, tls)
    context.options |= ssl.OP_NO_TICKET | ssl.OP_CIPHER_SERVER_PREFERENCE
    context.num_tickets = 0
    context.load_cert_chain(
        certfile=str(_require("tls.server_cert", tls.server_cert)),
        keyfile=str(_require("tls.server_key", tls.server_key)),
    )
    return context


def client_context(tls: TlsConfig) -> ssl.SSLContext:
    """Client side of mTLS: presents client_cert and verifies the server against the
    cluster CA and the dialled address (pass it as `server_hostname`)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    _harden(context, tls)
    context.check_hostname = True
    context.load_cert_chain(
        certfile=str(_require("tls.client_cert", tls.client_cert)),
        keyfile=str(_require("tls.client_key", tls.client_key)),
    )
    return context


class _DelegatingServerContext(ssl.SSLContext):
    """The SSLContext the server keeps: each new connection is wrapped by whatever inner
    context its owner holds at that moment, so CA, CRL, verify flags, certificate and
    session cache all change together. (Swapping `ssl_object.context` in an
    sni_callback does not: the verify flags stay those of the first context, so a CRL
    added by a reload would be ignored.) Its own certificate settings are unused."""

    _owner: ReloadableServerContext

    def __new__(cls, owner: ReloadableServerContext) -> _DelegatingServerContext:
        context = super().__new__(cls, ssl.PROTOCOL_TLS_SERVER)
        context._owner = owner
        return context

    def wrap_bio(
        self,
        incoming: ssl.MemoryBIO,
        outgoing: ssl.MemoryBIO,
        server_side: bool = False,
        server_hostname: str | bytes | None = None,
        session: ssl.SSLSession | None = None,
    ) -> ssl.SSLObject:
        return self._owner.current.wrap_bio(
            incoming, outgoing, server_side, server_hostname, session
        )


class ReloadableServerContext:
    """One SSLContext handed to the server once; `update` swaps the certificate, CA and
    CRL used for connections accepted afterwards, without a restart. (Why a handshake
    failed is the server's to count: `anna_trio.transport.tlsfailure`.)
    """

    def __init__(self, tls: TlsConfig) -> None:
        self.current = server_context(tls)
        self._context = _DelegatingServerContext(self)

    @property
    def context(self) -> ssl.SSLContext:
        """The context to give the server once; reloads change what it delegates to."""
        return self._context

    def update(self, tls: TlsConfig) -> None:
        """Build the new inner context first (raising leaves the old one in place), then
        swap it in for new connections; open connections are untouched."""
        self.use(self.prepare(tls))

    def prepare(self, tls: TlsConfig) -> ssl.SSLContext:
        """The inner context `tls` describes, built but not yet in use (raises on bad
        material, changing nothing)."""
        return server_context(tls)

    def use(self, context: ssl.SSLContext) -> None:
        """Serve new connections with a context `prepare` built."""
        self.current = context


# ---------------------------------------------------------------------------------------
# After the handshake: who answered


class PeerCertificateSource(Protocol):
    """Anything that can show the peer's certificate after the handshake:
    ssl.SSLObject, ssl.SSLSocket, trio.SSLStream."""

    def getpeercert(self, binary_form: Literal[True]) -> bytes | None: ...


def check_peer_identity(
    ssl_object: PeerCertificateSource, *, expected_node_id: str, pinned_fingerprint: str | None
) -> str | None:
    """None when the peer's certificate names `expected_node_id` (CN) and matches the
    pin (when set); otherwise why not, for logs, starting with its metric label
    (`no_certificate`, `cn_mismatch: …`, `fingerprint_mismatch`)."""
    der = ssl_object.getpeercert(binary_form=True)
    if not der:
        return "no_certificate"
    certificate = x509.load_der_x509_certificate(der)
    common_names = certificate.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    got = str(common_names[0].value) if common_names else ""
    if got != expected_node_id:
        return f"cn_mismatch: got {got or '<none>'}, expected {expected_node_id}"
    if pinned_fingerprint is not None:
        wanted = pinned_fingerprint.replace(":", "").lower()
        if fingerprint_der(der) != wanted:
            return "fingerprint_mismatch"
    return None
