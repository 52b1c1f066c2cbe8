"""annactl certs: init-ca, issue, fingerprint, revoke through the registered parser."""

from __future__ import annotations

import argparse
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography import x509

from anna_trio.cli import cmd_certs


def annactl_certs(*argv: str | Path) -> int:
    """Parse `annactl certs ...` with only this module registered and run the handler."""
    parser = argparse.ArgumentParser(prog="annactl")
    cmd_certs.register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["certs", *map(str, argv)])
    code: int = args.handler(args)
    return code


@pytest.fixture
def ca_dir(tmp_path: Path) -> Path:
    assert annactl_certs("init-ca", "--out", tmp_path / "ca") == 0
    return tmp_path / "ca"


def test_init_ca_writes_ca_with_private_key_0600(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """init-ca writes ca.pem, ca.key (0600) and crl.pem, and says where."""
    assert annactl_certs("init-ca", "--out", tmp_path / "ca") == 0
    assert {p.name for p in (tmp_path / "ca").iterdir()} == {"ca.pem", "ca.key", "crl.pem"}
    assert stat.S_IMODE((tmp_path / "ca" / "ca.key").stat().st_mode) == 0o600
    assert str(tmp_path / "ca") in capsys.readouterr().out


def test_init_ca_refuses_to_overwrite(ca_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A second init-ca into the same directory exits 1 with one line and changes nothing."""
    before = (ca_dir / "ca.key").read_bytes()
    capsys.readouterr()
    assert annactl_certs("init-ca", "--out", ca_dir) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "refusing to overwrite" in err
    assert (ca_dir / "ca.key").read_bytes() == before


def test_issue_accepts_repeated_and_multiple_sans(ca_dir: Path, tmp_path: Path) -> None:
    """--san a b and --san c both count; the files are <node-id>.pem/.key."""
    code = annactl_certs(
        "issue", "--ca-dir", ca_dir, "--node-id", "node_001",
        "--san", "127.0.0.1", "anna-node-1", "--san", "localhost", "--out", tmp_path / "n1",
    )  # fmt: skip
    assert code == 0
    assert stat.S_IMODE((tmp_path / "n1" / "node_001.key").stat().st_mode) == 0o600
    certificate = x509.load_pem_x509_certificate((tmp_path / "n1" / "node_001.pem").read_bytes())
    san = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["anna-node-1", "localhost"]
    assert [str(ip) for ip in san.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]


def test_fingerprint_matches_openssl(
    ca_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`certs fingerprint` prints what `openssl x509 -fingerprint -sha256` does, as pin text."""
    if shutil.which("openssl") is None:
        if os.environ.get("CI"):
            pytest.fail("openssl CLI missing (.ci/run installs it)")
        pytest.skip("openssl CLI not installed")
    annactl_certs(
        "issue", "--ca-dir", ca_dir, "--node-id", "n", "--san", "localhost", "--out", tmp_path
    )
    capsys.readouterr()
    assert annactl_certs("fingerprint", tmp_path / "n.pem") == 0
    ours = capsys.readouterr().out.strip()
    openssl = subprocess.run(
        ["openssl", "x509", "-noout", "-fingerprint", "-sha256", "-in", str(tmp_path / "n.pem")],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    assert ours == openssl.strip().split("=", 1)[1].replace(":", "").lower()
    assert len(ours) == 64


def test_revoke_adds_serial_to_crl(
    ca_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """revoke puts the certificate's serial into crl.pem; revoking again says so and keeps one entry."""
    annactl_certs(
        "issue", "--ca-dir", ca_dir, "--node-id", "n", "--san", "localhost", "--out", tmp_path
    )
    serial = x509.load_pem_x509_certificate((tmp_path / "n.pem").read_bytes()).serial_number
    assert annactl_certs("revoke", "--ca-dir", ca_dir, tmp_path / "n.pem") == 0
    assert annactl_certs("revoke", "--ca-dir", ca_dir, tmp_path / "n.pem") == 0
    assert "already revoked" in capsys.readouterr().out
    crl = x509.load_pem_x509_crl((ca_dir / "crl.pem").read_bytes())
    assert [entry.serial_number for entry in crl] == [serial]


@pytest.mark.parametrize(
    ("argv", "code", "words"),
    [
        (("issue", "--node-id", "../x", "--san", "h"), 2, "--node-id"),
        (("issue", "--node-id", "n", "--san", "h", "--days", "0"), 2, "--days"),
        (("fingerprint", "{tmp}/missing.pem"), 1, "missing.pem: file not found"),
        (("revoke", "{tmp}/missing.pem"), 1, "missing.pem: file not found"),
    ],
)
def test_bad_input_prints_one_line_and_exits_nonzero(
    ca_dir: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    argv: tuple[str, ...],
    code: int,
    words: str,
) -> None:
    """Bad node ids and days are usage errors (2); missing files are 1; one line each."""
    argv = tuple(a.format(tmp=tmp_path) for a in argv)
    if argv[0] == "issue":
        argv = (*argv, "--ca-dir", str(ca_dir), "--out", str(tmp_path / "out"))
    if argv[0] == "revoke":
        argv = ("revoke", "--ca-dir", str(ca_dir), argv[1])
    capsys.readouterr()
    assert annactl_certs(*argv) == code
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and words in err


def test_issue_without_ca_names_the_missing_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """issue against a directory with no CA exits 1 naming ca.pem."""
    code = annactl_certs(
        "issue", "--ca-dir", tmp_path / "none", "--node-id", "n", "--san", "h", "--out", tmp_path
    )
    assert code == 1
    assert "ca.pem: file not found" in capsys.readouterr().err


def test_module_imports_only_stdlib() -> None:
    """Importing cmd_certs loads neither cryptography nor the pki and tls modules (fast --help)."""
    probe = "import sys, anna_trio.cli.cmd_certs; print(sorted(m for m in sys.modules if m.startswith(('cryptography', 'anna_trio.tls', 'anna_trio.pki'))))"
    result = subprocess.run(
        [sys.executable, "-c", probe], check=True, capture_output=True, text=True
    )
    assert result.stdout.strip() == "[]"
