"""The RPC routes (SPEC §7) on the lean HTTP server (transport/server.py).

Every failure path answers JSON `{"success": false, "error", "message"}`; client input
never produces a 500. Limits are checked before any work: body size (by the server,
before reading the body), per-client rate (validators exempt), who may call
(node-to-node endpoints answer validators only), concurrency; each handler runs under
the server-side timeout. HEAD is answered wherever GET is.
"""

from __future__ import annotations

import json
import logging
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from typing import Any

import trio

from .. import failpoints
from ..consensus.engine import RoundView
from ..metrics import Metrics
from ..models import Limits
from ..node import Node, Rejected, SubmitOutcome
from ..policy import outsider_may_name
from ..store import Statement
from ..transport.server import Request, Response, error_response, json_response
from ..wire import (
    MessageError,
    gossip_answer_json,
    parse_batch,
    parse_sync_request,
    structure_body,
    sync_answer_json,
)
from .bodies import RoundStart, Submit, round_start_error
from .idempotency import IdempotencyKeys, Keep
from .ratelimit import TokenBuckets, retry_after_header
from .views import (
    PeerStates,
    health_json,
    rejection_response,
    round_json,
    started_response,
    status_json,
    submit_response,
)

log = logging.getLogger("anna.rpc")

MAX_IN_FLIGHT = 512
ROUND_ANSWER_CACHE = 64  # rounds whose status answer is kept encoded (the ones being polled)

Route = Callable[[Request], Awaitable[Response]]


def _dispatch(routes: dict[str, dict[str, Route]], request: Request) -> Route | Response:
    """The route for the request's path and method (HEAD takes GET's: the server drops
    the body), or the 404 or 405 (with its Allow header) to answer instead."""
    methods = routes.get(request.path)
    if methods is None:
        return error_response(404, "not_found", f"no such endpoint: {request.path}")
    method = "GET" if request.method == "HEAD" else request.method
    route = methods.get(method)
    if route is None:
        allowed = ", ".join(sorted({*methods, *(("HEAD",) if "GET" in methods else ())}))
        return error_response(
            405,
            "method_not_allowed",
            f"{request.path} accepts {allowed}",
            (("allow", allowed),),
        )
    return route


def _decode_json(request: Request) -> Any:
    """Decoded JSON body, or the Response for malformed JSON (400)."""
    try:
        return json.loads(request.body)
    except (ValueError, UnicodeDecodeError) as exc:
        return error_response(400, "malformed_json", f"body is not valid JSON: {exc}")
    except RecursionError:  # ~1000 nested arrays or objects fit easily in 64 KiB
        return error_response(400, "malformed_json", "body is nested too deeply")


def _refusal(exc: MessageError) -> Response:
    return error_response(exc.status, exc.code, str(exc))


# Node-to-node endpoints: validators only (SPEC §7). Everything else on the port is for
# submitters and operators too.
VALIDATORS_ONLY = frozenset({"/rpc/gossip", "/rpc/sync"})


class RpcServer:
    """Parsing, limits and idempotency in front of the Node; also the transport's
    `Trust`: who counts as a validator for the connection limits."""

    def __init__(
        self,
        node: Node,
        metrics: Metrics,
        *,
        reconcile: Callable[[], Awaitable[int]],
        peer_states: PeerStates = list,
    ) -> None:
        self.node = node
        self.metrics = metrics
        self._reconcile = reconcile
        self._peer_states = peer_states
        self.limits = Limits()
        self.exempt_addresses: frozenset[str] = frozenset()
        self._buckets = TokenBuckets(self.limits.rate_per_client, self.limits.burst)
        self._in_flight = trio.CapacityLimiter(MAX_IN_FLIGHT)
        self._keys = IdempotencyKeys(node.store, node.clock, self.limits)
        self._round_answers: OrderedDict[str, tuple[RoundView, Response]] = OrderedDict()
        self._reconciling: trio.Event | None = None
        self._routes: dict[str, dict[str, Route]] = {
            "/health": {"GET": self._health},
            "/rpc/submit": {"POST": self._submit},
            "/rpc/round/start": {"POST": self._round_start},
            "/rpc/status": {"GET": self._status},
            "/rpc/reconcile": {"POST": self._reconcile_route},
            "/rpc/gossip": {"POST": self._gossip},
            "/rpc/sync": {"POST": self._sync},
        }

    def set_limits(self, limits: Limits, exempt_addresses: frozenset[str]) -> None:
        self.limits = self._keys.limits = limits
        self.exempt_addresses = exempt_addresses
        if (limits.rate_per_client, limits.burst) != (self._buckets.rate, self._buckets.burst):
            self._buckets = TokenBuckets(limits.rate_per_client, limits.burst)

    def trusted_address(self, address: str) -> bool:
        """Whether `address` is a validator's (resolved from peers.yml)."""
        return address in self.exempt_addresses

    def trusted_name(self, name: str) -> bool:
        """Whether a verified client certificate's CN is a validator's node id."""
        return name in self.node.config.validator_ids

    def is_validator(self, request: Request) -> bool:
        """With TLS, the client certificate names a validator; without, the source
        address is a validator's."""
        if self.node.config.tls.enabled:
            return request.peer_name is not None and self.trusted_name(request.peer_name)
        return self.trusted_address(request.client)

    async def handle(self, request: Request) -> Response:
        """The HTTP server's handler: rate limit, route, validators-only, answer."""
        if request.client not in self.exempt_addresses:
            wait = self._buckets.allow(request.client, trio.current_time())
            if wait > 0:
                self.metrics.rate_limited.inc()
                return error_response(
                    429,
                    "rate_limited",
                    "rate limit exceeded",
                    (("retry-after", retry_after_header(wait)),),
                )
        route = _dispatch(self._routes, request)
        if isinstance(route, Response):
            return route
        if request.path in VALIDATORS_ONLY and not self.is_validator(request):
            return error_response(
                403, "forbidden", f"{request.path} is a node-to-node endpoint: validators only"
            )
        return await route(request)

    async def _guarded(self, work: Callable[[], Awaitable[Response]]) -> Response:
        """Concurrency cap (503 when saturated) and the server-side timeout (503)."""
        try:
            self._in_flight.acquire_nowait()
        except trio.WouldBlock:
            return error_response(503, "overloaded", "server overloaded, retry later")
        try:
            with trio.move_on_after(self.limits.request_timeout):
                response = await work()
                await failpoints.hit_async("rpc.before_reply")
                return response
            return error_response(503, "timeout", "request timed out on the server")
        finally:
            self._in_flight.release()

    async def _health(self, request: Request) -> Response:
        return json_response(200, health_json(self.node.node_id))

    async def _submit(self, request: Request) -> Response:
        async def work(keep: Keep | None) -> Response:
            payload = _decode_json(request)
            if isinstance(payload, Response):
                return payload
            try:
                body = structure_body(payload, Submit)
            except MessageError as exc:
                self.metrics.observations_received.labels("invalid").inc()
                return _refusal(exc)

            def kept(outcome: SubmitOutcome) -> list[Statement]:
                return [] if keep is None else keep(submit_response(outcome))

            try:
                outcome = await self.node.submit(body.observation, keep_with=kept)
            except Rejected as rejected:
                return rejection_response(rejected.kind, str(rejected))
            return submit_response(outcome)

        return await self._guarded(lambda: self._keys.answer_once("submit", request, work))

    async def _round_start(self, request: Request) -> Response:
        async def work(keep: Keep | None) -> Response:
            payload = _decode_json(request) if request.body else {}
            if isinstance(payload, Response):
                return payload
            try:
                start = structure_body({} if payload is None else payload, RoundStart)
            except MessageError as exc:
                return round_start_error(exc)
            return await self._start(start, keep, validator=self.is_validator(request))

        return await self._guarded(lambda: self._keys.answer_once("round_start", request, work))

    async def _start(self, start: RoundStart, keep: Keep | None, *, validator: bool) -> Response:
        round_id = start.round_id
        known = round_id is not None and self.node.engine.status_of(round_id) is not None
        if (
            round_id is not None
            and not known
            and not validator
            and not outsider_may_name(round_id, self.node.clock.wall())
        ):
            return error_response(
                403,
                "round_id_after_now",
                f"round {round_id!r} sorts after a fresh round id: only validators may name "
                "such a round; start it without round_id to get a fresh one",
            )
        if not known:
            wait = self.node.admission(self.limits.pending_rounds)
            if wait is not None:
                self.metrics.rounds_refused.inc()
                return error_response(
                    503,
                    "overloaded",
                    "this node cannot finish more rounds in time; retry later",
                    (("retry-after", retry_after_header(wait)),),
                )

        def kept(started: str | None) -> list[Statement]:
            return [] if keep is None or started is None else keep(started_response(started))

        started = await self.node.start_round(round_id, start.window_hours, keep_with=kept)
        if started is None:
            return error_response(
                409, "round_too_old", f"round {round_id!r} sorts before every round this node keeps"
            )
        return started_response(started)

    async def _status(self, request: Request) -> Response:
        round_ids = request.query.get("round_id")
        if round_ids is None:
            return json_response(200, status_json(self.node, self._peer_states))
        if len(round_ids) != 1:
            return error_response(400, "bad_request", "give round_id once")
        view = self.node.engine.round(round_ids[0])
        if view is None:
            return error_response(404, "unknown_round", f"round {round_ids[0]!r} is not known here")
        return self._round_answer(view)

    def _round_answer(self, view: RoundView) -> Response:
        """The round as JSON, encoded again only when the round changed: completion
        probes ask every millisecond, and comparing two views takes a few µs where
        building and encoding the answer took ~40."""
        cached = self._round_answers.get(view.round_id)
        if cached is not None and cached[0] == view:
            return cached[1]
        answer = json_response(200, round_json(view))
        self._round_answers[view.round_id] = (view, answer)
        self._round_answers.move_to_end(view.round_id)
        while len(self._round_answers) > ROUND_ANSWER_CACHE:
            self._round_answers.popitem(last=False)
        return answer

    async def _reconcile_route(self, request: Request) -> Response:
        async def work() -> Response:
            before = {v.round_id: v.result.digest for v in self.node.engine.rounds()}
            await self._reconcile_once()
            changed = sum(
                1 for v in self.node.engine.rounds() if before.get(v.round_id) != v.result.digest
            )
            return json_response(
                200,
                {
                    "success": True,
                    "reconciled": changed,
                    "message": f"Reconciled {changed} pending rounds",
                },
            )

        return await self._guarded(work)

    async def _reconcile_once(self) -> None:
        """One anti-entropy pass with every peer at a time: a reconcile asked for while
        one runs waits for that one, so no client can turn its requests into a new
        connection to every peer each."""
        if self._reconciling is not None:
            await self._reconciling.wait()
            return
        self._reconciling = done = trio.Event()
        try:
            await self._reconcile()
        finally:
            self._reconciling = None
            done.set()

    async def _gossip(self, request: Request) -> Response:
        async def work() -> Response:
            payload = _decode_json(request)
            if isinstance(payload, Response):
                return payload
            try:
                batch = parse_batch(payload)
            except MessageError as exc:
                return _refusal(exc)
            counts, own = await self.node.gossip(batch)
            return json_response(200, gossip_answer_json(counts, own))

        return await self._guarded(work)

    async def _sync(self, request: Request) -> Response:
        async def work() -> Response:
            payload = _decode_json(request)
            if isinstance(payload, Response):
                return payload
            try:
                sync_request = parse_sync_request(payload)
            except MessageError as exc:
                return _refusal(exc)
            return json_response(200, sync_answer_json(self.node.sync_answer(sync_request)))

        return await self._guarded(work)
