"""docker-compose.yml and the Dockerfile as docker-compose itself reads them, and the compose
testnet compared with the local one (anna_trio.testnet) so the two cannot drift apart:
same round timeout, ports, failpoints and peers files, hence the same scenarios.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path, PurePosixPath
from typing import Any

import pytest
from ruamel.yaml import YAML

from anna_trio import testnet
from anna_trio.cli.annad import build_annad_parser
from anna_trio.config import Settings, load_settings
from conftest import ROOT, host_env, require_tools

NODES = (1, 2, 3)
COMPOSE_DIR = ROOT / "artifacts" / "compose-testnet"


def load_yaml(text: str) -> Any:
    return YAML(typ="safe").load(text)


@pytest.fixture(scope="module")
def compose() -> Any:
    """`docker-compose config`: the file after compose's own parsing, merging and
    interpolation (absolute host paths, `$$` still escaped)."""
    require_tools("docker-compose")
    env = {key: value for key, value in host_env().items() if key != "ANNA_BASE_IMAGE"}
    done = subprocess.run(
        ["docker-compose", "config"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    return load_yaml(done.stdout)


def local_settings(n: int) -> Settings:
    """What node n of the local testnet (`annactl testnet up`) runs with."""
    layout = testnet.Layout(Path("artifacts/testnet"))
    argv = testnet.annad_command(layout, layout.endpoints[n - 1])
    assert argv[1:3] == ["-m", "anna_trio.cli.annad"]
    return load_settings(vars(build_annad_parser().parse_args(argv[3:])), {})


def compose_settings(node: Any) -> Settings:
    """What a compose node runs with: annad's defaults under the service's environment."""
    return load_settings(vars(build_annad_parser().parse_args([])), node["environment"])


def test_compose_file_parses_with_docker_compose(compose: Any) -> None:
    """docker-compose accepts the file (a bare `$` in it is an interpolation error)."""
    assert set(compose["services"]) == {"init", *(f"anna-node-{n}" for n in NODES)}
    assert compose["networks"]["default"]["name"] == "anna-testnet"


def test_every_service_builds_the_one_image_with_a_replaceable_base(compose: Any) -> None:
    """One image, built from the checkout; the base image is python:3.11-slim unless the
    user names another in ANNA_BASE_IMAGE (no registry)."""
    for service in compose["services"].values():
        assert service["image"] == "anna-trio:local"
        assert Path(service["build"]["context"]) == ROOT
        assert service["build"]["args"] == {"BASE_IMAGE": "python:3.11-slim"}
    done = subprocess.run(
        ["docker-compose", "config"],
        cwd=ROOT,
        env=host_env(ANNA_BASE_IMAGE="anna-base:bookworm"),
        capture_output=True,
        text=True,
        timeout=60,
    )
    build = load_yaml(done.stdout)["services"]["init"]["build"]
    assert build["args"] == {"BASE_IMAGE": "anna-base:bookworm"}


@pytest.mark.parametrize("n", NODES)
def test_compose_node_runs_like_the_local_testnet_node(compose: Any, n: int) -> None:
    """Node n: same node id, round timeout and interval, RPC port, ports published as the
    local testnet's (RPC 800n, metrics 900n), failpoints over HTTP for the slow node."""
    node = compose["services"][f"anna-node-{n}"]
    local, contained = local_settings(n), compose_settings(node)
    assert contained.node_id == local.node_id
    assert contained.round_timeout == local.round_timeout == testnet.ROUND_TIMEOUT
    assert contained.round_interval == local.round_interval
    assert contained.rpc_listen is not None and local.rpc_listen is not None
    assert contained.rpc_listen[1] == local.rpc_listen[1]
    published = {port["target"]: port["published"] for port in node["ports"]}
    assert published == {
        contained.rpc_listen[1]: local.rpc_listen[1],
        contained.metrics_listen[1]: local.metrics_listen[1],
    }
    assert node["environment"]["ANNA_FAILPOINTS_HTTP"] == "1"
    assert node["hostname"] == f"anna-node-{n}"
    assert node["depends_on"] == {"init": {"condition": "service_completed_successfully"}}


@pytest.mark.parametrize("n", NODES)
def test_compose_node_mounts_only_its_own_files(compose: Any, n: int) -> None:
    """State on its own volume; its TLS files, peers file, CA certificate and CRL read-only;
    never the CA key; nothing outside ./artifacts/compose-testnet."""
    node = compose["services"][f"anna-node-{n}"]
    mounts = {}
    for volume in node["volumes"]:
        source, target, mode = volume.split(":")
        mounts[target] = (Path(source).relative_to(COMPOSE_DIR).as_posix(), mode)
    assert mounts == {
        "/var/lib/anna": (f"node{n}", "rw"),
        f"/testnet/node{n}/peers.yml": (f"node{n}/peers.yml", "ro"),
        f"/testnet/node{n}/tls": (f"node{n}/tls", "ro"),
        "/testnet/ca/ca.pem": ("ca/ca.pem", "ro"),
        "/testnet/ca/crl.pem": ("ca/crl.pem", "ro"),
    }
    assert compose_settings(node).state_dir == Path("/var/lib/anna")


def run_init_service(compose: Any, directory: Path) -> subprocess.CompletedProcess[str]:
    """The init service's script on this machine, with its /testnet at `directory`."""
    script = compose["services"]["init"]["command"][0].replace("$$", "$")  # compose's escape
    script = script.replace("/testnet", str(directory)).replace("chown -R anna:anna", "true")
    return subprocess.run(
        ["sh", "-c", script], capture_output=True, text=True, env=host_env(), timeout=60
    )


def host_path(inside: PurePosixPath, node: Any, artifacts: Path) -> Path:
    """Where a path inside a node container lives on the host, through its bind mounts,
    with ./artifacts/compose-testnet at `artifacts`."""
    inside = PurePosixPath(os.path.normpath(inside))
    best: tuple[PurePosixPath, str] | None = None
    for volume in node["volumes"]:
        source, target = volume.split(":")[:2]
        mount = PurePosixPath(target)
        if inside.is_relative_to(mount) and (best is None or mount.is_relative_to(best[0])):
            best = (mount, source)
    assert best is not None, f"{inside} is not mounted"
    return artifacts / Path(best[1]).relative_to(COMPOSE_DIR) / inside.relative_to(best[0])


@pytest.fixture
def initialised(compose: Any, tmp_path: Path) -> Path:
    """The init service's output in a folder of its own."""
    artifacts = tmp_path / "compose-testnet"
    result = run_init_service(compose, artifacts)
    assert result.returncode == 0, result.stderr
    return artifacts


def test_init_output_resolves_inside_every_node(compose: Any, initialised: Path) -> None:
    """After init, every file a node's peers.yml and state dir name exists through its
    mounts, and the peers are the containers' hostnames on the local testnet's ports."""
    for n in NODES:
        node = compose["services"][f"anna-node-{n}"]
        peers_path = PurePosixPath(node["environment"]["ANNA_PEERS"])
        peers = load_yaml(host_path(peers_path, node, initialised).read_text())
        assert [(p["node_id"], p["address"], p["port"]) for p in peers["peers"]] == [
            (f"node_00{m}", f"anna-node-{m}", 8000 + m) for m in NODES
        ]
        assert peers["tls"].pop("enabled") is True
        for name, value in peers["tls"].items():
            assert host_path(peers_path.parent / value, node, initialised).is_file(), (
                f"node {n} tls.{name}"
            )
        key = PurePosixPath(node["environment"]["ANNA_STATE_DIR"]) / "keys" / "node_id.sec"
        assert host_path(key, node, initialised).is_file()


def test_init_writes_the_local_testnets_layout_and_peers(initialised: Path, tmp_path: Path) -> None:
    """run_rounds.sh reads the compose testnet's testnet.json: the local layout (ports,
    hosts it is reached at, TLS, round timeout); its peers files differ from a local
    testnet's only in the addresses and keys."""
    assert testnet.Layout.load(initialised) == testnet.Layout(initialised)
    local = tmp_path / "local"
    testnet.init(testnet.Layout(local))
    for n in NODES:
        mine, theirs = (
            load_yaml((d / f"node{n}" / "peers.yml").read_text()) for d in (initialised, local)
        )
        for peers in (mine, theirs):
            for peer in peers["peers"]:
                del peer["address"], peer["pubkey"]
        assert mine == theirs


def test_init_keeps_a_compose_testnet_and_refuses_a_local_one(compose: Any, tmp_path: Path) -> None:
    """A second `up` keeps the compose testnet; a local (127.0.0.1) one is refused."""
    compose_dir, local_dir = tmp_path / "compose", tmp_path / "local"
    assert run_init_service(compose, compose_dir).returncode == 0
    before = (compose_dir / "node1" / "keys" / "node_id.pub").read_text()
    assert run_init_service(compose, compose_dir).returncode == 0
    assert (compose_dir / "node1" / "keys" / "node_id.pub").read_text() == before
    testnet.init(testnet.Layout(local_dir))
    refused = run_init_service(compose, local_dir)
    assert refused.returncode != 0
    assert "holds a local testnet" in refused.stderr


def dockerfile() -> list[str]:
    """The Dockerfile's instructions, continuation lines joined."""
    text = (ROOT / "Dockerfile").read_text().replace("\\\n", " ")
    return [
        " ".join(line.split())
        for line in text.splitlines()
        if line.strip() and not line.lstrip().startswith("#")
    ]


def test_dockerfile_defaults_to_the_official_python_image() -> None:
    """The base image is a build argument, python:3.11-slim unless told otherwise."""
    lines = dockerfile()
    assert lines[:2] == ["ARG BASE_IMAGE=python:3.11-slim", "FROM ${BASE_IMAGE}"]


def test_dockerfile_installs_the_wheelhouse_alone_when_there_is_one() -> None:
    """With wheelhouse/ in the context pip installs from it without an index, so a
    `--network none` build works; without it the checkout is built as usual."""
    (install,) = [line for line in dockerfile() if "pip install" in line]
    assert "pip install --no-index --find-links /build/wheelhouse anna-trio" in install
    assert "pip install /build" in install
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert "wheelhouse" not in ignored
    assert {"artifacts", ".git", ".nox"} <= set(ignored)
