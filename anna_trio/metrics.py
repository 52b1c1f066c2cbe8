"""The one metrics registry. Every metric name anna_trio exports is written here."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Protocol

import prometheus_client
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
    generate_latest,
)

from . import __version__

prometheus_client.disable_created_metrics()  # type: ignore[no-untyped-call]

PEER_STATUSES = ("success", "error", "timeout", "rejected")
OBSERVATION_RESULTS = (
    "accepted",
    "duplicate",
    "invalid",
    "bad_signature",
    "unknown_node",
    "conflict",
)
CONNECTION_DROP_REASONS = (
    "connection_limit",
    "address_limit",
    "handshake_limit",
    "send_timeout",
    "slow_request",
)
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class ConnectionCounts(Protocol):
    """What the RPC listener reports about its connections (transport.admission.Counts)."""

    @property
    def trusted(self) -> int: ...
    @property
    def others(self) -> int: ...
    @property
    def handshakes(self) -> int: ...


class Metrics:
    """All metrics of one node in their own registry (tests make as many as they like)."""

    def __init__(self, node_id: str = "") -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        reg = self.registry
        ProcessCollector(registry=reg)
        self.consensus_rounds = Counter(
            "anna_consensus_rounds", "Rounds that reached Complete on this node", registry=reg
        )
        self.byzantine_nodes = Gauge(
            "anna_byzantine_nodes_total", "Nodes currently marked Byzantine", registry=reg
        )
        self.quorum_size = Gauge("anna_quorum_size", "Quorum for new rounds", registry=reg)
        self.average_tis = Gauge(
            "anna_average_tis",
            "Mean consensus TIS over the last 100 completed rounds",
            registry=reg,
        )
        self.peer_requests = Counter(
            "anna_peer_request",
            "Outbound requests by peer and status",
            ["peer", "status"],
            registry=reg,
        )
        self.peer_reloads = Counter(
            "anna_peer_reload", "peers.yml reloads by result", ["result"], registry=reg
        )
        self.migration_events = Counter(
            "anna_migration_events", "State migrations by result", ["result"], registry=reg
        )
        for result in ("success", "failure"):
            self.peer_reloads.labels(result)
        for result in ("success", "rollback", "failure"):
            self.migration_events.labels(result)
        self.validator_count = Gauge(
            "anna_validator_count", "Validators in the current config", registry=reg
        )
        self.peer_up = Gauge(
            "anna_peer_up", "1 when the peer answered last", ["peer"], registry=reg
        )
        self.peer_request_duration = Histogram(
            "anna_peer_request_duration_seconds",
            "Outbound request latency by peer",
            ["peer"],
            buckets=LATENCY_BUCKETS,
            registry=reg,
        )
        self.round_duration = Histogram(
            "anna_round_duration_seconds",
            "Round start (on this node) to Complete",
            buckets=LATENCY_BUCKETS,
            registry=reg,
        )
        self.rounds_failed = Counter(
            "anna_rounds_failed", "Rounds that ended Failed on this node", registry=reg
        )
        self.observations_received = Counter(
            "anna_observations_received",
            "Observations received by result",
            ["result"],
            registry=reg,
        )
        for result in OBSERVATION_RESULTS:
            self.observations_received.labels(result)
        self.rate_limited = Counter("anna_rate_limited", "Requests refused with 429", registry=reg)
        self.rounds_refused = Counter(
            "anna_rounds_refused",
            "Round starts answered 503: this node could not finish more rounds in time",
            registry=reg,
        )
        self.config_last_reload_successful = Gauge(
            "anna_config_last_reload_successful",
            "1 when the last peers.yml reload succeeded",
            registry=reg,
        )
        self.config_last_reload_successful.set(1)
        self.tls_handshake_failures = Counter(
            "anna_tls_handshake_failures",
            "TLS handshakes that failed, by side and reason",
            ["side", "reason"],
            registry=reg,
        )
        self.http_errors = Counter(
            "anna_http_errors",
            "Requests refused as malformed (400) or too large (413), and failures of ours "
            "(500 or a connection closed by an error), by listener",
            ["listener", "kind"],
            registry=reg,
        )
        for listener in ("rpc", "metrics"):
            for kind in ("malformed", "too_large", "internal"):
                self.http_errors.labels(listener, kind)
        self.listener_connections = Gauge(
            "anna_listener_connections", "Open connections, by listener", ["listener"], registry=reg
        )
        self.listener_dropped = Counter(
            "anna_listener_dropped_connections",
            "Connections a listener refused or ended for a limit: over the per-client cap, "
            "or a client that stopped reading its answers",
            ["listener", "reason"],
            registry=reg,
        )
        self.listener_connections.labels("metrics")
        for reason in ("per_client_cap", "send_timeout"):
            self.listener_dropped.labels("metrics", reason)
        self.rpc_connections = Gauge(
            "anna_rpc_connections",
            "Open connections on the RPC listener, validators' and others'",
            ["peer_class"],
            registry=reg,
        )
        self.rpc_tls_handshakes = Gauge(
            "anna_rpc_tls_handshakes_in_progress",
            "TLS handshakes under way on the RPC listener",
            registry=reg,
        )
        self.rpc_connections_dropped = Counter(
            "anna_rpc_connections_dropped",
            "RPC connections closed by a bound: refused at a connection, address or "
            "handshake limit, an answer not read in time, a request head or body too slow",
            ["reason"],
            registry=reg,
        )
        for reason in CONNECTION_DROP_REASONS:
            self.rpc_connections_dropped.labels(reason)
        self.observer_failures = Counter(
            "anna_observer_failures",
            "Rounds this node could not contribute to (observer missing or invalid)",
            registry=reg,
        )
        self.build_info = Gauge(
            "anna_build_info", "Build information", ["version", "node_id"], registry=reg
        )
        self.build_info.labels(__version__, node_id).set(1)

    def forget_peer(self, peer: str) -> None:
        """Drop a removed peer's labelled series so dashboards stop showing it."""
        for status in PEER_STATUSES:
            with contextlib.suppress(KeyError):
                self.peer_requests.remove(peer, status)
        for family in (self.peer_up, self.peer_request_duration):
            with contextlib.suppress(KeyError):
                family.remove(peer)

    def watch_rpc_connections(self, counts: Callable[[], ConnectionCounts]) -> None:
        """Read the RPC listener's connection counts at each scrape."""
        self.rpc_connections.labels("validator").set_function(lambda: counts().trusted)
        self.rpc_connections.labels("other").set_function(lambda: counts().others)
        self.rpc_tls_handshakes.set_function(lambda: counts().handshakes)

    def render(self) -> bytes:
        return generate_latest(self.registry)
