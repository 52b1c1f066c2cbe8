"""The RPC app (SPEC §7) and the metrics app, both quart-trio on hypercorn's trio worker.

Every failure path answers JSON `{"success": false, "error", "message"}`; client input
never produces a 500. Limits are checked before any work: body size, per-client rate
(validators exempt), concurrency; each handler runs under the server-side timeout.
"""

from __future__ import annotations

import json
import logging
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from typing import Any

import trio
from quart import Response, request
from quart_trio import QuartTrio
from werkzeug.exceptions import HTTPException

from .. import failpoints
from .._exceptions import ConfigError
from ..metrics import Metrics
from ..models import ROUND_ID_RE, Limits
from ..node import Node, Reply, error_reply
from .ratelimit import TokenBuckets, retry_after_header

log = logging.getLogger("anna.rpc")

MAX_IN_FLIGHT = 512
IDEMPOTENCY_CACHE = 10_000
ERROR_CODES = {
    400: "bad_request",
    404: "not_found",
    405: "method_not_allowed",
    413: "payload_too_large",
    415: "unsupported_media_type",
    429: "rate_limited",
    503: "unavailable",
}


def _json(reply: Reply, headers: dict[str, str] | None = None) -> Response:
    return Response(
        json.dumps(reply.body, separators=(",", ":")),
        status=reply.status,
        content_type="application/json",
        # A 413 goes out before the body is read, so the connection cannot be reused.
        headers={**(headers or {}), **({"Connection": "close"} if reply.status == 413 else {})},
    )


class RpcServer:
    """Parsing, limits and idempotency in front of the Node."""

    def __init__(
        self,
        node: Node,
        metrics: Metrics,
        *,
        reconcile: Callable[[], Awaitable[int]],
    ) -> None:
        self.node = node
        self.metrics = metrics
        self._reconcile = reconcile
        self.limits = Limits()
        self.exempt_addresses: frozenset[str] = frozenset()
        self._buckets = TokenBuckets(self.limits.rate_per_client, self.limits.burst)
        self._in_flight = trio.CapacityLimiter(MAX_IN_FLIGHT)
        self._round_answers: OrderedDict[str, Reply] = OrderedDict()
        self.app = self._build()

    def set_limits(self, limits: Limits, exempt_addresses: frozenset[str]) -> None:
        self.limits = limits
        self.exempt_addresses = exempt_addresses
        self.app.config["MAX_CONTENT_LENGTH"] = limits.max_body_bytes
        if (limits.rate_per_client, limits.burst) != (self._buckets.rate, self._buckets.burst):
            self._buckets = TokenBuckets(limits.rate_per_client, limits.burst)

    def _build(self) -> QuartTrio:
        app = QuartTrio("anna_trio.rpc")
        app.config["MAX_CONTENT_LENGTH"] = self.limits.max_body_bytes
        app.config["BODY_TIMEOUT"] = 10

        @app.errorhandler(HTTPException)
        async def http_error(exc: HTTPException) -> Response:
            status = exc.code or 500
            return _json(
                error_reply(
                    status, ERROR_CODES.get(status, "http_error"), exc.description or exc.name
                )
            )

        @app.before_request
        async def limits() -> Response | None:
            client = request.remote_addr or "unknown"
            length = request.content_length
            if length is not None and length > self.limits.max_body_bytes:
                return _json(
                    error_reply(
                        413, "payload_too_large", f"body over {self.limits.max_body_bytes} bytes"
                    )
                )
            if client not in self.exempt_addresses:
                wait = self._buckets.allow(client, trio.current_time())
                if wait > 0:
                    self.metrics.rate_limited.inc()
                    return _json(
                        error_reply(429, "rate_limited", "rate limit exceeded"),
                        {"Retry-After": retry_after_header(wait)},
                    )
            return None

        app.add_url_rule("/health", "health", self._health, methods=["GET"])
        app.add_url_rule("/rpc/submit", "submit", self._submit, methods=["POST"])
        app.add_url_rule("/rpc/round/start", "round_start", self._round_start, methods=["POST"])
        app.add_url_rule("/rpc/status", "status", self._status, methods=["GET"])
        app.add_url_rule("/rpc/reconcile", "reconcile", self._reconcile_route, methods=["POST"])
        app.add_url_rule("/rpc/gossip", "gossip", self._gossip, methods=["POST"])
        app.add_url_rule("/rpc/sync", "sync", self._sync, methods=["POST"])
        return app

    async def _guarded(self, work: Callable[[], Awaitable[Reply]]) -> Response:
        """Concurrency cap (503 when saturated) and the server-side timeout (503)."""
        try:
            self._in_flight.acquire_nowait()
        except trio.WouldBlock:
            return _json(error_reply(503, "overloaded", "server overloaded, retry later"))
        try:
            with trio.move_on_after(self.limits.request_timeout):
                reply = await work()
                await failpoints.hit_async("rpc.before_reply")
                return _json(reply)
            return _json(error_reply(503, "timeout", "request timed out on the server"))
        finally:
            self._in_flight.release()

    @staticmethod
    async def _body() -> Any:
        """Decoded JSON body, or a Reply for malformed JSON (400)."""
        raw = await request.get_data()
        try:
            return json.loads(raw)
        except (ValueError, UnicodeDecodeError) as exc:
            return error_reply(400, "malformed_json", f"body is not valid JSON: {exc}")

    async def _health(self) -> Response:
        return _json(Reply(200, self.node.health()))

    async def _submit(self) -> Response:
        async def work() -> Reply:
            payload = await self._body()
            if isinstance(payload, Reply):
                return payload
            key = request.headers.get("Idempotency-Key")
            if key is not None and not 1 <= len(key) <= 255:
                return error_reply(
                    400, "bad_idempotency_key", "Idempotency-Key must be 1-255 chars"
                )
            return await self.node.submit(payload, key)

        return await self._guarded(work)

    async def _round_start(self) -> Response:
        async def work() -> Reply:
            key = request.headers.get("Idempotency-Key")
            if key is not None and key in self._round_answers:
                return self._round_answers[key]
            payload = await self._body()
            if isinstance(payload, Reply):
                return payload
            reply = await self._start(payload)
            if key is not None and reply.status < 500:
                self._round_answers[key] = reply
                while len(self._round_answers) > IDEMPOTENCY_CACHE:
                    self._round_answers.popitem(last=False)
            return reply

        return await self._guarded(work)

    async def _start(self, payload: Any) -> Reply:
        if payload is None:
            payload = {}
        if not isinstance(payload, dict) or set(payload) - {"round_id", "window_hours"}:
            return error_reply(422, "invalid_request", "expected {round_id?, window_hours?}")
        round_id = payload.get("round_id")
        window = payload.get("window_hours", 24)
        if round_id is not None and (
            not isinstance(round_id, str) or not ROUND_ID_RE.match(round_id)
        ):
            return error_reply(
                422, "invalid_round_id", f"round_id must match {ROUND_ID_RE.pattern}"
            )
        if isinstance(window, bool) or not isinstance(window, int) or not 1 <= window <= 8760:
            return error_reply(422, "invalid_window", "window_hours must be an integer 1..8760")
        started = await self.node.start_round(round_id, window)
        return Reply(202, {"success": True, "round_id": started})

    async def _status(self) -> Response:
        round_id = request.args.get("round_id")
        if round_id is None:
            return _json(Reply(200, self.node.status()))
        detail = self.node.round_detail(round_id)
        if detail is None:
            return _json(error_reply(404, "unknown_round", f"round {round_id!r} is not known here"))
        return _json(Reply(200, detail))

    async def _reconcile_route(self) -> Response:
        async def work() -> Reply:
            before = {v.round_id: v.result.digest for v in self.node.engine.rounds()}
            await self._reconcile()
            changed = sum(
                1 for v in self.node.engine.rounds() if before.get(v.round_id) != v.result.digest
            )
            return Reply(
                200,
                {
                    "success": True,
                    "reconciled": changed,
                    "message": f"Reconciled {changed} pending rounds",
                },
            )

        return await self._guarded(work)

    async def _gossip(self) -> Response:
        async def work() -> Reply:
            payload = await self._body()
            return payload if isinstance(payload, Reply) else await self.node.ingest(payload)

        return await self._guarded(work)

    async def _sync(self) -> Response:
        async def work() -> Reply:
            payload = await self._body()
            return payload if isinstance(payload, Reply) else self.node.sync_answer(payload)

        return await self._guarded(work)


class ShieldedSends:
    """ASGI wrapper that shields the app's `send` calls from the app's own cancellation.

    quart-trio cancels its per-request nursery right after the last body is sent; that
    cancellation can land inside hypercorn's send while it re-arms the connection's
    keep-alive idle task, leaving an idle connection that only closes at the graceful
    shutdown deadline. Hypercorn already shields the socket write itself; this only
    lets its bookkeeping finish, so SIGTERM closes idle keep-alive connections at once.
    """

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        async def shielded_send(message: Any) -> None:
            with trio.CancelScope(shield=True):
                await send(message)

        await self.app(scope, receive, shielded_send)


def build_metrics_app(
    metrics: Metrics,
    node_health: Callable[[], dict[str, Any]],
    is_ready: Callable[[], bool],
    *,
    failpoints_http: bool,
) -> QuartTrio:
    """Plain-HTTP listener for Prometheus, health/readiness and (testnets) failpoints."""
    app = QuartTrio("anna_trio.metrics")

    @app.errorhandler(HTTPException)
    async def http_error(exc: HTTPException) -> Response:
        status = exc.code or 500
        return _json(
            error_reply(status, ERROR_CODES.get(status, "http_error"), exc.description or exc.name)
        )

    @app.get("/metrics")
    async def metrics_route() -> Response:
        return Response(metrics.render(), content_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/health")
    async def health() -> Response:
        return _json(Reply(200, node_health()))

    @app.get("/ready")
    async def ready() -> Response:
        if is_ready():
            return _json(Reply(200, {"ready": True}))
        return _json(error_reply(503, "not_ready", "starting up"))

    @app.route("/debug/failpoints/<name>", methods=["PUT", "DELETE"])
    async def failpoint(name: str) -> Response:
        if not failpoints_http:
            return _json(error_reply(404, "not_found", "failpoints over HTTP are disabled"))
        try:
            if request.method == "DELETE":
                failpoints.arm(name, "off")
            else:
                failpoints.arm(name, str(await request.get_data(as_text=True)))
        except ConfigError as exc:
            return _json(error_reply(400, "bad_failpoint", str(exc)))
        return _json(Reply(200, {"success": True, "armed": failpoints.armed()}))

    return app
