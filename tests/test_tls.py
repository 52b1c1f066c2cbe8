"""TLS material and contexts: real handshakes over trio memory streams and TCP."""

from __future__ import annotations

import functools
import shutil
import ssl
import stat
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, cast

import attrs
import pytest
import trio
import trio.testing
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from anna_trio import pki as pki_tools
from anna_trio import tls
from anna_trio.models import TlsConfig
from anna_trio.transport.tlsfailure import classify_tls_failure

NOW = datetime.now(UTC)


@attrs.define
class Pki:
    """Certificates for the tests: one cluster CA, a foreign CA and assorted node certs."""

    root: Path
    ca: Path
    other_ca: Path
    empty_crl: Path
    certs: dict[str, tuple[Path, Path]]

    def config(
        self, server: str = "node_001", client: str = "node_002", **changes: Any
    ) -> TlsConfig:
        """A TlsConfig with `server` and `client` certificates from `certs`."""
        server_cert, server_key = self.certs[server]
        client_cert, client_key = self.certs[client]
        base = TlsConfig(
            enabled=True,
            ca_cert=self.ca / "ca.pem",
            server_cert=server_cert,
            server_key=server_key,
            client_cert=client_cert,
            client_key=client_key,
            crl=self.empty_crl,
        )
        return attrs.evolve(base, **changes)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    root = tmp_path_factory.mktemp("pki")
    ca, other_ca = root / "ca", root / "other_ca"
    pki_tools.init_ca(ca)
    pki_tools.init_ca(other_ca, common_name="someone else's CA")
    empty_crl = root / "crl_empty.pem"
    shutil.copy(ca / "crl.pem", empty_crl)
    sans = ["127.0.0.1", "localhost"]
    certs = {
        name: pki_tools.issue_cert(ca, node_id=name, sans=sans, out_dir=root / "nodes")
        for name in ("node_001", "node_002", "node_003")
    }
    certs["renewed_001"] = pki_tools.issue_cert(
        ca, node_id="node_001", sans=sans, out_dir=root / "renewed"
    )
    certs["foreign"] = pki_tools.issue_cert(
        other_ca, node_id="node_002", sans=sans, out_dir=root / "foreign"
    )
    certs["expired"] = pki_tools.issue_cert(
        ca,
        node_id="node_002",
        sans=sans,
        out_dir=root / "expired",
        not_before=NOW - timedelta(days=30),
        not_after=NOW - timedelta(days=1),
    )
    certs["future"] = pki_tools.issue_cert(
        ca,
        node_id="node_002",
        sans=sans,
        out_dir=root / "future",
        not_before=NOW + timedelta(days=1),
        not_after=NOW + timedelta(days=30),
    )
    pki_tools.revoke(ca, certs["node_003"][0])
    return Pki(root=root, ca=ca, other_ca=other_ca, empty_crl=empty_crl, certs=certs)


@attrs.define
class Exchange:
    """What happened on each side of one connection."""

    server_error: BaseException | None = None
    client_error: BaseException | None = None
    reply: bytes | None = None
    server_fingerprint: str | None = None
    identity_problem: str | None = "not checked"
    alpn: str | None = None

    @property
    def server_reason(self) -> str | None:
        return None if self.server_error is None else classify_tls_failure(self.server_error)

    @property
    def client_reason(self) -> str | None:
        return None if self.client_error is None else classify_tls_failure(self.client_error)


async def exchange(
    server_ctx: ssl.SSLContext,
    client_ctx: ssl.SSLContext,
    *,
    server_hostname: str = "127.0.0.1",
    expected_node_id: str = "node_001",
    pin: str | None = None,
) -> Exchange:
    """Handshake over a memory stream pair, then one ping/pong; the server closes on
    failure as hypercorn does."""
    client_transport, server_transport = trio.testing.memory_stream_pair()
    server = trio.SSLStream(server_transport, server_ctx, server_side=True)
    client = trio.SSLStream(client_transport, client_ctx, server_hostname=server_hostname)
    result = Exchange()

    async def serve() -> None:
        try:
            await server.do_handshake()
            await server.send_all(b"pong:" + await server.receive_some())
        except trio.BrokenResourceError as exc:
            result.server_error = exc
        finally:
            await trio.aclose_forcefully(server)

    async def talk() -> None:
        try:
            await client.do_handshake()
            result.server_fingerprint = pki_tools.fingerprint_der(
                client.getpeercert(binary_form=True)
            )
            result.identity_problem = tls.check_peer_identity(
                client, expected_node_id=expected_node_id, pinned_fingerprint=pin
            )
            result.alpn = client.selected_alpn_protocol()
            await client.send_all(b"ping")
            result.reply = bytes(await client.receive_some())
        except trio.BrokenResourceError as exc:
            result.client_error = exc
        finally:
            await trio.aclose_forcefully(client)

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(serve)
            nursery.start_soon(talk)
    return result


def no_client_cert_context(config: TlsConfig) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.load_verify_locations(cafile=str(config.ca_cert))
    return context


async def test_mutual_auth_succeeds(pki: Pki) -> None:
    """Two certificates from the cluster CA talk; the client sees the expected node."""
    config = pki.config()
    result = await exchange(tls.server_context(config), tls.client_context(config))
    assert result.server_error is None
    assert result.reply == b"pong:ping"
    assert result.identity_problem is None
    assert result.alpn == "http/1.1"


async def test_client_without_certificate_is_refused(pki: Pki) -> None:
    """The server refuses a client that presents no certificate."""
    config = pki.config()
    result = await exchange(tls.server_context(config), no_client_cert_context(config))
    assert result.server_reason == "no_certificate"
    assert result.reply is None
    assert result.client_error is not None


@pytest.mark.parametrize(
    ("client", "reason"),
    [
        ("foreign", "unknown_ca"),
        ("expired", "certificate_expired"),
        ("future", "certificate_not_yet_valid"),
        ("node_003", "certificate_revoked"),
    ],
)
async def test_bad_client_certificate_is_refused(pki: Pki, client: str, reason: str) -> None:
    """Foreign-CA, expired, not-yet-valid and revoked client certificates are refused."""
    server_config = pki.config(crl=pki.ca / "crl.pem")
    result = await exchange(
        tls.server_context(server_config), tls.client_context(pki.config(client=client))
    )
    assert result.server_reason == reason
    assert result.reply is None


async def test_server_from_other_ca_is_refused_by_client(pki: Pki) -> None:
    """A client facing a server certificate from another CA fails with unknown_ca."""
    server = tls.server_context(
        pki.config(server="foreign", ca_cert=pki.other_ca / "ca.pem", crl=None)
    )
    result = await exchange(server, tls.client_context(pki.config()))
    assert result.client_reason == "unknown_ca"
    assert result.reply is None


async def test_client_checks_the_address_it_dialled(pki: Pki) -> None:
    """A server certificate without the dialled name fails with hostname_mismatch."""
    config = pki.config()
    result = await exchange(
        tls.server_context(config), tls.client_context(config), server_hostname="anna-node-9"
    )
    assert result.client_reason == "hostname_mismatch"


async def test_client_detects_wrong_node_and_wrong_pin(pki: Pki) -> None:
    """check_peer_identity reports a CN mismatch and a fingerprint mismatch; a right pin
    passes whatever its spelling."""
    config = pki.config()
    server, client = tls.server_context(config), tls.client_context(config)
    wrong_node = await exchange(server, client, expected_node_id="node_002")
    assert wrong_node.identity_problem == "cn_mismatch: got node_001, expected node_002"
    wrong_pin = await exchange(server, client, pin="0" * 64)
    assert wrong_pin.identity_problem == "fingerprint_mismatch"
    right = pki_tools.fingerprint(pki.certs["node_001"][0])
    spelled = ":".join(right[i : i + 2] for i in range(0, 64, 2)).upper()
    assert (await exchange(server, client, pin=spelled)).identity_problem is None


async def test_reload_with_new_crl_refuses_new_connections_only(pki: Pki) -> None:
    """After update with a CRL revoking a good client, new connections are refused while
    one opened before the update keeps working."""
    reloadable = tls.ReloadableServerContext(pki.config())
    client_config = pki.config(client="node_003")
    assert (await exchange(reloadable.context, tls.client_context(client_config))).reply

    client_transport, server_transport = trio.testing.memory_stream_pair()
    server = trio.SSLStream(server_transport, reloadable.context, server_side=True)
    client = trio.SSLStream(
        client_transport, tls.client_context(client_config), server_hostname="127.0.0.1"
    )
    async with trio.open_nursery() as nursery:
        nursery.start_soon(server.do_handshake)
        nursery.start_soon(client.do_handshake)

    reloadable.update(pki.config(crl=pki.ca / "crl.pem"))
    refused = await exchange(reloadable.context, tls.client_context(client_config))
    assert refused.server_reason == "certificate_revoked"

    await client.send_all(b"still here")
    assert await server.receive_some() == b"still here"


async def test_reload_can_add_a_crl(pki: Pki) -> None:
    """A CRL added by a reload (none at start) is enforced; an sni_callback swap would
    silently keep the start-up verify flags."""
    reloadable = tls.ReloadableServerContext(pki.config(crl=None))
    reloadable.update(pki.config(crl=pki.ca / "crl.pem"))
    refused = await exchange(reloadable.context, tls.client_context(pki.config(client="node_003")))
    assert refused.server_reason == "certificate_revoked"


async def test_reload_can_replace_the_ca(pki: Pki) -> None:
    """After update to another CA, clients of the old CA are refused as unknown_ca."""
    reloadable = tls.ReloadableServerContext(pki.config())
    reloadable.update(pki.config(ca_cert=pki.other_ca / "ca.pem", crl=None))
    refused = await exchange(reloadable.context, tls.client_context(pki.config()))
    assert refused.server_reason == "unknown_ca"


async def test_reload_serves_the_renewed_certificate(pki: Pki) -> None:
    """After update with a renewed server certificate, new connections get it."""
    reloadable = tls.ReloadableServerContext(pki.config())
    client = tls.client_context(pki.config())
    before = await exchange(reloadable.context, client)
    assert before.server_fingerprint == pki_tools.fingerprint(pki.certs["node_001"][0])
    reloadable.update(pki.config(server="renewed_001"))
    after = await exchange(reloadable.context, client)
    assert after.server_fingerprint == pki_tools.fingerprint(pki.certs["renewed_001"][0])
    assert after.reply == b"pong:ping"


async def test_failed_update_keeps_the_old_context(pki: Pki) -> None:
    """An update with a missing file raises and the previous material stays in use."""
    reloadable = tls.ReloadableServerContext(pki.config())
    with pytest.raises(OSError):
        reloadable.update(pki.config(ca_cert=pki.root / "missing.pem"))
    assert (
        await exchange(reloadable.context, tls.client_context(pki.config()))
    ).reply == b"pong:ping"


# --- check_tls_material -------------------------------------------------------------


def test_good_material_has_no_problems(pki: Pki) -> None:
    """Matching, current certificates from the CA produce no problems; TLS off none."""
    assert pki_tools.check_tls_material(pki.config()) == []
    assert pki_tools.check_tls_material(TlsConfig(enabled=False, ca_cert=pki.root / "nope")) == []


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


MaterialCase = Callable[[Pki, Path], tuple[TlsConfig, str, str]]

MATERIAL_CASES: dict[str, MaterialCase] = {
    "missing file": lambda pki, tmp: (
        pki.config(server_cert=tmp / "server.pem"),
        "tls.server_cert",
        "file not found",
    ),
    "bad PEM": lambda pki, tmp: (
        pki.config(client_cert=_write(tmp / "client.pem", b"-----BEGIN CERTIFICATE-----\nxx\n")),
        "tls.client_cert",
        "not a valid PEM certificate",
    ),
    "bad key PEM": lambda pki, tmp: (
        pki.config(server_key=_write(tmp / "server.key", b"garbage")),
        "tls.server_key",
        "not a valid PEM private key",
    ),
    "mismatched key": lambda pki, tmp: (
        pki.config(server_key=pki.certs["node_002"][1]),
        "tls.server_key",
        "key does not match",
    ),
    "other CA": lambda pki, tmp: (
        pki.config(client="foreign"),
        "tls.client_cert",
        "not signed by the CA",
    ),
    "expired": lambda pki, tmp: (pki.config(client="expired"), "tls.client_cert", "expired at"),
    "not yet valid": lambda pki, tmp: (
        pki.config(client="future"),
        "tls.client_cert",
        "not yet valid",
    ),
    "revoked": lambda pki, tmp: (
        pki.config(server="node_003", crl=pki.ca / "crl.pem"),
        "tls.server_cert",
        "revoked",
    ),
    "CRL of other CA": lambda pki, tmp: (
        pki.config(crl=pki.other_ca / "crl.pem"),
        "tls.crl",
        "not signed by the CA",
    ),
    "bad CA PEM": lambda pki, tmp: (
        pki.config(ca_cert=_write(tmp / "ca.pem", b"not pem")),
        "tls.ca_cert",
        "not a valid PEM certificate",
    ),
}


@pytest.mark.parametrize("case", sorted(MATERIAL_CASES))
def test_material_problem_names_field_and_file(pki: Pki, tmp_path: Path, case: str) -> None:
    """Each broken piece of TLS material yields one message naming its field and file."""
    config, field, words = MATERIAL_CASES[case](pki, tmp_path)
    path = attrs.asdict(config)[field.removeprefix("tls.")]
    problems = pki_tools.check_tls_material(config)
    assert len(problems) == 1, problems
    assert problems[0].startswith(f"{field}: {path}: ")
    assert words in problems[0]


def test_unset_file_is_reported(pki: Pki) -> None:
    """A required field left out is reported by name."""
    assert pki_tools.check_tls_material(pki.config(client_key=None)) == [
        "tls.client_key: required when tls.enabled is true"
    ]


def test_material_is_judged_at_the_given_time(pki: Pki) -> None:
    """`now` decides expiry: good material is reported expired ten years on."""
    problems = pki_tools.check_tls_material(pki.config(), now=NOW + timedelta(days=3650 * 2))
    assert any(p.startswith("tls.ca_cert:") and "expired" in p for p in problems)
    assert any(p.startswith("tls.crl:") and "expired" in p for p in problems)


# --- making material ----------------------------------------------------------------


def test_init_ca_writes_private_key_0600_and_refuses_overwrite(tmp_path: Path) -> None:
    """init_ca writes ca.pem, ca.key (0600) and an empty CRL, and will not overwrite."""
    pki_tools.init_ca(tmp_path)
    assert stat.S_IMODE((tmp_path / "ca.key").stat().st_mode) == 0o600
    crl = x509.load_pem_x509_crl((tmp_path / "crl.pem").read_bytes())
    assert len(crl) == 0
    before = (tmp_path / "ca.pem").read_bytes()
    with pytest.raises(pki_tools.CertificateError, match="refusing to overwrite"):
        pki_tools.init_ca(tmp_path)
    assert (tmp_path / "ca.pem").read_bytes() == before


def test_issued_certificate_has_node_identity(pki: Pki) -> None:
    """CN is the node id, IP SANs are IP addresses, names are DNS names, both EKUs."""
    cert_path, key_path = pki.certs["node_001"]
    assert cert_path.name == "node_001.pem"
    assert stat.S_IMODE(key_path.stat().st_mode) == 0o600
    certificate = x509.load_pem_x509_certificate(cert_path.read_bytes())
    assert certificate.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "node_001"
    san = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert [str(ip) for ip in san.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]
    assert san.get_values_for_type(x509.DNSName) == ["localhost"]
    eku = certificate.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert set(eku) == {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}


@pytest.mark.parametrize("node_id", ["../evil", "", "a b", "x" * 65])
def test_issue_refuses_bad_node_id(pki: Pki, tmp_path: Path, node_id: str) -> None:
    """A node id outside SPEC §3's pattern (it becomes a file name) is refused."""
    with pytest.raises(pki_tools.CertificateError, match="node id"):
        pki_tools.issue_cert(pki.ca, node_id=node_id, sans=["localhost"], out_dir=tmp_path)


def test_revoke_is_idempotent_and_refuses_foreign_certs(tmp_path: Path, pki: Pki) -> None:
    """Revoking adds the serial once; a certificate from another CA is refused."""
    pki_tools.init_ca(tmp_path / "ca")
    cert, _ = pki_tools.issue_cert(
        tmp_path / "ca", node_id="n", sans=["localhost"], out_dir=tmp_path
    )
    assert pki_tools.revoke(tmp_path / "ca", cert) is True
    assert pki_tools.revoke(tmp_path / "ca", cert) is False
    crl = x509.load_pem_x509_crl((tmp_path / "ca" / "crl.pem").read_bytes())
    serial = x509.load_pem_x509_certificate(cert.read_bytes()).serial_number
    assert [entry.serial_number for entry in crl] == [serial]
    assert crl.next_update_utc is not None and crl.next_update_utc > NOW + timedelta(days=365)
    with pytest.raises(pki_tools.CertificateError, match="not issued by"):
        pki_tools.revoke(tmp_path / "ca", pki.certs["foreign"][0])


# --- classification ----------------------------------------------------------------


async def test_hypercorn_serves_mtls_with_reloadable_context(pki: Pki) -> None:
    """hypercorn given ReloadableServerContext.context via create_ssl_context serves mTLS
    and applies an update to the next connection."""
    from hypercorn.config import Config
    from hypercorn.trio import serve

    reloadable = tls.ReloadableServerContext(pki.config())

    class TlsConfigured(Config):
        @property
        def ssl_enabled(self) -> bool:
            return True

        def create_ssl_context(self) -> ssl.SSLContext:
            return reloadable.context

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while (await receive())["type"] != "lifespan.shutdown":
                await send({"type": "lifespan.startup.complete"})
            await send({"type": "lifespan.shutdown.complete"})
            return
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    config = TlsConfigured()
    config.bind = ["127.0.0.1:0"]
    config.loglevel = "WARNING"

    async def get(client: str) -> bytes:
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        ssl_stream = trio.SSLStream(
            stream, tls.client_context(pki.config(client=client)), server_hostname="127.0.0.1"
        )
        received = b""
        try:
            await ssl_stream.send_all(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            while chunk := await ssl_stream.receive_some():
                received += chunk
        except trio.BrokenResourceError:
            pass
        await trio.aclose_forcefully(ssl_stream)
        return received

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            shutdown = trio.Event()
            binds = await nursery.start(
                functools.partial(serve, cast(Any, app), config, shutdown_trigger=shutdown.wait)
            )
            port = int(binds[0].rsplit(":", 1)[1])
            assert (await get("node_003")).startswith(b"HTTP/1.1 200")
            reloadable.update(pki.config(crl=pki.ca / "crl.pem"))
            assert await get("node_003") == b""
            assert (await get("node_002")).startswith(b"HTTP/1.1 200")
            shutdown.set()
