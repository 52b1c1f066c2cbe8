"""A 3-node mTLS cluster on three systemd-nspawn machines, built by following
docs/operations.md section 10 word for word: each machine installed by §1, keys made on
the nodes, CA and certificates on the admin machine (node 1), files copied as the
section's table says, annad started by systemd. Each machine has its own network
namespace on a bridge of its own (10.0.0.11-13, the section's addresses).

Then: rounds complete on all three; `systemctl stop` on one leaves the other two
completing rounds; started again, it converges (the same results everywhere).
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from nspawn import Lan, Machine, MachineError, booted
from runbook import ShellBlock, section_blocks

from conftest import ROOT, follow, install_anna

SECTION = "10. A cluster on three machines"
NODES = (1, 2, 3)
CLUSTER_DIR = "/root/anna-cluster"
ROUND_WAIT = 40.0  # a round with a node down waits round_timeout (10 s) before completing


def observer_file(n: int) -> str:
    """What the mirror audit would write on node n: the file observer's latest.json."""
    return json.dumps(
        {
            "tis_components": {
                "prediction_accuracy": 0.85,
                "ethical_alignment": 0.80 + n / 100,
                "coherence_stability": 0.90,
            },
            "tis_overall": 0.85 + n / 1000,
            "bias_flags": ["RecencyBias"],
            "forecast_hash": "sha256:" + "ab" * 32,
            "outcome_hash": "sha256:" + "cd" * 32,
        }
    )


def section_10() -> list[ShellBlock]:
    """Its shell blocks: keys on the nodes, the admin machine's, start, a first round."""
    return section_blocks(ROOT / "docs" / "operations.md", SECTION)


def copy(source: Path, target: Path) -> None:
    """One file from one machine to another (the admin machine is node 1: some stay put)."""
    if source != target:
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, target)


@pytest.fixture(scope="module")
def cluster(machine_rootfs: Path, wheelhouse: Path) -> Iterator[dict[int, Machine]]:
    """Three machines running annad, made as section 10 says."""
    keys_block, admin_block, start_block, _round_block = section_10()
    lan = Lan("annadep", len(NODES))
    lan.create()
    machines = [Machine(f"anna-node-{n}", machine_rootfs, netns=lan.namespace(n)) for n in NODES]
    try:
        with booted(machines):
            nodes = dict(zip(NODES, machines, strict=True))
            admin = nodes[1]
            for n, node in nodes.items():
                install_anna(node, wheelhouse)
                follow(node, keys_block, cwd="/root", env={"N": str(n)})
                copy(
                    node.path("/var/lib/anna/keys/node_id.pub"),
                    admin.path(f"{CLUSTER_DIR}/node_00{n}.pub"),
                )
            follow(admin, admin_block, cwd=CLUSTER_DIR)
            for n, node in nodes.items():  # the section's table, admin → node n
                for source in (
                    "ca/ca.pem",
                    "ca/crl.pem",
                    f"node_00{n}/node_00{n}.pem",
                    f"node_00{n}/node_00{n}.key",
                    "peers.yml",
                ):
                    copy(
                        admin.path(f"{CLUSTER_DIR}/{source}"),
                        node.path(f"{CLUSTER_DIR}/{Path(source).name}"),
                    )
                mirror = node.path("/var/lib/anna/mirror_audit/latest.json")
                mirror.parent.mkdir()
                mirror.write_text(observer_file(n))
                node.run("chown -R anna:anna /var/lib/anna/mirror_audit")
            for n, node in nodes.items():
                follow(node, start_block, cwd=CLUSTER_DIR, env={"N": str(n)})
            yield nodes
    finally:
        lan.destroy()


def annactl(node: Machine, arguments: str) -> Any:
    """annactl on a node as its operator runs it (TLS client settings from /etc/anna)."""
    return json.loads(node.run(f"annactl {arguments} --json").stdout)


def start_round(node: Machine, round_id: str) -> None:
    assert node.run(f"annactl round start --round-id {round_id}").stdout.strip() == round_id


# What a node that has not heard of a round yet shows while we wait for it there.
NOT_YET_KNOWN: dict[str, Any] = {
    "status": "NotKnownHere",
    "participating_nodes": [],
    "result_digest": None,
}


def views(nodes: dict[int, Machine], round_id: str) -> dict[int, dict[str, Any]]:
    """Each node's view of the round; NOT_YET_KNOWN where it answers 404 (a restarted
    node hears of a new round once its peers' links to it are back)."""
    seen: dict[int, dict[str, Any]] = {}
    for n, node in nodes.items():
        done = node.run(f"annactl round show {round_id} --json", check=False)
        if done.returncode == 0:
            seen[n] = json.loads(done.stdout)
        elif "HTTP 404" in done.stderr:
            seen[n] = NOT_YET_KNOWN
        else:
            raise MachineError(f"{node.name}: round show {round_id}: {done.stderr}")
    return seen


def wait_complete(
    nodes: dict[int, Machine], round_id: str, participants: set[str]
) -> dict[int, dict[str, Any]]:
    """Until the round is Complete with exactly `participants` on every one of `nodes`."""
    deadline = time.monotonic() + ROUND_WAIT
    while True:
        seen = views(nodes, round_id)
        if all(
            v["status"] == "Complete" and set(v["participating_nodes"]) == participants
            for v in seen.values()
        ):
            return seen
        if time.monotonic() > deadline:
            summary = {n: (v["status"], v["participating_nodes"]) for n, v in seen.items()}
            pytest.fail(f"{round_id} not Complete with {sorted(participants)}: {summary}")
        time.sleep(0.5)


def digests(seen: dict[int, dict[str, Any]]) -> set[str]:
    return {view["result_digest"] for view in seen.values()}


ALL = {"node_001", "node_002", "node_003"}


def test_rounds_complete_on_all_three_machines(cluster: dict[int, Machine]) -> None:
    """A round started on one machine completes on all three with all three observations
    over mTLS between the machines, with one result."""
    for node in cluster.values():
        assert node.run("systemctl is-active annad").stdout.strip() == "active"
    (*_, round_block) = section_10()
    follow(cluster[1], round_block, cwd="/root")
    assert len(digests(wait_complete(cluster, "first-round", ALL))) == 1
    status = annactl(cluster[2], "status")
    assert {peer["node_id"]: peer["up"] for peer in status["peers"]} == {
        "node_001": True,
        "node_003": True,
    }


def test_rounds_complete_with_one_machine_stopped(cluster: dict[int, Machine]) -> None:
    """`systemctl stop annad` on node 3: nodes 1 and 2 still complete rounds (2 of 3)."""
    cluster[3].run("systemctl stop annad")
    start_round(cluster[1], "multihost-2")
    running = {n: cluster[n] for n in (1, 2)}
    assert len(digests(wait_complete(running, "multihost-2", {"node_001", "node_002"}))) == 1


def test_the_stopped_machine_converges_when_started_again(cluster: dict[int, Machine]) -> None:
    """Started again, node 3 catches up on the round it missed: every round has one result
    on all three machines, and new rounds include it."""
    cluster[3].run("systemctl start annad")
    missed = wait_complete(cluster, "multihost-2", ALL)
    assert len(digests(missed)) == 1
    assert len(digests(views(cluster, "first-round"))) == 1
    start_round(cluster[2], "multihost-3")
    assert len(digests(wait_complete(cluster, "multihost-3", ALL))) == 1
