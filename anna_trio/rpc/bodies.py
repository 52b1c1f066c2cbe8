"""What the RPC routes for submitters and operators accept (SPEC §7), structured by the
strict converter: unknown keys and wrong types are a 422 naming each problem."""

from __future__ import annotations

from typing import Any

import attrs

from ..converter import between, matches, optional
from ..models import MAX_WINDOW_HOURS, ROUND_ID_RE
from ..transport.server import Response, error_response
from ..wire import MessageError


@attrs.frozen
class Submit:
    """POST /rpc/submit: `{"observation": {...}}`; the node judges the observation (and
    counts it: invalid, bad_signature, unknown_node …)."""

    observation: Any


@attrs.frozen
class RoundStart:
    """POST /rpc/round/start: both optional; no round_id means one of this node's."""

    round_id: str | None = attrs.field(default=None, validator=optional(matches(ROUND_ID_RE)))
    window_hours: int = attrs.field(default=24, validator=between(1, MAX_WINDOW_HOURS))


ROUND_START_CODES = {"round_id": "invalid_round_id", "window_hours": "invalid_window"}


def round_start_error(exc: MessageError) -> Response:
    """A refused round start, its error code naming the first field at fault."""
    code = next(
        (
            ROUND_START_CODES[p.path[0]]
            for p in exc.problems
            if p.path and p.path[0] in ROUND_START_CODES
        ),
        exc.code,
    )
    return error_response(exc.status, code, str(exc))
