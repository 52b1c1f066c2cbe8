"""peers.yml validation (SPEC §6), reload diffs and `annactl config check`."""

from __future__ import annotations

import argparse
import hashlib
import io
import os
import re
import textwrap
from pathlib import Path
from typing import Any

import hypothesis.strategies as st
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import HealthCheck, event, given, settings
from ruamel.yaml import YAML

from anna_trio import pki
from anna_trio._exceptions import ConfigError
from anna_trio.addresses import parse_host_port
from anna_trio.cli import cmd_config
from anna_trio.config import (
    TLS_REQUIRED_MESSAGE,
    diff_peers,
    load_cluster_config,
    self_port_change,
)
from anna_trio.crypto import public_key_hex
from anna_trio.models import ClusterConfig, Limits, PeerConfig, TlsConfig

FUZZ = settings(
    max_examples=int(os.environ.get("ANNA_FUZZ_EXAMPLES", "60")),
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)


def pubkey(name: str) -> str:
    """A valid Ed25519 public key derived from a name."""
    seed = hashlib.sha256(name.encode()).digest()
    return public_key_hex(Ed25519PrivateKey.from_private_bytes(seed))


KEY1, KEY2, KEY3 = pubkey("n1"), pubkey("n2"), pubkey("n3")

VALID_INSECURE = f"""\
allow_insecure_peers: true
peers:
  - node_id: n1
    address: anna-node-1
    port: 8001
    pubkey: {KEY1}
  - node_id: n2
    address: anna-node-2
    port: 8002
    pubkey: {KEY2}
  - node_id: n3
    address: 10.0.0.3
    port: 8003
    pubkey: {KEY3}
"""


def write(folder: Path, text: str, name: str = "peers.yml") -> Path:
    path = folder / name
    path.write_text(text)
    return path


def problems_of(folder: Path, text: str, node_id: str | None = "n1", **kwargs: Any) -> list[str]:
    """The problems reported for a peers file, without the `<file>:` prefix."""
    path = write(folder, text)
    with pytest.raises(ConfigError) as caught:
        load_cluster_config(path, node_id=node_id, **kwargs)
    prefix = f"{path}:"
    assert all(problem.startswith(prefix) for problem in caught.value.problems)
    return [problem.removeprefix(prefix) for problem in caught.value.problems]


def peer_block(node_id: str = "n1", *, key: str = KEY1, **fields: Any) -> str:
    """One peers item, 4 lines by default, with fields overridden or appended."""
    values: dict[str, Any] = {"node_id": node_id, "address": "h1", "port": 8001, "pubkey": key}
    values.update(fields)
    lines = [f"{name}: {value}" for name, value in values.items() if value is not None]
    return "  - " + "\n    ".join(lines) + "\n"


def one_peer(**fields: Any) -> str:
    """allow_insecure_peers on line 1, `peers:` on line 2, the peer from line 3."""
    return "allow_insecure_peers: true\npeers:\n" + peer_block(**fields)


# --- valid files -----------------------------------------------------------------------


def test_valid_insecure_file_loads_with_defaults(tmp_path: Path) -> None:
    """A valid insecure file gives every peer and the documented defaults."""
    config = load_cluster_config(write(tmp_path, VALID_INSECURE), node_id="n2")
    assert [p.node_id for p in config.peers] == ["n1", "n2", "n3"]
    assert config.peers[2] == PeerConfig("n3", "10.0.0.3", 8003, KEY3, None)
    assert config.allow_insecure_peers is True
    assert config.tls == TlsConfig()
    assert (config.quorum_rule, config.quorum) == ("majority", 2)
    assert config.byzantine_deviation_threshold == 0.3
    assert config.byzantine_window_count == 3
    assert config.limits == Limits()


def test_every_setting_is_read(tmp_path: Path) -> None:
    """Quorum rule, Byzantine settings and limits come from the file."""
    text = VALID_INSECURE + textwrap.dedent("""\
        quorum: two_thirds
        byzantine_deviation_threshold: 1
        byzantine_window_count: 1000
        limits:
          rate_per_client: 2.5
          burst: 1
          max_body_bytes: 1024
          request_timeout: 0.25
          max_connections: 100
          max_connections_per_address: 4
          validator_connection_reserve: 10
          max_pending_handshakes: 7
          handshake_timeout: 1.5
          send_timeout: 2
          keep_alive_timeout: 3
          max_outsider_requests: 2
        """)
    config = load_cluster_config(write(tmp_path, text), node_id=None)
    assert (config.quorum_rule, config.quorum) == ("two_thirds", 3)
    assert config.byzantine_deviation_threshold == 1.0
    assert config.byzantine_window_count == 1000
    assert config.limits == Limits(
        rate_per_client=2.5,
        burst=1,
        max_body_bytes=1024,
        request_timeout=0.25,
        max_connections=100,
        max_connections_per_address=4,
        validator_connection_reserve=10,
        max_pending_handshakes=7,
        handshake_timeout=1.5,
        send_timeout=2.0,
        keep_alive_timeout=3.0,
        max_outsider_requests=2,
    )


def test_fingerprint_colons_and_case_are_normalised(tmp_path: Path) -> None:
    """An `AB:CD:...` fingerprint (openssl's form) is stored as 64 lowercase hex."""
    text = one_peer(fingerprint=":".join(["AB"] * 32))
    config = load_cluster_config(write(tmp_path, text), node_id="n1")
    assert config.peers[0].fingerprint == "ab" * 32


def test_ipv6_address_in_brackets_is_unwrapped(tmp_path: Path) -> None:
    """`address: "[::1]"` is accepted and stored as `::1`."""
    config = load_cluster_config(write(tmp_path, one_peer(address='"[::1]"')), node_id="n1")
    assert config.peers[0].address == "::1"


def test_tls_paths_resolve_against_the_peers_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Relative tls paths are resolved against peers.yml's folder; absolute ones kept."""
    seen: list[TlsConfig] = []

    def check(tls: TlsConfig) -> list[str]:
        seen.append(tls)
        return []

    monkeypatch.setattr(pki, "check_tls_material", check)
    text = TLS_BLOCK + "peers:\n" + peer_block()
    config = load_cluster_config(write(tmp_path, text), node_id="n1")
    assert config.tls.enabled
    assert config.tls.ca_cert == tmp_path / "tls/ca.pem"
    assert config.tls.client_key == Path("/abs/client.key")
    assert config.tls.crl is None
    assert seen == [config.tls]


TLS_BLOCK = """\
tls:
  enabled: true
  ca_cert: tls/ca.pem
  server_cert: tls/server.pem
  server_key: tls/server.key
  client_cert: tls/client.pem
  client_key: /abs/client.key
"""


def test_real_tls_material_is_accepted(tmp_path: Path) -> None:
    """With a real CA and node certificate the file loads with TLS on."""
    pki.init_ca(tmp_path / "ca")
    cert, key = pki.issue_cert(
        tmp_path / "ca", node_id="n1", sans=["localhost"], out_dir=tmp_path / "certs"
    )
    text = f"""\
tls:
  enabled: true
  ca_cert: ca/ca.pem
  server_cert: {cert}
  server_key: {key}
  client_cert: certs/n1.pem
  client_key: certs/n1.key
  crl: ca/crl.pem
peers:
{peer_block()}"""
    config = load_cluster_config(write(tmp_path, text), node_id="n1")
    assert config.tls.enabled and config.tls.crl == tmp_path / "ca/crl.pem"


# --- every rule, with its line ------------------------------------------------------


RULES = [
    # (peers.yml text, expected "<line>: <field>: <message fragment>")
    ("peers: [\n", "2: yaml: not valid YAML"),
    ("a: 1\na: 2\n", "2: yaml: not valid YAML: found duplicate key"),
    ("\t- x\n", "1: yaml: not valid YAML"),
    ("", "1: top level: the file is empty"),
    ("- 1\n- 2\n", "1: top level: must be a mapping"),
    ("just text\n", "1: top level: must be a mapping"),
    (VALID_INSECURE + "colour: red\n", "15: colour: unknown key"),
    (VALID_INSECURE + "7: x\n", "15: 7: unknown key"),
    (
        "allow_insecure_peers: yes\n" + VALID_INSECURE[27:],
        "1: allow_insecure_peers: must be true or false",
    ),
    (
        "allow_insecure_peers: 1\n" + VALID_INSECURE[27:],
        "1: allow_insecure_peers: must be true or false",
    ),
    (VALID_INSECURE + "quorum: all\n", "15: quorum: must be one of majority, two_thirds"),
    (
        VALID_INSECURE + "byzantine_deviation_threshold: 0\n",
        "15: byzantine_deviation_threshold: must be",
    ),
    (
        VALID_INSECURE + "byzantine_deviation_threshold: 1.01\n",
        "15: byzantine_deviation_threshold: must be",
    ),
    (
        VALID_INSECURE + "byzantine_deviation_threshold: .nan\n",
        "15: byzantine_deviation_threshold: must be",
    ),
    (
        VALID_INSECURE + "byzantine_deviation_threshold: true\n",
        "15: byzantine_deviation_threshold: must be",
    ),
    (
        VALID_INSECURE + "byzantine_deviation_threshold: '0.3'\n",
        "15: byzantine_deviation_threshold: must be",
    ),
    (
        VALID_INSECURE + "byzantine_window_count: 0\n",
        "15: byzantine_window_count: must be an integer 1..1000",
    ),
    (
        VALID_INSECURE + "byzantine_window_count: 1001\n",
        "15: byzantine_window_count: must be an integer",
    ),
    (
        VALID_INSECURE + "byzantine_window_count: 2.0\n",
        "15: byzantine_window_count: must be an integer",
    ),
    (
        VALID_INSECURE + "byzantine_window_count: true\n",
        "15: byzantine_window_count: must be an integer",
    ),
    (VALID_INSECURE + "limits: 5\n", "15: limits: must be a mapping"),
    (VALID_INSECURE + "limits:\n  rate_per_client: 0\n", "16: limits.rate_per_client: must be"),
    (VALID_INSECURE + "limits:\n  rate_per_client: .inf\n", "16: limits.rate_per_client: must be"),
    (VALID_INSECURE + "limits:\n  burst: 0\n", "16: limits.burst: must be an integer 1.."),
    (VALID_INSECURE + "limits:\n  burst: 1.5\n", "16: limits.burst: must be an integer"),
    (
        VALID_INSECURE + "limits:\n  max_body_bytes: 0\n",
        "16: limits.max_body_bytes: must be an integer 1..",
    ),
    (VALID_INSECURE + "limits:\n  request_timeout: -1\n", "16: limits.request_timeout: must be"),
    (VALID_INSECURE + "limits:\n  rps: 1\n", "16: limits.rps: unknown key"),
    (
        VALID_INSECURE + "limits:\n  max_connections: 1\n",
        "16: limits.max_connections: must be an integer 2..",
    ),
    (
        VALID_INSECURE + "limits:\n  max_connections_per_address: 0\n",
        "16: limits.max_connections_per_address: must be an integer 1..",
    ),
    (
        VALID_INSECURE + "limits:\n  validator_connection_reserve: -1\n",
        "16: limits.validator_connection_reserve: must be an integer 0..",
    ),
    (
        VALID_INSECURE + "limits:\n  max_connections: 10\n  validator_connection_reserve: 10\n",
        "17: limits.validator_connection_reserve: must be less than max_connections (10)",
    ),
    (
        VALID_INSECURE + "limits:\n  max_connections: 10\n",
        "15: limits.validator_connection_reserve: must be less than max_connections (10)",
    ),
    (
        VALID_INSECURE + "limits:\n  max_pending_handshakes: 0\n",
        "16: limits.max_pending_handshakes: must be an integer 1..",
    ),
    (VALID_INSECURE + "limits:\n  handshake_timeout: 0\n", "16: limits.handshake_timeout: must be"),
    (VALID_INSECURE + "limits:\n  send_timeout: .nan\n", "16: limits.send_timeout: must be"),
    (
        VALID_INSECURE + "limits:\n  keep_alive_timeout: x\n",
        "16: limits.keep_alive_timeout: must be",
    ),
    (VALID_INSECURE + "tls: [1]\n", "15: tls: must be a mapping"),
    (VALID_INSECURE + "tls:\n  enabled: 'true'\n", "16: tls.enabled: must be true or false"),
    (VALID_INSECURE + "tls:\n  enabled: false\n  cafile: x\n", "17: tls.cafile: unknown key"),
    (
        VALID_INSECURE + "tls:\n  enabled: true\n",
        "15: tls.ca_cert: is required when tls.enabled is true",
    ),
    (
        VALID_INSECURE + "tls:\n  enabled: true\n",
        "15: tls.client_key: is required when tls.enabled",
    ),
    (
        VALID_INSECURE + "tls:\n  enabled: true\n  crl: 5\n",
        "17: tls.crl: must be a non-empty string",
    ),
    (VALID_INSECURE[27:], f"1: tls: {TLS_REQUIRED_MESSAGE}"),
    ("allow_insecure_peers: false\n" + VALID_INSECURE[27:], f"1: tls: {TLS_REQUIRED_MESSAGE}"),
    (VALID_INSECURE[27:] + "tls:\n  enabled: false\n", f"14: tls: {TLS_REQUIRED_MESSAGE}"),
    ("allow_insecure_peers: true\n", "1: peers: at least one peer is required"),
    ("allow_insecure_peers: true\npeers:\n", "2: peers: at least one peer is required"),
    ("allow_insecure_peers: true\npeers: []\n", "2: peers: at least one peer is required"),
    ("allow_insecure_peers: true\npeers: {n1: 1}\n", "2: peers: must be a list of peers"),
    ("allow_insecure_peers: true\npeers:\n  - n1\n", "3: peers[0]: must be a mapping"),
    (one_peer(node_id=None), "3: peers[0].node_id: is required"),
    (one_peer(address=None), "3: peers[0].address: is required"),
    (one_peer(port=None), "3: peers[0].port: is required"),
    (one_peer(pubkey=None, key=""), "3: peers[0].pubkey: is required"),
    (one_peer(node_id="'bad id'"), "3: peers[0].node_id: must match"),
    (one_peer(node_id="x" * 65), "3: peers[0].node_id: must match"),
    (one_peer(node_id="001"), "3: peers[0].node_id: must be a non-empty string (quote it"),
    (one_peer(address="http://h1"), "4: peers[0].address: must be a host name or IP address"),
    (one_peer(address="'h1:8001'"), "4: peers[0].address: must be a host name or IP address"),
    (one_peer(port=0), "5: peers[0].port: must be an integer 1..65535"),
    (one_peer(port=65536), "5: peers[0].port: must be an integer 1..65535"),
    (one_peer(port="'8001'"), "5: peers[0].port: must be an integer 1..65535"),
    (one_peer(port="true"), "5: peers[0].port: must be an integer 1..65535"),
    (one_peer(key="abc"), "6: peers[0].pubkey: not a valid Ed25519 public key"),
    (one_peer(key=KEY1.upper()), "6: peers[0].pubkey: not a valid Ed25519 public key"),
    (one_peer(key="z" * 64), "6: peers[0].pubkey: not a valid Ed25519 public key"),
    (one_peer(fingerprint="abc"), "7: peers[0].fingerprint: must be a SHA-256 fingerprint"),
    (one_peer(fingerprint="g" * 64), "7: peers[0].fingerprint: must be a SHA-256 fingerprint"),
    (one_peer(colour="red"), "7: peers[0].colour: unknown key"),
    (
        "allow_insecure_peers: true\npeers:\n" + peer_block() + peer_block(port=8002),
        "7: peers[1].node_id: duplicate node id 'n1' (first at line 3)",
    ),
    (
        "allow_insecure_peers: true\npeers:\n" + peer_block() + peer_block("n2", address="H1"),
        "8: peers[1].address: duplicate address:port H1:8001 (first at line 4)",
    ),
    (VALID_INSECURE.replace("n1", "n9"), "2: peers: this node (n1) is not in the peer list"),
]


@pytest.mark.parametrize(("text", "expected"), RULES)
def test_each_rule_is_reported_at_its_line(tmp_path: Path, text: str, expected: str) -> None:
    """Each validation rule names the line and field of the offending key or item."""
    problems = problems_of(tmp_path, text, check_tls_files=False)
    assert any(problem.startswith(expected) for problem in problems), problems


def test_flow_style_items_report_their_own_line(tmp_path: Path) -> None:
    """Problems inside a flow mapping item are reported at that item's line."""
    text = f"allow_insecure_peers: true\npeers:\n  - {{node_id: n1, address: h, port: 1, pubkey: {KEY1}}}\n  - {{node_id: n2, address: h, port: 0, pubkey: {KEY2}}}\n"
    assert problems_of(tmp_path, text) == ["4: peers[1].port: must be an integer 1..65535"]


def test_every_problem_in_a_file_is_reported_in_line_order(tmp_path: Path) -> None:
    """A file with many problems lists all of them, sorted by line, not just the first."""
    text = f"""\
allow_insecure_peers: maybe
quorum: most
peers:
  - node_id: n1
    address: http://x
    port: 70000
    pubkey: abc
  - node_id: n1
    address: h
    port: 1
    pubkey: {KEY1}
    colour: red
  - 5
limits:
  burst: 0
extra: 1
"""
    problems = problems_of(tmp_path, text, node_id="n7")
    lines = [int(problem.split(":")[0]) for problem in problems]
    assert lines == [1, 1, 2, 3, 5, 6, 7, 8, 12, 13, 15, 16]
    assert f"1: tls: {TLS_REQUIRED_MESSAGE}" in problems
    assert "8: peers[1].node_id: duplicate node id 'n1' (first at line 4)" in problems
    assert "3: peers: this node (n7) is not in the peer list" in problems


def test_error_message_summarises_several_problems(tmp_path: Path) -> None:
    """str(ConfigError) is the problem itself when alone, a count when there are several."""
    path = write(tmp_path, one_peer(port=0))
    with pytest.raises(ConfigError, match=r"peers\.yml:5: peers\[0\]\.port") as one:
        load_cluster_config(path, node_id="n1")
    assert one.value.exit_code == 78
    path = write(tmp_path, one_peer(port=0, key="abc"))
    with pytest.raises(ConfigError, match=r"peers\.yml: 2 problems$"):
        load_cluster_config(path, node_id="n1")


def test_unreadable_and_undecodable_files_are_config_errors(tmp_path: Path) -> None:
    """A missing file or one that is not UTF-8 is reported, not raised as OSError."""
    with pytest.raises(ConfigError, match="1: file: cannot read"):
        load_cluster_config(tmp_path / "absent.yml", node_id=None)
    path = tmp_path / "latin1.yml"
    path.write_bytes(b"peers: \xff\xfe\n")
    with pytest.raises(ConfigError, match="cannot read"):
        load_cluster_config(path, node_id=None)


def test_tls_material_problems_are_attached_to_their_keys(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """check_tls_material's messages are reported at the named key's line, or the tls line."""
    monkeypatch.setattr(
        pki,
        "check_tls_material",
        lambda tls: ["tls.server_key: does not match tls.server_cert", "CA expired"],
    )
    text = "# comment\n" + TLS_BLOCK + "peers:\n" + peer_block()
    assert problems_of(tmp_path, text) == [
        "2: tls: CA expired",
        "6: tls.server_key: does not match tls.server_cert",
    ]


def test_tls_files_are_checked_only_when_asked_and_complete(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """check_tls_files=False, or an incomplete tls block, never calls check_tls_material."""
    calls: list[TlsConfig] = []

    def check(tls: TlsConfig) -> list[str]:
        calls.append(tls)
        return ["x"]

    monkeypatch.setattr(pki, "check_tls_material", check)
    text = TLS_BLOCK + "peers:\n" + peer_block()
    load_cluster_config(write(tmp_path, text), node_id="n1", check_tls_files=False)
    problems_of(tmp_path, "tls:\n  enabled: true\npeers:\n" + peer_block())
    assert calls == []


def test_real_check_reports_missing_files_at_their_lines(tmp_path: Path) -> None:
    """The real TLS check names each missing file at its own key's line."""
    problems = problems_of(tmp_path, TLS_BLOCK + "peers:\n" + peer_block())
    assert any(p.startswith("3: tls.ca_cert: ") and "not found" in p for p in problems), problems
    assert any(p.startswith("7: tls.client_key: ") for p in problems), problems


# --- property tests -------------------------------------------------------------------


def check_invariants(config: ClusterConfig, node_id: str | None) -> None:
    """What every config returned by load_cluster_config must satisfy."""
    ids = [peer.node_id for peer in config.peers]
    assert ids and len(set(ids)) == len(ids)
    endpoints = [(peer.address.lower(), peer.port) for peer in config.peers]
    assert len(set(endpoints)) == len(endpoints)
    assert node_id is None or node_id in ids
    assert config.tls.enabled or config.allow_insecure_peers
    assert config.quorum_rule in ("majority", "two_thirds")
    assert 0 < config.byzantine_deviation_threshold <= 1
    assert 1 <= config.byzantine_window_count <= 1000
    for peer in config.peers:
        assert re.fullmatch(r"[A-Za-z0-9_.-]{1,64}", peer.node_id)
        assert 1 <= peer.port <= 65535
        assert re.fullmatch(r"[0-9a-f]{64}", peer.pubkey)


YAML_TOKENS = [
    "allow_insecure_peers: ",
    "true",
    "false",
    "yes",
    "peers:",
    "\n",
    "  - ",
    "    ",
    "node_id: ",
    "n1",
    "n2",
    "address: ",
    "h1",
    "port: ",
    "8001",
    "0",
    "pubkey: ",
    KEY1,
    "tls:",
    "enabled: ",
    "quorum: ",
    "two_thirds",
    "limits:",
    "burst: ",
    "{",
    "}",
    "[",
    "]",
    ", ",
    ": ",
    "? ",
    "&a ",
    "*a",
    "!!str ",
    "!tag ",
    "<<: ",
    "#",
    "'",
    '"',
    "\t",
    "---\n",
    "...\n",
    "%YAML 1.1\n",
    ".nan",
    "-1",
    "1e400",
    "0x1F",
    "~",
    "|\n",
    ">\n",
    "\\",
    "\x00",
    "é",
]


@FUZZ
@given(
    text=st.one_of(
        st.text(max_size=200), st.lists(st.sampled_from(YAML_TOKENS), max_size=60).map("".join)
    )
)
def test_arbitrary_text_only_ever_raises_config_error(tmp_path: Path, text: str) -> None:
    """Any text either loads into a config that keeps the invariants or raises ConfigError."""
    path = tmp_path / "fuzz.yml"
    path.write_text(text, encoding="utf-8", errors="surrogatepass")
    try:
        config = load_cluster_config(path, node_id="n1", check_tls_files=False)
    except ConfigError as exc:
        assert exc.problems and all(p.startswith(f"{path}:") for p in exc.problems)
    else:
        check_invariants(config, "n1")


SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.floats(),
    st.text(max_size=20),
    st.sampled_from(["n1", "n2", "h1", "majority", KEY1, KEY2, 8001, 8002, "../x"]),
)
KEYS = st.one_of(
    st.sampled_from(
        [
            "allow_insecure_peers",
            "tls",
            "peers",
            "quorum",
            "limits",
            "node_id",
            "address",
            "port",
            "pubkey",
            "fingerprint",
            "enabled",
            "ca_cert",
            "burst",
            "byzantine_deviation_threshold",
            "byzantine_window_count",
        ]
    ),
    st.text(max_size=8),
)
NESTED = st.recursive(
    SCALARS,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(KEYS, children, max_size=6),
    max_leaves=30,
)


def dump(data: Any) -> str:
    stream = io.StringIO()
    YAML(typ="safe", pure=True).dump(data, stream)
    return stream.getvalue()


@FUZZ
@given(data=st.dictionaries(KEYS, NESTED, max_size=8) | NESTED)
def test_arbitrary_nested_data_only_ever_raises_config_error(tmp_path: Path, data: Any) -> None:
    """Any YAML document either loads keeping the invariants or raises ConfigError."""
    path = tmp_path / "fuzz.yml"
    path.write_text(dump(data))
    try:
        config = load_cluster_config(path, node_id="n1", check_tls_files=False)
    except ConfigError as exc:
        assert exc.problems
    else:
        check_invariants(config, "n1")


def mostly(valid: list[Any], invalid: list[Any]) -> st.SearchStrategy[Any]:
    """Mostly valid values (about nine in ten), so that both outcomes are exercised."""
    weight = max(1, 9 * len(invalid) // len(valid))
    return st.sampled_from(valid * weight + invalid)


PEER_ITEMS = st.fixed_dictionaries(
    {
        "node_id": mostly(["n1", "n2", "n3"], ["bad id", 7, ""]),
        "address": st.sampled_from(["h1", "H1", "h2", "10.0.0.1"]),
        "port": mostly(list(range(8001, 8009)), [0, 65536, "8001", True]),
        "pubkey": mostly([KEY1, KEY2], ["abc", KEY1.upper()]),
    }
)


def expected_valid(data: dict[str, Any], node_id: str) -> bool:
    """An independent statement of the rules the PEER_ITEMS strategy exercises."""
    peers = data["peers"]
    if data["allow_insecure_peers"] is not True or not peers:
        return False
    for peer in peers:
        port = peer["port"]
        if peer["node_id"] not in ("n1", "n2", "n3") or peer["pubkey"] not in (KEY1, KEY2):
            return False
        if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
            return False
    ids = [peer["node_id"] for peer in peers]
    endpoints = {(peer["address"].lower(), peer["port"]) for peer in peers}
    return len(set(ids)) == len(ids) and len(endpoints) == len(peers) and node_id in ids


@FUZZ
@given(
    data=st.fixed_dictionaries(
        {
            "allow_insecure_peers": mostly([True], [False, "yes", 1]),
            "peers": st.lists(
                PEER_ITEMS, min_size=1, max_size=4, unique_by=lambda peer: peer["node_id"]
            )
            | st.lists(PEER_ITEMS, max_size=3),
        }
    ),
    node_id=st.sampled_from(["n1", "n2"]),
)
def test_generated_configs_load_exactly_when_the_rules_hold(
    tmp_path: Path, data: dict[str, Any], node_id: str
) -> None:
    """Near-valid configs load if and only if an independent oracle says they are valid."""
    path = tmp_path / "peers.yml"
    path.write_text(dump(data))
    try:
        config = load_cluster_config(path, node_id=node_id, check_tls_files=False)
    except ConfigError:
        assert not expected_valid(data, node_id)
    else:
        assert expected_valid(data, node_id)
        check_invariants(config, node_id)
        event("loaded")
        assert [p.node_id for p in config.peers] == [p["node_id"] for p in data["peers"]]


# --- reload helpers ------------------------------------------------------------------


def cluster(*peers: PeerConfig) -> ClusterConfig:
    return ClusterConfig(peers=peers, allow_insecure_peers=True)


def test_diff_peers_sorts_added_removed_and_changed() -> None:
    """diff_peers names added, removed and changed node ids, each sorted."""
    a, b, c = (PeerConfig(n, "h", p, KEY1) for n, p in (("a", 1), ("b", 2), ("c", 3)))
    old = cluster(c, a, b)
    new = cluster(
        PeerConfig("b", "h", 2, KEY2),
        PeerConfig("e", "h", 5, KEY1),
        a,
        PeerConfig("d", "h", 4, KEY1),
    )
    assert diff_peers(old, new) == (["d", "e"], ["c"], ["b"])
    assert diff_peers(old, old) == ([], [], [])


def test_self_port_change_refuses_only_a_moved_own_port() -> None:
    """Only a change of this node's own port needs a restart."""
    old = cluster(PeerConfig("n1", "h", 8001, KEY1), PeerConfig("n2", "h", 8002, KEY2))
    moved = cluster(PeerConfig("n1", "h", 9001, KEY1), PeerConfig("n2", "h", 9002, KEY2))
    assert self_port_change(old, moved, "n1") == (
        "restart required: this node's port changed from 8001 to 9001"
    )
    assert self_port_change(old, old, "n1") is None
    assert self_port_change(old, cluster(PeerConfig("n2", "h", 8002, KEY2)), "n1") is None


# --- parse_host_port ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("0.0.0.0:8001", ("0.0.0.0", 8001)),
        ("anna-node-1:1", ("anna-node-1", 1)),
        ("[::1]:8001", ("::1", 8001)),
        ("[fe80::1]:65535", ("fe80::1", 65535)),
        (":9090", ("0.0.0.0", 9090)),
        (" localhost:80 ", ("localhost", 80)),
    ],
)
def test_parse_host_port_accepts_the_documented_forms(text: str, expected: tuple[str, int]) -> None:
    """HOST:PORT, [IPv6]:PORT and :PORT parse to (host, port)."""
    assert parse_host_port(text) == expected


@pytest.mark.parametrize(
    "text",
    [
        "",
        "8001",
        "host",
        "host:",
        "host:0",
        "host:65536",
        "host:80a",
        "::1:8001",
        "[::1]8001",
        "[nothost]:1",
        "[::1:1",
        "ho st:1",
        "http://h:1",
        "h:²",
    ],
)
def test_parse_host_port_rejects_junk(text: str) -> None:
    """Malformed listen addresses raise ConfigError."""
    with pytest.raises(ConfigError):
        parse_host_port(text)


@settings(max_examples=200)
@given(st.text(max_size=30))
def test_parse_host_port_never_raises_anything_else(text: str) -> None:
    """parse_host_port returns a valid pair or raises ConfigError, for any text."""
    try:
        host, port = parse_host_port(text)
    except ConfigError:
        return
    assert host and 1 <= port <= 65535


# --- annactl config check ------------------------------------------------------------


@pytest.fixture
def annactl(monkeypatch: pytest.MonkeyPatch) -> argparse.ArgumentParser:
    """A parser with only the config commands, and no node id or peers in the environment."""
    for name in ("ANNA_PEERS", "ANNA_NODE_ID", "NODE_ID"):
        monkeypatch.delenv(name, raising=False)
    parser = argparse.ArgumentParser(prog="annactl")
    cmd_config.register(parser.add_subparsers(dest="command", required=True))
    return parser


def run(parser: argparse.ArgumentParser, *argv: str) -> int:
    args = parser.parse_args(argv)
    code: int = args.handler(args)
    return code


def test_config_check_ok(
    tmp_path: Path, annactl: argparse.ArgumentParser, capsys: pytest.CaptureFixture[str]
) -> None:
    """A valid file prints the OK summary and exits 0."""
    path = write(tmp_path, VALID_INSECURE + "quorum: two_thirds\n")
    assert run(annactl, "config", "check", "--peers", str(path), "--node-id", "n3") == 0
    assert capsys.readouterr().out == "OK: 3 peers, quorum 3 (two_thirds), TLS off\n"


def test_config_check_ok_with_tls(
    tmp_path: Path,
    annactl: argparse.ArgumentParser,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """TLS on is reported as such."""
    monkeypatch.setattr(pki, "check_tls_material", lambda tls: [])
    path = write(tmp_path, TLS_BLOCK + "peers:\n" + peer_block())
    assert run(annactl, "config", "check", "--peers", str(path)) == 0
    assert capsys.readouterr().out == "OK: 1 peers, quorum 1 (majority), TLS on\n"


def test_config_check_lists_every_error_with_lines_and_exits_78(
    tmp_path: Path, annactl: argparse.ArgumentParser, capsys: pytest.CaptureFixture[str]
) -> None:
    """Every problem is printed as <file>:<line>: ..., then a count; exit 78."""
    path = write(tmp_path, one_peer(port=0, key="abc") + "quorum: all\n")
    assert run(annactl, "config", "check", "--peers", str(path)) == 78
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.splitlines() == [
        f"{path}:5: peers[0].port: must be an integer 1..65535",
        f"{path}:6: peers[0].pubkey: not a valid Ed25519 public key: "
        "an Ed25519 public key is 64 lowercase hex characters",
        f"{path}:7: quorum: must be one of majority, two_thirds; got 'all'",
        "FAILED: 3 problems",
    ]


def test_config_check_reads_peers_and_node_id_from_environment(
    tmp_path: Path,
    annactl: argparse.ArgumentParser,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Without flags ANNA_PEERS names the file and NODE_ID must be in it."""
    monkeypatch.setenv("ANNA_PEERS", str(write(tmp_path, VALID_INSECURE)))
    monkeypatch.setenv("NODE_ID", "n4")
    assert run(annactl, "config", "check") == 78
    assert "this node (n4) is not in the peer list" in capsys.readouterr().err
    assert run(annactl, "config", "check", "--node-id", "n2") == 0


def test_config_check_missing_file_exits_78(
    tmp_path: Path, annactl: argparse.ArgumentParser, capsys: pytest.CaptureFixture[str]
) -> None:
    """A peers file that cannot be read is a configuration error."""
    assert run(annactl, "config", "check", "--peers", str(tmp_path / "nope.yml")) == 78
    assert "cannot read" in capsys.readouterr().err
