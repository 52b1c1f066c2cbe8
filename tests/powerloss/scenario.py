"""The power-loss scenarios and their checks: what a node promised, and what it kept.

A case is (seed, crash point). Everything the scenario chooses — the victim, the v1
state it upgrades from, each load task's requests, the moment of a kill — comes from
`random.Random(f"{seed}/{crash}/<what>")` (thread scheduling does not, so a replay explores
the same choices, not the same interleaving). The checks never stop at the first broken
promise: each goes into `Findings`, and the test fails listing all of them with the
seed, the crash point and the command that replays it.

Operational crash points (`operational_crash`): a 3-node mTLS cluster, every node
upgraded from a v1 state at its first start, is driven by concurrent clients (round
starts and submits with and without Idempotency-Keys, status reads) and one SIGHUP
reload; then the crash point is armed with `exit` on the victim (or, for `kill`, the
victim is killed -9 at a random moment) while the load goes on; its LazyFS drops what
was never fsynced; it restarts while its peers are paused (SIGSTOP), so only its own
disk can answer, and is checked; then the peers resume and the cluster is checked.

Migration crash points (`migration_crash`): one node's v1 → v2 migration dies at the
failpoint (in annad's start-up or in `annactl migrate-state-v2`), the power is cut, and
the next annad start must find the untouched v1 or a complete v2 and record the
migration exactly once.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import attrs
import trio
from powerloss_cluster import PowerLossCluster, power_loss_cluster

from _launch import reload
from anna_trio import testnet, tls
from anna_trio._exceptions import StateError
from anna_trio.config import load_cluster_config
from anna_trio.state.schema import parse_state, validate_v2
from anna_trio.transport.client import HttpClient, PeerConnectionError

ANNACTL = str(Path(sys.executable).parent / "annactl")
KILL = "kill"  # the crash point that is no failpoint: kill -9 at a seeded moment
LOAD_TASKS = 2
REQUEST_TIMEOUT = 5.0
FIRE_WITHIN = 15.0  # an armed crash point under load fires well within this
SETTLE_WITHIN = 20.0
HEAD_SUFFIX = ".head"  # the audit log's chain-head anchor, `<log>.head` beside it

# The promises, as the report names them.
FIRED = "the crash point fires"
RESTART = "the node comes back after the power cut"
ACKED = "every acknowledged (2xx) round and observation survives"
IDEMPOTENT = "every Idempotency-Key answer survives unchanged"
OWN = "its own observations stay byte-identical to what it let out"
BYZANTINE = "no node lists it as Byzantine"
AUDIT_IDS = "audit_ids never repeat or go back"
AUDIT_LOG = "the audit log verifies"
TRUNCATION = "a truncated audit log does not verify"
STATE = "state.json claims no more than the node holds"
CLUSTER = "the cluster completes a round afterwards"
STOP = "every node stops cleanly"
MIGRATION_STATE = "the migration leaves the untouched v1 or a complete v2"
MIGRATION_ONCE = "the audit log records the migration once"
LOSSES = frozenset({ACKED, IDEMPOTENT, OWN})


@attrs.frozen
class Case:
    seed: int
    crash: str

    def __str__(self) -> str:
        return f"seed={self.seed}-{self.crash}"

    def rng(self, *more: object) -> random.Random:
        return random.Random("/".join(map(str, (self.seed, self.crash, *more))))

    @property
    def replay(self) -> str:
        return f"ANNA_POWERLOSS_SEED={self.seed} ANNA_POWERLOSS_CRASH={self.crash} nox -s powerloss"


@attrs.define
class Findings:
    """Broken promises, in the order found."""

    case: Case
    victim: str = "?"
    logs: Path | None = None
    items: list[tuple[str, str]] = attrs.field(factory=list)

    def add(self, check: str, detail: str) -> None:
        self.items.append((check, detail))

    def checks(self) -> set[str]:
        return {check for check, _ in self.items}

    def __bool__(self) -> bool:
        return bool(self.items)

    def report(self) -> str:
        lines = [
            f"power loss at {self.case.crash} (seed {self.case.seed}, victim {self.victim}): "
            f"{len(self.checks())} promise(s) broken"
        ]
        for check in dict.fromkeys(check for check, _ in self.items):
            details = [detail for c, detail in self.items if c == check]
            lines.append(f"- {check}:")
            lines += [f"    {detail}" for detail in details[:8]]
            if len(details) > 8:
                lines.append(f"    … and {len(details) - 8} more")
        lines.append(f"replay: {self.case.replay}")
        if self.logs is not None:
            lines.append(f"node logs: {self.logs}")
        return "\n".join(lines)


def canonical(obs: dict[str, Any]) -> str:
    return json.dumps(obs, sort_keys=True, separators=(",", ":"))


def v1_state(rng: random.Random) -> bytes:
    """A mirror-audit era v1 state.json, its audit_id floor chosen by the seed."""
    state = {
        "system_state": "configured",
        "schema_version": 1,
        "last_boot_time": "2025-11-01T00:00:00Z",
        "configuration_hash": f"cfg{rng.randrange(10**6)}",
        "last_audit_id": rng.randrange(100, 10_000),
        "total_audits": rng.randrange(1, 50),
        "recent_audits": [{"id": "a1", "tis": 0.8}],
    }
    return json.dumps(state, indent=1).encode()


# --- talking to the nodes ------------------------------------------------------------------


class Rpc:
    """One client's mTLS connections to every node; one request at a time, like the
    lean client it wraps. A node that does not answer (dying, paused) is None."""

    def __init__(self, layout: testnet.Layout) -> None:
        config = load_cluster_config(
            layout.node_dir(1) / "peers.yml", node_id=None, check_tls_files=False
        )
        context = tls.client_context(config.tls)
        self._clients = {
            ep.n: HttpClient(ep.host, ep.rpc_port, ssl_context=context, server_hostname=ep.host)
            for ep in layout.endpoints
        }

    async def aclose(self) -> None:
        for client in self._clients.values():
            await client.aclose()

    async def call(
        self, n: int, method: str, path: str, body: Any = None, key: str | None = None
    ) -> tuple[int, Any] | None:
        headers = {"idempotency-key": key} if key is not None else None
        try:
            with trio.fail_after(REQUEST_TIMEOUT):
                answer = await self._clients[n].request(
                    method, path, json_body=body, headers=headers
                )
        except (OSError, trio.TooSlowError):  # PeerError is an OSError
            await self._clients[n].aclose()
            return None
        return answer.status, answer.json()

    async def round(self, n: int, round_id: str) -> dict[str, Any] | None:
        answer = await self.call(n, "GET", f"/rpc/status?round_id={round_id}")
        return answer[1] if answer is not None and answer[0] == 200 else None

    async def status(self, n: int) -> dict[str, Any] | None:
        answer = await self.call(n, "GET", "/rpc/status")
        return answer[1] if answer is not None and answer[0] == 200 else None


async def poll(check: Callable[[], Awaitable[bool]], within: float) -> bool:
    """Whether `check()` came true within `within` seconds."""
    with trio.move_on_after(within):
        while not await check():  # noqa: ASYNC110 - remote state: polling is the only way
            await trio.sleep(0.05)
        return True
    return False


def read_audit(path: Path) -> list[dict[str, Any]]:
    """The complete entries of an audit log (a torn last line is no entry)."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return []
    entries = []
    for line in raw.split(b"\n")[:-1]:
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if isinstance(entry, dict):
            entries.append(entry)
    return entries


async def annactl(*args: str) -> tuple[int, str]:
    done = await trio.run_process(
        [ANNACTL, *args], capture_stdout=True, capture_stderr=True, check=False
    )
    return done.returncode, (done.stdout + done.stderr).decode(errors="replace").strip()


async def check_audit_log(path: Path, scratch: Path, findings: Findings) -> None:
    """`annactl audit verify` accepts the log; a copy without its last entry (the anchor
    file `<log>.head` copied beside it, as a backup tool would) is refused, naming the
    last entry the chain head says exists. The two run side by side."""
    entries = read_audit(path)
    if len(entries) < 2:
        findings.add(AUDIT_LOG, f"only {len(entries)} entries in {path}")
        return
    copy, anchored = truncated_copy(path, scratch)
    answers: dict[Path, tuple[int, str]] = {}

    async def verify(log: Path) -> None:
        answers[log] = await annactl("audit", "verify", "--audit-log", str(log))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(verify, path)
        nursery.start_soon(verify, copy)
    code, output = answers[path]
    if code != 0:
        findings.add(AUDIT_LOG, f"annactl audit verify exit {code}: {output}")
        return
    last = entries[-1]["audit_id"]
    code, output = answers[copy]
    anchor = "" if anchored else f" (no anchor {path.name}{HEAD_SUFFIX} beside the log)"
    if code != 1:
        findings.add(
            TRUNCATION,
            f"without its last entry (audit_id {last}) the log still verifies, exit {code}: "
            f"{output}{anchor}",
        )
    elif str(last) not in output:
        findings.add(TRUNCATION, f"refused, but not naming audit_id {last}: {output}")


def truncated_copy(path: Path, scratch: Path) -> tuple[Path, bool]:
    """The log without its last line in `scratch`, with its anchor copied beside it when
    there is one (as a backup would); returns the copy and whether it had an anchor."""
    scratch.mkdir(parents=True, exist_ok=True)
    copy = scratch / path.name
    lines = path.read_bytes().split(b"\n")[:-1]
    copy.write_bytes(b"\n".join(lines[:-1]) + b"\n")
    head = path.with_name(path.name + HEAD_SUFFIX)
    if head.exists():
        shutil.copyfile(head, copy.with_name(copy.name + HEAD_SUFFIX))
    return copy, head.exists()


def audit_id_clashes(named: list[tuple[int, str, str]]) -> list[str]:
    """(audit_id, identity, label) triples: an id naming two identities is a reuse."""
    by_id: dict[int, dict[str, str]] = {}
    for audit_id, identity, label in named:
        by_id.setdefault(audit_id, {})[identity] = label
    return [
        f"audit_id {audit_id} names {' and '.join(sorted(labels.values()))}"
        for audit_id, labels in sorted(by_id.items())
        if len(labels) > 1
    ]


# --- the operational scenario ---------------------------------------------------------------


@attrs.frozen
class Ack:
    """A 2xx answer of the victim: what it promised to keep."""

    path: str
    body: dict[str, Any]
    key: str | None
    status: int
    answer: dict[str, Any]
    round_id: str
    signature: str | None  # the submitted observation's


@attrs.define
class History:
    """What the victim acknowledged and let out before the power cut."""

    victim: int
    acks: list[Ack] = attrs.field(factory=list)
    round_ids: set[str] = attrs.field(factory=set)
    pool: list[dict[str, Any]] = attrs.field(factory=list)  # peers' observations to submit
    let_out: dict[str, dict[str, dict[str, Any]]] = attrs.field(factory=dict)
    sequence: int = 0

    @property
    def victim_name(self) -> str:
        return testnet.node_id(self.victim)

    def next(self) -> int:
        self.sequence += 1
        return self.sequence

    def saw(self, view: dict[str, Any] | None) -> None:
        """A round view someone outside the victim saw: note its observations."""
        if view is None:
            return
        self.round_ids.add(view["round_id"])
        for obs in view["observations"]:
            if obs["node_id"] == self.victim_name:
                self.let_out.setdefault(obs["round_id"], {})[obs["signature"]] = obs
            elif len(self.pool) < 200:
                self.pool.append(obs)


class Operational:
    """One operational case on a mounted, running cluster."""

    def __init__(self, case: Case, cluster: PowerLossCluster, findings: Findings) -> None:
        self.case = case
        self.cluster = cluster
        self.findings = findings
        self.numbers = [ep.n for ep in cluster.layout.endpoints]
        self.victim = case.rng("victim").choice(self.numbers)
        self.peers = [n for n in self.numbers if n != self.victim]
        self.history = History(self.victim)
        self.final_round = "pl_after"  # started once the victim is back
        findings.victim = self.history.victim_name

    # --- load ---------------------------------------------------------------------------

    async def load(self, task: int, steps: int | None) -> None:
        """Requests of one client, `steps` of them or until cancelled."""
        rng = self.case.rng("load", task, steps)
        async with self.rpc() as rpc:
            done = 0
            while steps is None or done < steps:
                await self.step(rpc, rng)
                done += 1

    async def step(self, rpc: Rpc, rng: random.Random) -> None:
        history, victim = self.history, self.victim
        choice = rng.random()
        if choice < 0.5 or not history.pool:
            n = rng.choice([victim, victim, *self.peers])
            seq = history.next()
            fresh = n == victim and rng.random() < 0.4  # the victim picks the round id
            body: dict[str, Any] = {} if fresh else {"round_id": f"pl_{seq:04d}"}
            key = f"pl-start-{seq}" if rng.random() < 0.8 else None
            answer = await rpc.call(n, "POST", "/rpc/round/start", body, key)
            if answer is None or answer[0] != 202:
                return
            round_id = answer[1]["round_id"]
            history.round_ids.add(round_id)
            if n == victim:
                history.acks.append(Ack("/rpc/round/start", body, key, *answer, round_id, None))
            history.saw(await rpc.round(rng.choice(self.peers), round_id))
        elif choice < 0.85:
            obs = rng.choice(history.pool)
            key = f"pl-submit-{history.next()}" if rng.random() < 0.8 else None
            submit = {"observation": obs}
            answer = await rpc.call(victim, "POST", "/rpc/submit", submit, key)
            if answer is not None and answer[0] == 200:
                history.acks.append(
                    Ack("/rpc/submit", submit, key, *answer, obs["round_id"], obs["signature"])
                )
        else:
            round_id = rng.choice(sorted(history.round_ids)) if history.round_ids else None
            if round_id is not None:
                history.saw(await rpc.round(victim, round_id))  # what a client sees

    async def warm_up(self) -> None:
        """Load with one SIGHUP reload of the victim in the middle of it."""
        rng = self.case.rng("warm-up")
        async with trio.open_nursery() as nursery:
            for task in range(LOAD_TASKS):
                nursery.start_soon(self.load, task, rng.randrange(3, 7))
            await trio.sleep(rng.uniform(0.0, 0.3))
            async with self.cluster.connect() as client:
                await reload(client, self.cluster, self.victim, "success")

    async def crash(self) -> None:
        """Arm the crash point (or pick the kill moment) under load; wait for the death."""
        cluster, victim, crash = self.cluster, self.victim, self.case.crash
        process = cluster.processes[victim]
        async with trio.open_nursery() as nursery:
            for task in range(LOAD_TASKS):
                nursery.start_soon(self.load, task, None)
            if crash == KILL:
                await trio.sleep(self.case.rng("kill").uniform(0.0, 0.8))
                process.kill()
            else:
                async with cluster.connect() as client:
                    try:
                        code, body = await client.plain(
                            victim, "PUT", f"/debug/failpoints/{crash}", b"exit"
                        )
                    except PeerConnectionError:  # under load it fired before its answer left
                        code, body = 200, b""
                assert code == 200, f"arming {crash}: {code} {body!r}"
                if crash.startswith("audit."):
                    cluster.signal(victim, signal.SIGHUP)  # a reload writes an audit entry

            async def dead() -> bool:
                return process.poll() is not None

            if not await poll(dead, FIRE_WITHIN):
                self.findings.add(FIRED, f"{crash} armed with exit did not fire in {FIRE_WITHIN} s")
            nursery.cancel_scope.cancel()

    # --- after the power cut --------------------------------------------------------------

    async def run(self) -> None:
        cluster, victim, findings = self.cluster, self.victim, self.findings
        await self.warm_up()
        await self.crash()
        before_cut = read_audit(cluster.audit_log(victim))  # what reached its page cache
        status = await trio.to_thread.run_sync(cluster.power_cut, victim)
        if self.case.crash != KILL and status != -signal.SIGKILL:
            findings.add(FIRED, f"the victim exited with status {status}, not by SIGKILL")
        after_cut = read_audit(cluster.audit_log(victim))
        state_after_cut = _read_or_empty(cluster.layout.node_dir(victim) / "state.json")
        await self.collect_let_out()
        for n in self.peers:
            cluster.pause(n)
        try:
            failure = await cluster.restart(victim)
            if failure is not None:
                findings.add(RESTART, failure)
                return
            async with self.rpc() as rpc:
                await self.check_own(rpc)
                await self.check_acks(rpc)
                await self.check_state_json(rpc, state_after_cut)
                await self.check_idempotency(rpc)
        finally:
            for n in self.peers:
                cluster.resume(n)
        async with self.rpc() as rpc:
            await self.settle(rpc)
            await self.check_byzantine(rpc)
            observations = await self.victim_observations(rpc)
        codes = await trio.to_thread.run_sync(cluster.stop_all)
        for n, code in codes.items():
            if code != 0:
                findings.add(STOP, f"node {n} exited {code} on SIGTERM:\n{cluster.log_tail(n)}")
        self.check_audit_ids(before_cut, after_cut, observations)
        await check_audit_log(cluster.audit_log(victim), cluster.logs / "truncated", findings)

    @asynccontextmanager
    async def rpc(self) -> AsyncIterator[Rpc]:
        rpc = Rpc(self.cluster.layout)
        try:
            yield rpc
        finally:
            with trio.CancelScope(shield=True):
                await rpc.aclose()

    async def collect_let_out(self) -> None:
        """Every round the peers hold, with the victim's observations they received."""
        history = self.history
        async with self.rpc() as rpc:
            for n in self.peers:
                status = await rpc.status(n)
                assert status is not None, f"peer {n} does not answer"
                history.round_ids.update(r["round_id"] for r in status["rounds"])
            for round_id in sorted(history.round_ids):
                for n in self.peers:
                    history.saw(await rpc.round(n, round_id))
        for round_id, sent in sorted(history.let_out.items()):
            if len(sent) > 1:
                self.findings.add(OWN, f"{round_id}: signed {len(sent)} observations already")

    async def check_own(self, rpc: Rpc) -> None:
        """With its peers paused only its disk answers: every observation of its own it
        let out is there, byte for byte, and no other."""
        name = self.history.victim_name
        for round_id, sent in sorted(self.history.let_out.items()):
            view = await rpc.round(self.victim, round_id)
            if view is None:
                self.findings.add(OWN, f"{round_id}: round unknown after the restart")
                continue
            held = {canonical(o) for o in view["observations"] if o["node_id"] == name}
            for obs in sent.values():
                if canonical(obs) not in held:
                    others = [json.loads(h)["audit_id"] for h in held]
                    self.findings.add(
                        OWN,
                        f"{round_id}: let out audit_id {obs['audit_id']} "
                        f"({obs['signature'][:12]}…), holds {others or 'none'}",
                    )

    async def check_acks(self, rpc: Rpc) -> None:
        for ack in self.history.acks:
            view = await rpc.round(self.victim, ack.round_id)
            what = f"{ack.path} {ack.status} (Idempotency-Key {ack.key})"
            if ack.signature is not None:
                obs = ack.body["observation"]
                what += f" of {obs['node_id']}'s observation, duplicate={ack.answer['duplicate']}"
            if view is None:
                self.findings.add(ACKED, f"{what}: round {ack.round_id} unknown after the restart")
            elif ack.signature is not None and ack.signature not in {
                o["signature"] for o in view["observations"]
            }:
                self.findings.add(ACKED, f"{what}: not in {ack.round_id} after the restart")

    async def check_state_json(self, rpc: Rpc, raw: bytes) -> None:
        try:
            state = parse_state(raw)
            validate_v2(state)
        except StateError as exc:
            self.findings.add(STATE, f"state.json after the cut is no valid v2: {exc}")
            return
        last = state["consensus"].get("last_round_id")
        if last:
            view = await rpc.round(self.victim, last)
            if view is None or len(view["observations"]) < view["required_quorum"]:
                held = (
                    "unknown" if view is None else f"with {len(view['observations'])} observations"
                )
                self.findings.add(
                    STATE,
                    f"says round {last} completed; after the restart the node holds it {held}",
                )

    async def check_idempotency(self, rpc: Rpc) -> None:
        for ack in self.history.acks:
            if ack.key is None:
                continue
            again = await rpc.call(self.victim, "POST", ack.path, ack.body, ack.key)
            if again != (ack.status, ack.answer):
                self.findings.add(
                    IDEMPOTENT,
                    f"{ack.path} Idempotency-Key {ack.key}: first {ack.status} {ack.answer}, "
                    f"after the power cut {again}",
                )

    async def settle(self, rpc: Rpc) -> None:
        """One more round everywhere, then every node reconciles with every other."""
        round_id = self.final_round
        starter = self.peers[0]
        answer = await rpc.call(starter, "POST", "/rpc/round/start", {"round_id": round_id})

        async def complete() -> bool:
            for n in self.numbers:
                view = await rpc.round(n, round_id)
                if view is None or view["status"] != "Complete":
                    return False
            return True

        if answer is None or answer[0] != 202 or not await poll(complete, SETTLE_WITHIN):
            self.findings.add(CLUSTER, f"{round_id} not Complete on every node: start {answer}")
        for n in self.numbers:
            await rpc.call(n, "POST", "/rpc/reconcile", {})

    async def check_byzantine(self, rpc: Rpc) -> None:
        for n in self.numbers:
            status = await rpc.status(n)
            for record in (status or {}).get("byzantine_nodes", []):
                self.findings.add(
                    BYZANTINE,
                    f"node_{n:03d} lists {record['node_id']} ({record['reason']}, "
                    f"round {record['round_id']})",
                )

    async def victim_observations(self, rpc: Rpc) -> list[dict[str, Any]]:
        """Every observation of the victim any node holds now, for the audit_id checks."""
        found: dict[str, dict[str, Any]] = {}
        for round_id in sorted(self.history.round_ids | {self.final_round}):
            for n in self.numbers:
                view = await rpc.round(n, round_id)
                for obs in (view or {}).get("observations", []):
                    if obs["node_id"] == self.history.victim_name:
                        found[obs["signature"]] = obs
        return list(found.values())

    def check_audit_ids(
        self,
        before_cut: list[dict[str, Any]],
        after_cut: list[dict[str, Any]],
        observations: list[dict[str, Any]],
    ) -> None:
        """No audit_id names two things (observations by signature, entries by hash), and
        what the victim made after the restart is above everything it used before."""
        let_out = [o for sent in self.history.let_out.values() for o in sent.values()]
        used = max(
            [e["audit_id"] for e in before_cut] + [o["audit_id"] for o in let_out], default=0
        )
        final = read_audit(self.cluster.audit_log(self.victim))
        named = [(e["audit_id"], e["hash"], f"a {e['event']} entry") for e in before_cut + final]
        named += [
            (o["audit_id"], o["signature"], f"an observation of {o['round_id']}")
            for o in let_out + observations
        ]
        for clash in audit_id_clashes(named):
            self.findings.add(AUDIT_IDS, clash)
        survived = {e["hash"] for e in after_cut}
        made_after = [(f"audit entry {e['event']}", e) for e in final if e["hash"] not in survived]
        made_after += [
            (f"observation of {o['round_id']}", o)
            for o in observations
            if o["round_id"] == self.final_round
        ]
        for what, item in made_after:
            if item["audit_id"] <= used:
                self.findings.add(
                    AUDIT_IDS,
                    f"{what} after the restart has audit_id {item['audit_id']}, "
                    f"not above {used} used before",
                )


async def operational_crash(
    case: Case, lazyfs: Path, directory: Path, victim_env: dict[str, str] | None = None
) -> Findings:
    """Run one operational case; `victim_env` goes to the victim's first start only."""
    findings = Findings(case, logs=directory / "logs")
    with power_loss_cluster(directory, 3, lazyfs) as cluster:
        for ep in cluster.layout.endpoints:
            (cluster.disk(ep.n) / "state.json").write_bytes(v1_state(case.rng("v1", ep.n)))
        await trio.to_thread.run_sync(cluster.mount_all)
        scenario = Operational(case, cluster, findings)
        for n in scenario.numbers:
            cluster.start(n, env=victim_env if n == scenario.victim else None)
        await cluster.wait_ready()
        await scenario.run()
    return findings


# --- the migration scenario -----------------------------------------------------------------


async def migration_crash(case: Case, lazyfs: Path, directory: Path) -> Findings:
    """Kill the v1 → v2 migration at its failpoint, cut the power, start annad again."""
    findings = Findings(case, victim=testnet.node_id(1), logs=directory / "logs")
    rng = case.rng("migration")
    v1 = v1_state(rng)
    with power_loss_cluster(directory, 1, lazyfs) as cluster:
        (cluster.disk(1) / "state.json").write_bytes(v1)
        await trio.to_thread.run_sync(cluster.mount_all)
        node_dir = cluster.layout.node_dir(1)
        failpoint = {"ANNA_FAILPOINTS": f"{case.crash}=exit"}
        status: int | str = f"still running after {FIRE_WITHIN:.0f} s"
        if rng.random() < 0.5:
            how = "annad's start-up migration"
            cluster.start(1, env=failpoint)
            process = cluster.processes[1]

            async def dead() -> bool:
                return process.poll() is not None

            if await poll(dead, FIRE_WITHIN):
                status = process.returncode
            await trio.to_thread.run_sync(cluster.kill, 1)
        else:
            how = "annactl migrate-state-v2"
            command = [ANNACTL, "migrate-state-v2", "--state-dir", str(node_dir)]
            command += ["--audit-log", str(cluster.audit_log(1)), "--node-id", testnet.node_id(1)]
            with trio.move_on_after(FIRE_WITHIN):
                done = await trio.run_process(
                    command, env={**os.environ, **failpoint}, capture_stderr=True, check=False
                )
                status = done.returncode
                (cluster.logs / "annactl.log").write_bytes(done.stderr)
        if status != -signal.SIGKILL:
            findings.add(FIRED, f"{how} with {case.crash}=exit ended with status {status}")
        await trio.to_thread.run_sync(cluster.mounts[1].clear_cache)
        check_migrated(node_dir / "state.json", v1, findings, f"after the cut in {how}", True)
        failure = await cluster.restart(1)
        if failure is not None:
            findings.add(RESTART, failure)
            return findings
        codes = await trio.to_thread.run_sync(cluster.stop_all)
        if codes.get(1) != 0:
            findings.add(STOP, f"exit {codes.get(1)} on SIGTERM:\n{cluster.log_tail(1)}")
        check_migrated(node_dir / "state.json", v1, findings, "after the next start", False)
        entries = read_audit(cluster.audit_log(1))
        migrations = [e for e in entries if e["event"] == "state_migration"]
        results = [e.get("result") for e in migrations]
        if results != ["success"] or any(e["event"] == "state_rollback" for e in entries):
            findings.add(
                MIGRATION_ONCE,
                f"state_migration results {results}, events {[e['event'] for e in entries]}",
            )
        floor = json.loads(v1)["last_audit_id"]
        low = [e["audit_id"] for e in entries if e["audit_id"] <= floor]
        if low:
            findings.add(AUDIT_IDS, f"audit_ids {low} not above v1's last_audit_id {floor}")
        await check_audit_log(cluster.audit_log(1), cluster.logs / "truncated", findings)
    return findings


def check_migrated(path: Path, v1: bytes, findings: Findings, when: str, v1_allowed: bool) -> None:
    """state.json is the untouched v1 (when allowed) or a complete v2 keeping v1's fields."""
    raw = _read_or_empty(path)
    if v1_allowed and raw == v1:
        return
    try:
        state = parse_state(raw)
        validate_v2(state)  # a v1 that is not the untouched one fails here too
    except StateError as exc:
        findings.add(MIGRATION_STATE, f"{when}: state.json ({len(raw)} bytes): {exc}")
        return
    lost = sorted(
        key
        for key, value in json.loads(v1).items()
        if key != "schema_version" and state.get(key) != value
    )
    if lost:
        findings.add(MIGRATION_STATE, f"{when}: v2 state.json lost v1 fields {lost}")


def _read_or_empty(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        return b""
