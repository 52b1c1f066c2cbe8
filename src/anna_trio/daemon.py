"""annad's root nursery: start-up order, signals, reload, shutdown, exit codes (SPEC §1).

parse config → state-dir lock → node key → migration → listeners → peers, coordinator,
reload → pid file → READY=1. SIGTERM/SIGINT drain and exit 0; SIGHUP reloads.
"""

from __future__ import annotations

import gc
import logging
import os
import signal
import socket
import ssl
import time
from datetime import UTC, datetime
from functools import partial
from typing import Any

import trio

from . import __version__, crypto, failpoints, systemd
from ._exceptions import ConfigError
from .audit import AuditIdAllocator, AuditLog
from .config import Settings, diff_peers, load_cluster_config, self_port_change
from .coordinator import RoundCoordinator
from .metrics import Metrics
from .models import ClusterConfig, Limits, format_utc
from .node import Node
from .observer import Observer
from .peers import PeerSupervisor
from .rpc.server import MetricsServer, RpcServer
from .state.lock import StateDirLock
from .state.migration import audit_floor_from_state, migrate_state
from .state.statefile import StateFile
from .store import Store
from .tls import ReloadableServerContext, client_context
from .transport.server import HttpServer

log = logging.getLogger("anna.daemon")

INSECURE_WARNING = "WARN: Running with allow_insecure_peers=true - TLS DISABLED"
SHUTDOWN_GRACE = 5.0
GC_YOUNG_THRESHOLD = 5000  # CPython's default is 700


def load_config_for(settings: Settings) -> ClusterConfig:
    return load_cluster_config(settings.peers_file, node_id=settings.node_id)


def _resolve_addresses(config: ClusterConfig) -> frozenset[str]:
    """IP addresses of every validator, exempt from rate limiting."""
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


class Daemon:
    """Everything one annad process owns, wired in start-up order."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.metrics = Metrics(settings.node_id)
        self.ready = False
        self._server_tls: ReloadableServerContext | None = None
        self._last_heartbeat = time.monotonic()

    async def run(self) -> None:
        s = self.settings
        config = await trio.to_thread.run_sync(load_config_for, s)
        if config.allow_insecure_peers:
            log.warning(INSECURE_WARNING)
        s.state_dir.mkdir(parents=True, exist_ok=True)
        with StateDirLock(s.state_dir):
            key = await trio.to_thread.run_sync(crypto.load_or_create_key, s.state_dir / "keys")
            ids = AuditIdAllocator(audit_floor_from_state(s.state_dir))
            audit = AuditLog.open(s.audit_log, s.node_id, ids)
            try:
                await self._run_with(config, key, ids, audit)
            finally:
                audit.close()

    async def _run_with(
        self, config: ClusterConfig, key: Any, ids: AuditIdAllocator, audit: AuditLog
    ) -> None:
        s = self.settings
        # Observations and audit entries share one sequence: the migration's entry must
        # come after every id this node already signed an observation with.
        ids.raise_floor(Store.peek_max_own_audit_id(s.state_dir / "node.db"))
        outcome = await trio.to_thread.run_sync(
            partial(
                migrate_state,
                s.state_dir,
                node_id=s.node_id,
                audit=audit,
                metrics=self.metrics,
                log=logging.getLogger("anna.migration"),
            )
        )
        log.info("state: %s", outcome.name.lower())
        state_file = await trio.to_thread.run_sync(StateFile.load, s.state_dir)
        store = Store(s.state_dir / "node.db")
        try:
            node = Node(
                node_id=s.node_id,
                key=key,
                config=config,
                round_timeout=s.round_timeout,
                store=store,
                audit=audit,
                ids=ids,
                metrics=self.metrics,
                observer=Observer(s.observer, s.node_id),
                state_file=state_file,
            )
            node.restore()
            await trio.to_thread.run_sync(
                lambda: audit.append("daemon_start", {"version": __version__, "pid": os.getpid()})
            )
            await self._serve(node, config, store, audit)
        finally:
            store.close()

    async def _serve(
        self, node: Node, config: ClusterConfig, store: Store, audit: AuditLog
    ) -> None:
        s = self.settings
        rpc_bind = s.rpc_listen or ("0.0.0.0", self._own_port(config))
        server_ssl = self._make_server_tls(config)
        supervisor = PeerSupervisor(node, self.metrics, _client_tls)
        rpc = RpcServer(node, self.metrics, reconcile=supervisor.pull_all)
        rpc.set_limits(config.limits, await trio.to_thread.run_sync(_resolve_addresses, config))
        metrics_server = MetricsServer(
            self.metrics,
            node.health,
            lambda: self.ready,
            failpoints_http=os.environ.get("ANNA_FAILPOINTS_HTTP") == "1",
        )
        rpc_http = HttpServer(
            rpc.handle,
            limits=lambda: rpc.limits,
            ssl_context=server_ssl,
            trust=rpc,
            count_error=lambda kind: self.metrics.http_errors.labels("rpc", kind).inc(),
            count_dropped=lambda reason: self.metrics.rpc_connections_dropped.labels(reason).inc(),
            on_tls_failure=lambda reason: self.metrics.tls_handshake_failures.labels(
                "server", reason
            ).inc(),
        )
        self.metrics.watch_rpc_connections(rpc_http.statistics)
        metrics_http = HttpServer(
            metrics_server.handle,
            limits=Limits,
            count_error=lambda kind: self.metrics.http_errors.labels("metrics", kind).inc(),
        )
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
            async with trio.open_nursery() as root:
                await root.start(store.run)
                await root.start(node.run)
                async with trio.open_nursery() as http:
                    await http.start(rpc_http.serve, *rpc_bind)
                    await http.start(metrics_http.serve, *s.metrics_listen)
                    await root.start(supervisor.run)
                    root.start_soon(RoundCoordinator(node, s.round_interval, self._heartbeat).run)
                    root.start_soon(systemd.watchdog_loop, self._healthy)
                    self._write_pid()
                    settle_heap()
                    self.ready = True
                    systemd.notify("READY=1")
                    log.info(
                        "annad %s ready: node %s, rpc %s:%d (%s), metrics %s:%d, %d validators, quorum %d",
                        __version__,
                        s.node_id,
                        *rpc_bind,
                        "mTLS" if server_ssl else "plain HTTP",
                        *s.metrics_listen,
                        len(config.peers),
                        config.quorum,
                    )
                    async for signum in signals:
                        if signum == signal.SIGHUP:
                            await self._reload(node, supervisor, rpc, audit)
                            continue
                        log.info("received %s: shutting down", signal.Signals(signum).name)
                        break
                    systemd.notify("STOPPING=1")
                    self.ready = False
                    await rpc_http.shutdown()
                    await metrics_http.shutdown()
                    http.cancel_scope.deadline = trio.current_time() + SHUTDOWN_GRACE
                root.cancel_scope.cancel()
        with trio.CancelScope(shield=True):
            await node.persist_state()
            await trio.to_thread.run_sync(
                lambda: audit.append("daemon_stop", {"reason": "signal"}, durable=True)
            )
        self.settings.pid_file.unlink(missing_ok=True)

    def _heartbeat(self) -> None:
        self._last_heartbeat = time.monotonic()

    def _healthy(self) -> bool:
        return time.monotonic() - self._last_heartbeat < 10.0

    def _own_port(self, config: ClusterConfig) -> int:
        peer = config.peer(self.settings.node_id)
        assert peer is not None
        return peer.port

    def _make_server_tls(self, config: ClusterConfig) -> ssl.SSLContext | None:
        if not config.tls.enabled:
            return None
        self._server_tls = ReloadableServerContext(config.tls)
        return self._server_tls.context

    def _write_pid(self) -> None:
        path = self.settings.pid_file
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(f"{os.getpid()}\n")
        os.replace(tmp, path)

    async def _reload(
        self, node: Node, supervisor: PeerSupervisor, rpc: RpcServer, audit: AuditLog
    ) -> None:
        """Validate-then-swap (SPEC §6); the last good config stays on any error.

        Runs from the signal loop, so reloads never overlap (Prometheus' one-loop rule).
        """
        systemd.notify("RELOADING=1")
        now = format_utc(datetime.now(UTC))
        old = node.config
        try:
            new = await trio.to_thread.run_sync(load_config_for, self.settings)
            refusal = self_port_change(old, new, self.settings.node_id)
            if refusal:
                raise ConfigError(refusal)
            if new.tls.enabled != old.tls.enabled:
                raise ConfigError("restart required: tls.enabled changed")
            exempt = await trio.to_thread.run_sync(_resolve_addresses, new)
            # Build both TLS contexts before swapping anything: all or nothing.
            _client_tls(new)
            if self._server_tls is not None:
                self._server_tls.update(new.tls)
        except (ConfigError, OSError, ValueError) as exc:
            reason = "; ".join(exc.problems) if isinstance(exc, ConfigError) else str(exc)
            log.error("reload failed, keeping the last good config: %s", reason)
            self.metrics.peer_reloads.labels("failure").inc()
            self.metrics.config_last_reload_successful.set(0)
            node.reload_status.result, node.reload_status.at, node.reload_status.error = (
                "failure",
                now,
                reason,
            )
            await trio.to_thread.run_sync(
                lambda: audit.append(
                    "peer_reload", {"result": "failure", "error": reason}, durable=True
                )
            )
            systemd.notify("READY=1")
            return
        added, removed, changed = diff_peers(old, new)
        node.apply_config(new)
        rpc.set_limits(new.limits, exempt)
        # Links renew their connections with new TLS settings themselves; only peers whose
        # entry changed restart, so requests in flight to the others are not dropped.
        await supervisor.apply(new, changed=set(changed))
        self.metrics.peer_reloads.labels("success").inc()
        self.metrics.config_last_reload_successful.set(1)
        node.reload_status.result, node.reload_status.at, node.reload_status.error = (
            "success",
            now,
            None,
        )
        node.mark_state_dirty()
        if new.allow_insecure_peers:
            log.warning(INSECURE_WARNING)
        log.info("reload applied: added %s, removed %s, changed %s", added, removed, changed)
        await trio.to_thread.run_sync(
            lambda: audit.append(
                "peer_reload",
                {"result": "success", "added": added, "removed": removed, "changed": changed},
                durable=True,
            )
        )
        systemd.notify("READY=1")


def settle_heap() -> None:
    """Once start-up is done: collect, then freeze what it built (modules, config, keys,
    the restored rounds) so later collections never walk it, and collect the youngest
    generation every GC_YOUNG_THRESHOLD net allocations instead of 700. A round allocates
    thousands of short-lived objects; with the default, a generation-1 collection (about
    1 ms) landed on some rounds' critical path. Six A/B pairs of the 3-node round
    (mTLS, polled): p99 12.0–15.5 → 10.7–13.4 ms, lower in every pair; p50 unchanged."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(GC_YOUNG_THRESHOLD, *gc.get_threshold()[1:])


def _client_tls(config: ClusterConfig) -> ssl.SSLContext | None:
    return client_context(config.tls) if config.tls.enabled else None


def run_daemon(settings: Settings) -> None:
    """Run until SIGTERM; exceptions carry their exit codes up to the CLI."""
    failpoints.load_from_env(os.environ.get("ANNA_FAILPOINTS"))
    trio.run(Daemon(settings).run)
