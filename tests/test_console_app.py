"""The metrics listener's app with quart's test client (no sockets): every page and
every error, over a fake ConsoleSource.

The machine endpoints keep their lean-server contract (bodies, codes, content types);
errors are the SPEC's JSON unless the client prefers HTML; the console is read-only,
fetches nothing from elsewhere, and disappears (404) when turned off.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import attrs
import pytest
from hypercorn.typing import ASGIReceiveEvent, ASGISendEvent, ConnectionState, HTTPScope
from quart_trio import QuartTrio

from anna_trio import __version__, failpoints
from anna_trio.audit import AuditIdAllocator, AuditLog
from anna_trio.console import make_app
from anna_trio.console.app import MAX_BODY_BYTES, MAX_HEAD_BYTES
from anna_trio.console.source import ByzantineView
from anna_trio.metrics import Metrics
from console_fakes import DIGEST, FakeSource

BROWSER = {"Accept": "text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8"}


@attrs.define
class Setup:
    source: FakeSource
    metrics: Metrics
    errors: list[str]
    ready: list[bool]


AppFactory = Callable[..., tuple[QuartTrio, Setup]]


@pytest.fixture
def build(tmp_path: Path) -> AppFactory:
    """make_app over a FakeSource with a real, verifying audit log of 3 entries."""

    def make(**options: Any) -> tuple[QuartTrio, Setup]:
        log = AuditLog.open(tmp_path / "audit.jsonl", "node_001", AuditIdAllocator())
        for n in range(3):
            log.append("daemon_start", {"n": n})
        log.close()
        setup = Setup(FakeSource(tmp_path / "audit.jsonl"), Metrics("node_001"), [], [True])
        kwargs: dict[str, Any] = {"failpoints_http": False, "console": True} | options
        app = make_app(
            setup.source,
            setup.metrics,
            health=lambda: {"status": "ok", "node_id": "node_001", "version": __version__},
            is_ready=lambda: setup.ready[0],
            count_error=setup.errors.append,
            **kwargs,
        )
        return app, setup

    return make


@pytest.fixture(autouse=True)
def no_armed_failpoints() -> Iterator[None]:
    yield
    failpoints.load_from_env(None)


async def call(
    app: QuartTrio, method: str, path: str, *, headers: dict[str, str] | None = None, **kw: Any
) -> tuple[int, dict[str, str], str]:
    async with app.test_app() as running:
        client = running.test_client()
        response = await client.open(path, method=method, headers=headers or {}, **kw)
        return (
            response.status_code,
            {k.lower(): v for k, v in response.headers.items()},
            await response.get_data(as_text=True),
        )


def spec_error(status: int, headers: dict[str, str], body: str) -> tuple[int, str, str]:
    """(status, error, message) of a SPEC §7 JSON error; fails on any other shape."""
    assert headers["content-type"].startswith("application/json"), headers
    data = json.loads(body)
    assert set(data) == {"success", "error", "message"} and data["success"] is False, data
    return status, data["error"], data["message"]


# --- machine endpoints ---------------------------------------------------------------------


async def test_metrics_is_the_registry_in_prometheus_text_format(build: AppFactory) -> None:
    """GET /metrics: 200, the exposition content type, the registry, no _created series."""
    app, setup = build()
    setup.metrics.peer_requests.labels("node_002", "success").inc()
    status, headers, body = await call(app, "GET", "/metrics")
    assert status == 200
    assert headers["content-type"] == "text/plain; version=0.0.4; charset=utf-8"
    assert 'anna_peer_request_total{peer="node_002",status="success"} 1.0' in body
    assert f'anna_build_info{{node_id="node_001",version="{__version__}"}} 1.0' in body
    assert "_created" not in body


async def test_health_and_ready(build: AppFactory) -> None:
    """/health is the node's health; /ready is 503 until the daemon says ready, then 200."""
    app, setup = build()
    status, _, body = await call(app, "GET", "/health")
    assert (status, json.loads(body)) == (
        200,
        {"status": "ok", "node_id": "node_001", "version": __version__},
    )
    setup.ready[0] = False
    assert spec_error(*await call(app, "GET", "/ready")) == (503, "not_ready", "starting up")
    setup.ready[0] = True
    status, _, body = await call(app, "GET", "/ready")
    assert (status, json.loads(body)) == (200, {"ready": True})


async def test_head_answers_where_get_does(build: AppFactory) -> None:
    """HEAD on the machine endpoints is 200 (hypercorn drops the body on the wire)."""
    app, _ = build()
    for path in ("/metrics", "/health", "/ready", "/"):
        assert (await call(app, "HEAD", path))[0] == 200, path


async def test_failpoints_are_404_unless_enabled(build: AppFactory) -> None:
    """Without ANNA_FAILPOINTS_HTTP=1 every method on a failpoint path is 404, nothing armed."""
    app, _ = build()
    for method in ("PUT", "DELETE", "GET", "POST"):
        answer = await call(app, method, "/debug/failpoints/store.before_commit", data=b"exit")
        assert spec_error(*answer) == (404, "not_found", "failpoints over HTTP are disabled")
    assert failpoints.armed() == {}


async def test_failpoints_arm_and_disarm_over_http(build: AppFactory) -> None:
    """PUT arms with the body as action, DELETE disarms; both answer what is armed."""
    app, _ = build(failpoints_http=True)
    status, _, body = await call(
        app, "PUT", "/debug/failpoints/observation.before_send", data=b"sleep(1500)"
    )
    assert (status, json.loads(body)) == (
        200,
        {"success": True, "armed": {"observation.before_send": "sleep(1500)"}},
    )
    assert failpoints.armed() == {"observation.before_send": "sleep(1500)"}
    status, _, body = await call(app, "DELETE", "/debug/failpoints/observation.before_send")
    assert (status, json.loads(body)) == (200, {"success": True, "armed": {}})
    assert failpoints.armed() == {}


@pytest.mark.parametrize(
    ("method", "path", "body", "expected"),
    [
        ("GET", "/debug/failpoints/store.before_commit", b"", (405, "method_not_allowed")),
        ("POST", "/debug/failpoints/store.before_commit", b"error", (405, "method_not_allowed")),
        ("PUT", "/debug/failpoints/no.such.point", b"error", (400, "bad_failpoint")),
        ("PUT", "/debug/failpoints/", b"error", (400, "bad_failpoint")),
        ("PUT", "/debug/failpoints/store.before_commit", b"explode", (400, "bad_failpoint")),
        ("PUT", "/debug/failpoints/store.before_commit", b"\xff\xfe", (400, "bad_failpoint")),
    ],
)
async def test_bad_failpoint_requests_are_refused_and_arm_nothing(
    build: AppFactory, method: str, path: str, body: bytes, expected: tuple[int, str]
) -> None:
    """Other methods 405 (with Allow), unknown names and actions 400; nothing is armed."""
    app, _ = build(failpoints_http=True)
    status, headers, text = await call(app, method, path, data=body)
    assert spec_error(status, headers, text)[:2] == expected
    if status == 405:
        assert headers["allow"] == "DELETE, PUT"
    assert failpoints.armed() == {}


async def test_unknown_paths_and_methods_are_spec_errors(build: AppFactory) -> None:
    """404 names the path, 405 lists what the path accepts (and says so in Allow)."""
    app, _ = build()
    assert spec_error(*await call(app, "GET", "/rpc/status")) == (
        404,
        "not_found",
        "no such endpoint: /rpc/status",
    )
    status, headers, body = await call(app, "POST", "/metrics")
    assert spec_error(status, headers, body) == (
        405,
        "method_not_allowed",
        "/metrics accepts GET, HEAD, OPTIONS",
    )
    assert headers["allow"] == "GET, HEAD, OPTIONS"


async def test_a_body_over_the_limit_is_413_and_counted(build: AppFactory) -> None:
    """A body over MAX_BODY_BYTES is refused with 413 and counted as too_large."""
    app, setup = build(failpoints_http=True)
    answer = await call(
        app, "PUT", "/debug/failpoints/store.before_commit", data=b"x" * (MAX_BODY_BYTES + 1)
    )
    assert spec_error(*answer)[:2] == (413, "payload_too_large")
    assert setup.errors == ["too_large"]
    assert failpoints.armed() == {}


async def test_a_bug_of_ours_is_a_logged_counted_500(
    build: AppFactory, caplog: pytest.LogCaptureFixture
) -> None:
    """An exception in a page is answered 500 (SPEC shape), logged with its traceback and
    counted as internal; the next request is served as usual."""
    app, setup = build()
    setup.source.broken = True
    with caplog.at_level(logging.ERROR, logger="anna.console"):
        answer = await call(app, "GET", "/")
    assert spec_error(*answer) == (500, "internal_error", "internal server error")
    assert setup.errors == ["internal"]
    assert "the node went away" in caplog.text and "Traceback" in caplog.text
    assert (await call(app, "GET", "/health"))[0] == 200


async def asgi_call(app: QuartTrio, path: str, headers: list[tuple[bytes, bytes]]) -> list[Any]:
    """One request straight through the ASGI interface (targets no test client sends)."""
    sent: list[dict[str, Any]] = []

    async def receive() -> ASGIReceiveEvent:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: ASGISendEvent) -> None:
        sent.append(dict(message))

    scope: HTTPScope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "GET",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": [(b"host", b"x"), *headers],
        "client": ("127.0.0.1", 1),
        "server": ("127.0.0.1", 2),
        "state": ConnectionState({}),
        "extensions": {},
    }
    await app(scope, receive, send)
    return sent


@pytest.mark.parametrize("target", ["http://[::1", "http://[", "https://a]b[", "x://[y"])
async def test_unparseable_request_targets_are_400_not_500(build: AppFactory, target: str) -> None:
    """Targets that made urlsplit raise inside the old server (issue 16) and inside quart
    are 400, counted as malformed, straight from the ASGI layer, closing the connection."""
    app, setup = build()
    sent = await asgi_call(app, target, [])
    assert sent[0]["status"] == 400
    assert (b"connection", b"close") in sent[0]["headers"]
    body = json.loads(sent[1]["body"])
    assert (body["success"], body["error"]) == (False, "bad_request")
    assert setup.errors == ["malformed"]


async def test_a_head_over_the_limit_is_431(build: AppFactory) -> None:
    """A request head over MAX_HEAD_BYTES, however it arrived, is 431 and counted."""
    app, setup = build()
    sent = await asgi_call(app, "/metrics", [(b"x-big", b"a" * MAX_HEAD_BYTES)])
    assert sent[0]["status"] == 431
    assert json.loads(sent[1]["body"])["error"] == "header_too_large"
    assert setup.errors == ["too_large"]


# --- the console -------------------------------------------------------------------------


def rows(html: str, attribute: str) -> dict[str, str]:
    """{value of data-<attribute>: the rest of its tag} for each element that has it."""
    return dict(re.findall(rf'data-{attribute}="([^"]+)"([^>]*)>', html))


def validator_row(html: str, node_id: str) -> str:
    start = html.index(f'<tr data-validator="{node_id}"')
    return html[start : html.index("</tr>", start)]


async def test_overview_shows_validators_rounds_byzantine_and_this_node(
    build: AppFactory,
) -> None:
    """The overview: 2 of 3 up, the quorum, each validator's state, when it was last
    seen and its requests' success and latency, the rounds with status and short
    digest, node_003 Byzantine, the version, the failed reload with its error, state
    and audit log."""
    app, setup = build()
    setup.metrics.peer_requests.labels("node_002", "success").inc(3)
    setup.metrics.peer_requests.labels("node_002", "timeout").inc(1)
    setup.metrics.peer_request_duration.labels("node_002").observe(0.004)
    status, headers, html = await call(app, "GET", "/")
    assert status == 200 and headers["content-type"].startswith("text/html")
    assert "2 of 3 validators up" in html
    validators = rows(html, "validator")
    assert {node: 'data-up="true"' in rest for node, rest in validators.items()} == {
        "node_001": True,
        "node_002": True,
        "node_003": False,
    }
    assert "75.0 %" in html  # node_002: 3 successes of 4 requests
    row = {node: validator_row(html, node) for node in ("node_001", "node_002", "node_003")}
    assert ">now<" in row["node_001"]  # this node
    assert '<time datetime="2026-12-04T00:00:00Z"' in row["node_002"]
    assert 'title="never"' in row["node_003"]
    assert '<td class="num">4 ms</td>' in row["node_002"]  # its mean latency
    assert "· quorum 2" in html and f"<dt>Version</dt><dd>{__version__}</dd>" in html
    assert rows(html, "round") == {
        "round_3": ' data-status="Complete"',
        "round_2": ' data-status="Failed"',
        "round_1": ' data-status="Complete"',
    }
    assert html.index('data-round="round_3"') < html.index('data-round="round_1"')  # newest first
    assert DIGEST[:12] in html and DIGEST not in html.replace(f'title="{DIGEST}"', "")
    assert list(rows(html, "byzantine")) == ["node_003"]
    assert 'href="/byzantine/node_003"' in html and 'href="/rounds/round_3"' in html
    assert "peers.yml:3: quorum: bad" in html
    assert "schema v2" in html and "migrated from v1" in html
    assert "3 entries" in html and "chain verified" in html


async def test_consensus_chart_has_one_point_per_completed_round(build: AppFactory) -> None:
    """Two of the three rounds completed: two points in the consensus chart; the
    validators chart has one point per held observation (3 rounds × 3 nodes)."""
    app, _ = build()
    html = (await call(app, "GET", "/"))[2]
    consensus = html[html.index('id="consensus-chart"') : html.index("</svg>")]
    assert consensus.count('class="point"') == 2
    validators = html[html.index('id="validators-chart"') :]
    assert validators[: validators.index("</svg>")].count('class="point"') == 9


async def test_round_page_shows_the_round_and_its_observations(build: AppFactory) -> None:
    """/rounds/<id>: status, participants of validators, full digest, every observation."""
    app, _ = build()
    status, _, html = await call(app, "GET", "/rounds/round_3")
    assert status == 200
    assert 'data-status="Complete"' in html
    assert "2 of 3 validators (node_001, node_002)" in html
    assert DIGEST in html
    assert set(rows(html, "observation")) == {"node_001", "node_002", "node_003"}
    assert 'href="/byzantine/node_003"' in html  # the evidence of this round


@pytest.mark.parametrize("round_id", ["round_9", "not a round", "x" * 65])
async def test_unknown_round_is_404(build: AppFactory, round_id: str) -> None:
    """A round this node does not know (or that cannot be a round id) is 404: JSON for
    machines, a page for browsers."""
    app, _ = build()
    status, code, message = spec_error(*await call(app, "GET", f"/rounds/{round_id}"))
    assert (status, code) == (404, "unknown_round")
    assert message == f"round {round_id!r} is not known here"
    status, headers, html = await call(app, "GET", f"/rounds/{round_id}", headers=BROWSER)
    assert status == 404 and headers["content-type"].startswith("text/html")
    assert 'data-error="unknown_round"' in html


async def test_byzantine_page_shows_the_evidence_side_by_side(build: AppFactory) -> None:
    """/byzantine/<node>: reason, round, and both observations field by field, with the
    fields that differ marked (in words too, not only colour)."""
    app, _ = build()
    status, _, html = await call(app, "GET", "/byzantine/node_003")
    assert status == 200
    assert 'data-reason="ConflictingObservations"' in html
    assert 'href="/rounds/round_3"' in html
    fields = rows(html, "field")
    assert {"tis_overall", "audit_id", "signature", "node_id"} <= set(fields)
    evidence = html[html.index('id="evidence"') :]
    differing = re.findall(r'<tr class="differs" data-field="([^"]+)"', evidence)
    assert set(differing) == {"tis_overall", "tis_components", "audit_id"}
    assert "0.850000" in evidence and "0.150000" in evidence


async def test_byzantine_page_without_evidence_explains_the_deviation(
    build: AppFactory,
) -> None:
    """ExcessiveDeviation has no pair to show: the page says why the node is marked."""
    app, setup = build()
    setup.source.byzantine_nodes = [
        ByzantineView("node_002", "ExcessiveDeviation", "round_3", "2026-12-04T00:00:01Z")
    ]
    status, _, html = await call(app, "GET", "/byzantine/node_002")
    assert status == 200 and 'id="evidence"' not in html
    assert "deviated from the consensus by more than 0.3" in html


async def test_a_node_not_marked_byzantine_is_404(build: AppFactory) -> None:
    """/byzantine/<node> of an honest (or unknown) node is 404."""
    app, _ = build()
    for node in ("node_001", "node_999"):
        assert spec_error(*await call(app, "GET", f"/byzantine/{node}"))[:2] == (
            404,
            "not_byzantine",
        )


async def test_console_disabled_is_404_and_machine_endpoints_stay(build: AppFactory) -> None:
    """console=False: every console page and asset is 404 (JSON, even for a browser);
    /metrics, /health, /ready answer as before."""
    app, _ = build(console=False)
    for path in ("/", "/rounds/round_1", "/byzantine/node_003", "/static/console.css"):
        for headers in ({}, BROWSER):
            assert spec_error(*await call(app, "GET", path, headers=headers))[:2] == (
                404,
                "not_found",
            ), path
    for path in ("/metrics", "/health", "/ready"):
        assert (await call(app, "GET", path))[0] == 200


async def test_console_pages_are_read_only(build: AppFactory) -> None:
    """Console pages accept GET and HEAD only, and hold no form or input but the
    auto-refresh switch: nothing a reader could act with."""
    app, _ = build()
    for path in ("/", "/rounds/round_3", "/byzantine/node_003"):
        assert spec_error(*await call(app, "POST", path))[:2] == (405, "method_not_allowed")
        html = (await call(app, "GET", path))[2]
        assert "<form" not in html and "<button" not in html
        assert re.findall(r"<input[^>]*>", html) == ['<input type="checkbox" id="auto-refresh">']


async def test_console_fetches_nothing_from_elsewhere(build: AppFactory) -> None:
    """Every src and href is a path on this listener (or an anchor), and the pages say so to the
    browser (Content-Security-Policy: default-src 'none', own scripts and styles only)."""
    app, _ = build()
    for path in ("/", "/rounds/round_3", "/byzantine/node_003", "/rounds/nope"):
        _, headers, html = await call(app, "GET", path, headers=BROWSER)
        for link in re.findall(r'(?:src|href)="([^"]*)"', html):
            assert link.startswith(("/", "#")), (path, link)
        policy = headers["content-security-policy"]
        assert "default-src 'none'" in policy and "script-src 'self'" in policy
        assert headers["x-frame-options"] == "DENY"
        assert headers["x-content-type-options"] == "nosniff"


async def test_static_assets_are_served(build: AppFactory) -> None:
    """The stylesheet and the auto-refresh script come from the app itself."""
    app, _ = build()
    for path, kind in (("/static/console.css", "text/css"), ("/static/console.js", "javascript")):
        status, headers, _ = await call(app, "GET", path)
        assert status == 200 and kind in headers["content-type"], (path, headers)


async def test_a_broken_audit_chain_is_shown(build: AppFactory) -> None:
    """An edited audit log line shows as a broken chain, with the line and the reason."""
    app, setup = build()
    path = setup.source.audit_log
    lines = path.read_bytes().splitlines(keepends=True)
    lines[1] = lines[1].replace(b'"n":1', b'"n":7')
    path.write_bytes(b"".join(lines))
    html = (await call(app, "GET", "/"))[2]
    assert "chain broken" in html and "at line 2" in html


async def test_an_unreadable_audit_log_is_shown(build: AppFactory) -> None:
    """A missing audit log is reported on the page, not a 500."""
    app, setup = build()
    setup.source.audit_log.unlink()
    status, _, html = await call(app, "GET", "/")
    assert status == 200 and "cannot read" in html
