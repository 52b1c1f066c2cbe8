"""SIGHUP reload (SPEC §6): validate everything, then swap all of it at once.

Prometheus' rule, made stricter: the new peers.yml, its certificates and the validators'
addresses are all read and checked, and both TLS contexts built, before anything
running changes; on any error the node keeps its last good config, says why (log,
metric, audit entry) and nothing else moves. A valid file is then applied in one step:
the node's validator set and quorum for new rounds, the RPC limits, the server
certificate for new connections, the peer links (removed ones cancelled, added ones
started, changed ones restarted). Reloads never overlap: the daemon's signal loop runs
them one at a time.
"""

from __future__ import annotations

import logging
import socket
import ssl
from collections.abc import Callable
from functools import partial

import attrs
import trio

from . import systemd
from ._exceptions import ConfigError
from .audit import AuditLog
from .config import diff_peers, self_port_change
from .metrics import Metrics
from .models import ClusterConfig, format_utc_ms
from .node import Node
from .peers import PeerSupervisor
from .rpc.server import RpcServer
from .seams import Clock
from .tls import ReloadableServerContext

log = logging.getLogger("anna.reload")

INSECURE_WARNING = "WARN: Running with allow_insecure_peers=true - TLS DISABLED"


def validator_addresses(config: ClusterConfig) -> frozenset[str]:
    """IP addresses of every validator (blocking: resolves names); exempt from rate
    limits, and the only sources node-to-node endpoints answer without TLS."""
    found: set[str] = set()
    for peer in config.peers:
        try:
            for info in socket.getaddrinfo(peer.address, None):
                found.add(str(info[4][0]))
        except OSError:
            log.warning(
                "cannot resolve validator address %s (rate limit applies to it)", peer.address
            )
    return frozenset(found)


def refusal(old: ClusterConfig, new: ClusterConfig, node_id: str) -> str | None:
    """Why a valid file still cannot be applied without a restart, else None."""
    moved = self_port_change(old, new, node_id)
    if moved:
        return moved
    if new.tls.enabled != old.tls.enabled:
        return "restart required: tls.enabled changed"
    return None


@attrs.frozen
class ReloadPlan:
    """A checked config and everything built from it, ready to swap in."""

    config: ClusterConfig
    exempt: frozenset[str]
    server_tls: ssl.SSLContext | None
    added: list[str]
    removed: list[str]
    changed: list[str]


class Reloader:
    def __init__(
        self,
        *,
        node_id: str,
        load: Callable[[], ClusterConfig],
        client_tls: Callable[[ClusterConfig], ssl.SSLContext | None],
        server_tls: ReloadableServerContext | None,
        node: Node,
        supervisor: PeerSupervisor,
        rpc: RpcServer,
        audit: AuditLog,
        metrics: Metrics,
        clock: Clock,
    ) -> None:
        self._node_id = node_id
        self._load = load
        self._client_tls = client_tls
        self._server_tls = server_tls
        self._node = node
        self._supervisor = supervisor
        self._rpc = rpc
        self._audit = audit
        self._metrics = metrics
        self._clock = clock

    async def reload(self) -> None:
        systemd.notify("RELOADING=1")
        at = format_utc_ms(self._clock.wall())
        try:
            plan = await trio.to_thread.run_sync(self._plan)
        except (ConfigError, OSError, ValueError) as exc:
            await self._refuse(
                at, "; ".join(exc.problems) if isinstance(exc, ConfigError) else str(exc)
            )
        else:
            await self._swap(plan, at)
        systemd.notify("READY=1")

    def _plan(self) -> ReloadPlan:
        """Read and check the file, resolve the addresses, build both TLS contexts
        (blocking; nothing running changes). Raises ConfigError, OSError or ValueError."""
        old, new = self._node.config, self._load()
        reason = refusal(old, new, self._node_id)
        if reason:
            raise ConfigError(reason)
        exempt = validator_addresses(new)
        self._client_tls(new)
        prepared = self._server_tls.prepare(new.tls) if self._server_tls is not None else None
        return ReloadPlan(new, exempt, prepared, *diff_peers(old, new))

    async def _refuse(self, at: str, reason: str) -> None:
        log.error("reload failed, keeping the last good config: %s", reason)
        self._metrics.peer_reloads.labels("failure").inc()
        self._metrics.config_last_reload_successful.set(0)
        self._node.record_reload("failure", at, reason)
        await trio.to_thread.run_sync(
            partial(self._audit.append, "peer_reload", {"result": "failure", "error": reason})
        )

    async def _swap(self, plan: ReloadPlan, at: str) -> None:
        new = plan.config
        self._node.apply_config(new)
        self._rpc.set_limits(new.limits, plan.exempt)
        if self._server_tls is not None and plan.server_tls is not None:
            self._server_tls.use(plan.server_tls)
        # Links renew their connections with the new TLS settings themselves; only peers
        # whose entry changed restart, so requests in flight to the others are not dropped.
        await self._supervisor.apply(new, changed=set(plan.changed))
        self._metrics.peer_reloads.labels("success").inc()
        self._metrics.config_last_reload_successful.set(1)
        self._node.record_reload("success", at, None)
        if new.allow_insecure_peers:
            log.warning(INSECURE_WARNING)
        log.info(
            "reload applied: added %s, removed %s, changed %s",
            plan.added,
            plan.removed,
            plan.changed,
        )
        entry = {"result": "success", "added": plan.added, "removed": plan.removed}
        await trio.to_thread.run_sync(
            partial(self._audit.append, "peer_reload", {**entry, "changed": plan.changed})
        )
