"""annactl certs: a small cluster CA for TLS/mTLS between nodes (SPEC §1, §7).

init-ca makes the CA, issue makes a node certificate (CN = node id, server + client
auth), fingerprint prints the pin for peers.yml, revoke adds a certificate to crl.pem.
Standard library only at module level (annactl --help stays fast).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

EXIT_OK, EXIT_BAD, EXIT_USAGE = 0, 1, 2


def register(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    certs = commands.add_parser(
        "certs",
        help="make and revoke TLS certificates for the cluster",
        description="A self-signed cluster CA and node certificates for mTLS between nodes. "
        "Exit 0 on success, 1 when an input file is missing or wrong, 2 on usage errors.",
    )
    actions = certs.add_subparsers(dest="certs_command", metavar="ACTION", required=True)

    init_ca = actions.add_parser(
        "init-ca",
        help="create a self-signed cluster CA",
        description="Write DIR/ca.pem, DIR/ca.key (mode 0600) and an empty DIR/crl.pem. "
        "Refuses to overwrite an existing CA.",
    )
    init_ca.add_argument("--out", type=Path, required=True, metavar="DIR", help="CA directory")
    init_ca.add_argument(
        "--common-name", default="anna-trio cluster CA", help="CA subject CN (default: %(default)s)"
    )
    init_ca.add_argument(
        "--days", type=int, default=3650, help="validity in days (default: %(default)s)"
    )
    init_ca.set_defaults(handler=run_init_ca)

    issue = actions.add_parser(
        "issue",
        help="issue a node certificate (server and client auth)",
        description="Write DIR/<node-id>.pem and DIR/<node-id>.key (mode 0600), signed by "
        "the CA in --ca-dir. CN = node id; each --san that is an IP address becomes an IP "
        "SAN, any other a DNS SAN. Existing files for the node are replaced (renewal).",
    )
    issue.add_argument("--ca-dir", type=Path, required=True, metavar="DIR", help="CA directory")
    issue.add_argument("--node-id", required=True, metavar="ID", help="node id, used as CN")
    issue.add_argument(
        "--san",
        nargs="+",
        action="extend",
        required=True,
        metavar="NAME",
        help="host name or IP address peers dial (repeatable)",
    )
    issue.add_argument("--out", type=Path, required=True, metavar="DIR", help="output directory")
    issue.add_argument(
        "--days", type=int, default=825, help="validity in days (default: %(default)s)"
    )
    issue.set_defaults(handler=run_issue)

    fingerprint = actions.add_parser(
        "fingerprint",
        help="print a certificate's SHA-256 fingerprint (for peers.yml pinning)",
        description="SHA-256 of the certificate's DER encoding, lowercase hex without "
        "colons: the `fingerprint:` value of a peer in peers.yml.",
    )
    fingerprint.add_argument("file", type=Path, metavar="FILE", help="certificate (PEM or DER)")
    fingerprint.set_defaults(handler=run_fingerprint)

    revoke = actions.add_parser(
        "revoke",
        help="add a certificate to the CA's CRL",
        description="Add CERT's serial number to --ca-dir's crl.pem and re-sign it. Nodes "
        "whose peers.yml sets tls.crl to a copy of it refuse the certificate after a reload.",
    )
    revoke.add_argument("--ca-dir", type=Path, required=True, metavar="DIR", help="CA directory")
    revoke.add_argument("cert", type=Path, metavar="CERT", help="certificate to revoke")
    revoke.set_defaults(handler=run_revoke)


def _fail(message: str, code: int = EXIT_BAD) -> int:
    print(f"annactl certs: {message}", file=sys.stderr)
    return code


def run_init_ca(args: argparse.Namespace) -> int:
    from ..pki import CertificateError, init_ca

    try:
        init_ca(args.out, common_name=args.common_name, days=args.days)
    except CertificateError as exc:
        return _fail(str(exc))
    except OSError as exc:
        return _fail(f"{exc.filename or args.out}: {exc.strerror}")
    print(f"CA written to {args.out}: ca.pem, ca.key (mode 0600), crl.pem")
    return EXIT_OK


def run_issue(args: argparse.Namespace) -> int:
    from ..models import NODE_ID_RE
    from ..pki import CertificateError, fingerprint, issue_cert

    if not NODE_ID_RE.fullmatch(args.node_id):
        return _fail(f"--node-id {args.node_id!r} must match {NODE_ID_RE.pattern}", EXIT_USAGE)
    if args.days < 1:
        return _fail(f"--days must be at least 1, got {args.days}", EXIT_USAGE)
    try:
        cert_path, key_path = issue_cert(
            args.ca_dir, node_id=args.node_id, sans=args.san, out_dir=args.out, days=args.days
        )
    except CertificateError as exc:
        return _fail(str(exc))
    except OSError as exc:
        return _fail(f"{exc.filename or args.out}: {exc.strerror}")
    print(f"certificate: {cert_path}")
    print(f"key:         {key_path} (mode 0600)")
    print(f"fingerprint: {fingerprint(cert_path)}")
    return EXIT_OK


def run_fingerprint(args: argparse.Namespace) -> int:
    from ..pki import CertificateError, fingerprint

    try:
        print(fingerprint(args.file))
    except CertificateError as exc:
        return _fail(str(exc))
    return EXIT_OK


def run_revoke(args: argparse.Namespace) -> int:
    from ..pki import CertificateError, fingerprint, revoke

    try:
        newly_revoked = revoke(args.ca_dir, args.cert)
    except CertificateError as exc:
        return _fail(str(exc))
    except OSError as exc:
        return _fail(f"{exc.filename or args.ca_dir}: {exc.strerror}")
    state = "revoked" if newly_revoked else "already revoked"
    print(f"{state}: {args.cert} (sha256 {fingerprint(args.cert)}); CRL: {args.ca_dir / 'crl.pem'}")
    return EXIT_OK
