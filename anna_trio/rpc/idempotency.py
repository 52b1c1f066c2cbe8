"""Idempotency-Key on POST /rpc/submit and /rpc/round/start (SPEC §7).

The convention of the IETF draft (draft-ietf-httpapi-idempotency-key-header) and of
Stripe's API:

- a repeated key gets the first answer, byte for byte, even after kill -9 or a power
  cut: the answer is committed in the same transaction as the request's effects;
- only requests that were executed keep their answer: a refusal before execution (a
  malformed body, a schema or signature error, 409 round_too_old) keeps nothing, so the
  key can be retried with a fixed body;
- the same key with a different body is 422 ``idempotency_key_reused``;
- a repeat that arrives while the first is still being answered waits for it instead
  of doing the work twice (two round starts without a round_id would open two rounds);
- keys expire after ``limits.idempotency_ttl`` seconds, and at most
  ``limits.idempotency_keys`` are kept (the oldest go first).

Keys are per route.
"""

from __future__ import annotations

import hashlib
from collections.abc import Awaitable, Callable

import trio

from ..models import Limits
from ..seams import Clock
from ..store import Statement, Store, StoredAnswer
from ..transport.server import Request, Response, error_response

MAX_KEY_LENGTH = 255
EXPIRE_EVERY = 256  # answers kept between two expiry passes


Keep = Callable[[Response], list[Statement]]
"""Turns the answer of an executed request into the rows kept with its effects."""
Work = Callable[[Keep | None], Awaitable[Response]]


class IdempotencyKeys:
    def __init__(self, store: Store, clock: Clock, limits: Limits) -> None:
        self._store = store
        self._clock = clock
        self.limits = limits
        self._in_flight: dict[str, trio.Event] = {}
        self._kept = store.idempotency_keys()  # about how many rows the table holds
        self._since_expiry = 0

    async def answer_once(self, route: str, request: Request, work: Work) -> Response:
        key = request.headers.get("idempotency-key")
        if key is None:
            return await work(None)
        if not 1 <= len(key) <= MAX_KEY_LENGTH:
            return error_response(
                400, "bad_idempotency_key", f"Idempotency-Key must be 1-{MAX_KEY_LENGTH} chars"
            )
        name = f"{route}:{key}"
        fingerprint = hashlib.sha256(request.body).hexdigest()
        while (running := self._in_flight.get(name)) is not None:
            await running.wait()
        stored = self._stored(name)
        if stored is not None:
            if stored.fingerprint != fingerprint:
                return error_response(
                    422,
                    "idempotency_key_reused",
                    "this Idempotency-Key was used with a different body",
                )
            return Response(stored.status, stored.body)
        self._in_flight[name] = done = trio.Event()
        try:
            return await work(lambda answer: self._rows(name, fingerprint, answer))
        finally:
            del self._in_flight[name]
            done.set()

    def _stored(self, name: str) -> StoredAnswer | None:
        stored = self._store.idempotent_answer(name)
        if stored is None or stored.created_at < self._clock.wall() - self.limits.idempotency_ttl:
            return None  # expired: the key is free again
        return stored

    def _rows(self, name: str, fingerprint: str, answer: Response) -> list[Statement]:
        now = self._clock.wall()
        rows = [
            Store.idempotency_stmt(name, StoredAnswer(answer.status, answer.body, fingerprint, now))
        ]
        self._kept += 1
        self._since_expiry += 1
        if self._since_expiry >= EXPIRE_EVERY or self._kept > self.limits.idempotency_keys:
            rows += Store.idempotency_expiry_stmts(
                now - self.limits.idempotency_ttl, self.limits.idempotency_keys
            )
            self._kept = min(self._kept, self.limits.idempotency_keys)
            self._since_expiry = 0
        return rows
