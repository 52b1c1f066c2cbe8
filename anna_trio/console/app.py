"""The metrics listener's app (quart-trio): Prometheus, probes, failpoints, the console.

`/metrics`, `/health`, `/ready` and `/debug/failpoints/NAME` keep the contract they had
on the lean server (SPEC §7, same bodies and codes). Every error is the SPEC's JSON
`{"success": false, "error", "message"}`, or an HTML page for a client that prefers
HTML (a browser). The console (`/`, `/rounds/<id>`, `/byzantine/<node>`) is read-only
status rendered on the server; `console=False` leaves only the machine endpoints.

Bounds of the app's own: a head of at most MAX_HEAD_BYTES (431), a body of at most
MAX_BODY_BYTES (413), BODY_TIMEOUT to receive it (408) and RESPONSE_TIMEOUT to answer. A
request target that is neither a path nor a parseable absolute URL is a 400 (quart
would fail on it with a 500), and any other exception is logged with its traceback,
counted and answered 500: no request reaches the daemon's root nursery.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Coroutine, Mapping
from datetime import UTC, datetime
from importlib import resources
from typing import Any
from urllib.parse import urlsplit

import attrs
import trio
from hypercorn.typing import (
    ASGIReceiveCallable,
    ASGISendCallable,
    ASGISendEvent,
    HTTPResponseBodyEvent,
    HTTPResponseStartEvent,
    Scope,
)
from quart import Response, current_app, render_template, request
from quart_trio import QuartTrio
from werkzeug.exceptions import HTTPException, MethodNotAllowed, NotFound

from .. import __version__, failpoints
from .._exceptions import ConfigError
from ..metrics import Metrics
from ..models import Observation, is_round_id
from .auditcheck import AuditChainCheck
from .charts import consensus_chart, validators_chart
from .source import ConsoleSource
from .stats import peer_request_stats

log = logging.getLogger("anna.console")

MAX_BODY_BYTES = 16 * 1024
MAX_HEAD_BYTES = 16 * 1024  # as on the RPC port
BODY_TIMEOUT = 10
RESPONSE_TIMEOUT = 10
CHART_ROUNDS = 100
TABLE_ROUNDS = 25
FAILPOINT_PREFIX = "/debug/failpoints/"
METRICS_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
# Nothing is fetched from elsewhere, nothing runs that is not ours, nothing frames us.
CONSOLE_HEADERS = {
    "content-security-policy": (
        "default-src 'none'; style-src 'self'; script-src 'self'; img-src 'self'; "
        "base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    ),
    "x-frame-options": "DENY",
    "referrer-policy": "no-referrer",
    "cache-control": "no-store",
}
# What `count_error` is told: anna_http_errors_total{listener="metrics", kind}.
MALFORMED, TOO_LARGE, INTERNAL = "malformed", "too_large", "internal"

ASGIApp = Callable[[Scope, ASGIReceiveCallable, ASGISendCallable], Coroutine[Any, Any, None]]


def _error_code(exc: HTTPException) -> str:
    return {413: "payload_too_large", 405: "method_not_allowed"}.get(
        exc.code or 500, (exc.name or "error").lower().replace(" ", "_")
    )


def _wants_html() -> bool:
    return request.accept_mimetypes.best_match(["application/json", "text/html"]) == "text/html"


def _json(status: int, body: Mapping[str, Any]) -> Response:
    """Compact JSON in the order given, as the lean server wrote it."""
    return Response(
        json.dumps(body, separators=(",", ":")), status, content_type="application/json"
    )


async def _json_error(status: int, code: str, message: str) -> Response:
    return _json(status, {"success": False, "error": code, "message": message})


async def _error(status: int, code: str, message: str) -> Response:
    """The SPEC's JSON error, or the same as a page for a browser (console on)."""
    if not current_app.config["ANNA_CONSOLE"] or not _wants_html():
        return await _json_error(status, code, message)
    page = await render_template("error.html", status=status, code=code, message=message)
    return Response(page, status, content_type="text/html; charset=utf-8")


async def _refuse(send: ASGISendCallable, status: int, code: str, message: str) -> None:
    """Answer a SPEC JSON error straight from the ASGI layer and close the connection."""
    body = json.dumps(
        {"success": False, "error": code, "message": message}, separators=(",", ":")
    ).encode()
    start: HTTPResponseStartEvent = {
        "type": "http.response.start",
        "status": status,
        "headers": [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
            (b"connection", b"close"),
        ],
    }
    await send(start)
    end: HTTPResponseBodyEvent = {"type": "http.response.body", "body": body, "more_body": False}
    await send(end)


def guard_requests(app: ASGIApp, count_error: Callable[[str], None]) -> ASGIApp:
    """ASGI middleware for what quart and hypercorn would get wrong together:

    - a request target quart cannot parse (`GET http://[::1`, a 500 inside quart) is a
      400, and a head over MAX_HEAD_BYTES is a 431 however it arrived (hypercorn bounds
      only a head still incomplete, so one sent in a single read could be 64 KiB);
    - the app's sends are shielded: hypercorn ends a `Connection: close` exchange from
      inside the last send, and quart-trio, told of the disconnect that this sends it,
      cancels the request's tasks, the send among them, before the socket is closed
      (pgjones/hypercorn#106): the connection then stayed open until the read timeout.
      A send waits at most for the front door's send timeout (listener.py).
    """

    async def guarded(scope: Scope, receive: ASGIReceiveCallable, send: ASGISendCallable) -> None:
        if scope["type"] == "http":
            head = len(scope["raw_path"]) + len(scope["query_string"])
            head += sum(len(name) + len(value) + 4 for name, value in scope["headers"])
            if head > MAX_HEAD_BYTES:
                count_error(TOO_LARGE)
                message = f"request head over {MAX_HEAD_BYTES} bytes"
                await _refuse(send, 431, "header_too_large", message)
                return
            if not scope["path"].startswith("/"):
                try:
                    urlsplit(scope["path"])
                except ValueError as exc:
                    count_error(MALFORMED)
                    await _refuse(send, 400, "bad_request", f"malformed request target: {exc}")
                    return

        async def shielded(message: ASGISendEvent) -> None:
            with trio.CancelScope(shield=True):
                await send(message)

        await app(scope, receive, shielded)

    return guarded


def make_app(
    source: ConsoleSource,
    metrics: Metrics,
    *,
    health: Callable[[], Mapping[str, Any]],
    is_ready: Callable[[], bool],
    failpoints_http: bool,
    console: bool,
    count_error: Callable[[str], None] = lambda kind: None,
) -> QuartTrio:
    """The app for one node. `count_error` is told of malformed requests, bodies over the
    limit and failures of ours (anna_http_errors_total{listener="metrics"})."""
    package = resources.files(__package__)
    app = QuartTrio(
        __name__,
        template_folder=str(package / "templates"),
        static_folder=str(package / "static") if console else None,
        static_url_path="/static",
    )
    app.config.update(
        MAX_CONTENT_LENGTH=MAX_BODY_BYTES,
        BODY_TIMEOUT=BODY_TIMEOUT,
        RESPONSE_TIMEOUT=RESPONSE_TIMEOUT,
        SEND_FILE_MAX_AGE_DEFAULT=300,
        ANNA_CONSOLE=console,
    )
    app.url_map.merge_slashes = False  # `//health` is not /health (no redirects here)
    app.asgi_app = guard_requests(app.asgi_app, count_error)  # type: ignore[method-assign,assignment]
    audit = AuditChainCheck(source.audit_log)

    @app.errorhandler(HTTPException)
    async def http_error(exc: HTTPException) -> Response:
        status = exc.code or 500
        if status == 413:
            count_error(TOO_LARGE)
        message, allowed = exc.description or exc.name, None
        if isinstance(exc, NotFound):
            message = f"no such endpoint: {request.path}"
        if isinstance(exc, MethodNotAllowed) and exc.valid_methods:
            allowed = ", ".join(sorted(exc.valid_methods))
            message = f"{request.path} accepts {allowed}"
        response = await _error(status, _error_code(exc), message)
        if allowed is not None:
            response.headers["allow"] = allowed
        return response

    @app.errorhandler(Exception)
    async def internal_error(exc: Exception) -> Response:
        log.error("unhandled error answering %s %s", request.method, request.path, exc_info=exc)
        count_error(INTERNAL)
        return await _error(500, "internal_error", "internal server error")

    @app.before_request
    async def failpoint_paths() -> Response | None:
        """`/debug/failpoints/NAME` answers every method itself, as it always did."""
        if not request.path.startswith(FAILPOINT_PREFIX):
            return None
        if not failpoints_http:
            return await _json_error(404, "not_found", "failpoints over HTTP are disabled")
        if request.method not in ("PUT", "DELETE"):
            response = await _json_error(
                405, "method_not_allowed", "failpoints accept PUT and DELETE"
            )
            response.headers["allow"] = "DELETE, PUT"
            return response
        name = request.path.removeprefix(FAILPOINT_PREFIX)
        try:
            if request.method == "DELETE":
                failpoints.arm(name, "off")
            else:
                body = await request.get_data(cache=False, as_text=False, parse_form_data=False)
                failpoints.arm(name, body.decode("utf-8", errors="replace"))
        except ConfigError as exc:
            return await _json_error(400, "bad_failpoint", str(exc))
        return _json(200, {"success": True, "armed": failpoints.armed()})

    @app.get("/metrics")
    async def metrics_page() -> Response:
        return Response(metrics.render(), 200, content_type=METRICS_CONTENT_TYPE)

    @app.get("/health")
    async def health_page() -> Response:
        return _json(200, health())

    @app.get("/ready")
    async def ready_page() -> Response:
        if is_ready():
            return _json(200, {"ready": True})
        return await _json_error(503, "not_ready", "starting up")

    if console:
        _add_console(app, source, metrics, audit)
    return app


def _ago(text: str | None, now: float) -> str:
    """`12 s ago` for an RFC 3339 UTC time (`—` when there is none)."""
    if not text:
        return "—"
    try:
        then = datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return text
    seconds = max(0.0, now - then)
    if seconds < 120:
        return f"{seconds:.0f} s ago"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min ago"
    return f"{seconds / 3600:.0f} h ago"


def _add_console(
    app: QuartTrio, source: ConsoleSource, metrics: Metrics, audit: AuditChainCheck
) -> None:
    """The read-only pages; each one only reads the source, the metrics and the audit log."""

    @app.template_filter("tis")
    def tis_filter(value: float | None, digits: int = 4) -> str:
        return "—" if value is None else f"{value:.{digits}f}"

    @app.template_filter("duration")
    def duration_filter(seconds: float | None) -> str:
        if seconds is None:
            return "—"
        return f"{seconds * 1000:.0f} ms" if seconds < 1 else f"{seconds:.2f} s"

    @app.template_filter("percent")
    def percent_filter(value: float | None) -> str:
        return "—" if value is None else f"{value * 100:.1f} %"

    @app.template_filter("ago")
    def ago_filter(text: str | None) -> str:
        return _ago(text, time.time())

    @app.template_filter("short")
    def short_filter(digest: str) -> str:
        return digest.removeprefix("sha256:")[:12]

    @app.after_request
    async def console_headers(response: Response) -> Response:
        response.headers.setdefault("x-content-type-options", "nosniff")
        if response.content_type and response.content_type.startswith("text/html"):
            for name, value in CONSOLE_HEADERS.items():
                response.headers.setdefault(name, value)
        return response

    def rendered(now: float) -> dict[str, Any]:
        return {"version": __version__, "generated_at": datetime.fromtimestamp(now, UTC)}

    @app.get("/")
    async def index() -> str:
        now = time.time()
        cluster = source.cluster()
        rounds = list(source.recent_rounds(CHART_ROUNDS))
        byzantine = list(source.byzantine())
        marked = frozenset(b.node_id for b in byzantine)
        chart, series = validators_chart(
            rounds,
            [v.node_id for v in cluster.validators],
            marked,
            cluster.deviation_threshold,
        )
        return await render_template(
            "index.html",
            cluster=cluster,
            up=sum(v.up for v in cluster.validators),
            requests=peer_request_stats(metrics),
            rounds=list(reversed(rounds))[:TABLE_ROUNDS],
            chart_rounds=len(rounds),
            complete=sum(r.status == "Complete" for r in rounds),
            consensus_chart=consensus_chart(rounds),
            validators_chart=chart,
            legend=series,
            byzantine=byzantine,
            marked=marked,
            reload=source.last_reload(),
            state=source.state(),
            audit=await audit.status(app.nursery),
            **rendered(now),
        )

    @app.get("/rounds/<round_id>")
    async def round_page(round_id: str) -> Response | str:
        detail = source.round_detail(round_id) if is_round_id(round_id) else None
        if detail is None:
            return await _error(404, "unknown_round", f"round {round_id!r} is not known here")
        byzantine = {b.node_id: b for b in source.byzantine()}
        return await render_template(
            "round.html",
            cluster=source.cluster(),
            detail=detail,
            round=detail.summary,
            byzantine=byzantine,
            evidence=[b for b in byzantine.values() if b.round_id == round_id and b.evidence],
            **rendered(time.time()),
        )

    @app.get("/byzantine/<node_id>")
    async def byzantine_page(node_id: str) -> Response | str:
        record = next((b for b in source.byzantine() if b.node_id == node_id), None)
        if record is None:
            return await _error(
                404, "not_byzantine", f"node {node_id!r} is not marked Byzantine here"
            )
        fields = _evidence_rows(record.evidence)
        return await render_template(
            "byzantine.html",
            cluster=source.cluster(),
            record=record,
            rows=fields,
            **rendered(time.time()),
        )


def _evidence_rows(evidence: tuple[Mapping[str, Any], ...]) -> list[tuple[str, str, str, bool]]:
    """(field, first, second, differs) for the two observations side by side."""
    if len(evidence) != 2:
        return []
    first, second = evidence
    rows = []
    for key in sorted(set(first) | set(second), key=_field_order):
        a, b = _show(first.get(key)), _show(second.get(key))
        rows.append((key, a, b, a != b))
    return rows


_FIELD_ORDER = tuple(field.name for field in attrs.fields(Observation))
"""Rows in the order of SPEC §3; keys an observation does not have come after."""


def _field_order(key: str) -> tuple[int, str]:
    return (_FIELD_ORDER.index(key) if key in _FIELD_ORDER else len(_FIELD_ORDER), key)


def _show(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.6f}"
    if isinstance(value, dict):
        return ", ".join(f"{k} {_show(v)}" for k, v in sorted(value.items()))
    if isinstance(value, list):
        return ", ".join(map(str, value)) or "—"
    return "—" if value is None else str(value)
