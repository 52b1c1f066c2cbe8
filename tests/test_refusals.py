"""Refused input is logged, and a flood of it is logged as a line per kind now and then."""

from __future__ import annotations

import logging

import pytest
import trio
from hypothesis import given
from hypothesis import strategies as st

from anna_trio.models import Limits
from anna_trio.transport.refusals import RefusalLog
from anna_trio.transport.server import HttpServer, Request, Response, json_response

EVERY = 10.0
LIMITS = Limits()


class Lines(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


@given(
    st.lists(
        st.tuples(st.sampled_from(["malformed", "tls"]), st.floats(0, 5.0)),
        min_size=1,
        max_size=60,
    )
)
def test_each_kind_is_logged_at_once_then_at_most_once_per_period_with_the_rest_counted(
    events: list[tuple[str, float]],
) -> None:
    logger = logging.Logger("test.refusals")  # a logger of its own, in no hierarchy
    lines = Lines()
    logger.addHandler(lines)
    refusals = RefusalLog(logger, EVERY)
    now = 0.0
    last_line: dict[str, float] = {}
    counted: dict[str, int] = {}
    for kind, gap in events:
        now += gap
        before = len(lines.lines)
        refusals.note(kind, f"{kind} refused", now)
        if kind not in last_line or now >= last_line[kind] + EVERY:
            assert len(lines.lines) == before + 1
            held = counted.pop(kind, 0)
            assert lines.lines[-1].startswith(f"{kind} refused")
            assert (f"and {held} more" in lines.lines[-1]) == (held > 0)
            last_line[kind] = now
        else:
            assert len(lines.lines) == before
            counted[kind] = counted.get(kind, 0) + 1


async def test_the_server_logs_a_malformed_request_with_its_client(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Three times `GET //[` (which once ended the daemon) within the period: one line,
    naming the client; the other two are held back."""

    async def handler(request: Request) -> Response:
        return json_response(200, {})

    server = HttpServer(handler, limits=lambda: LIMITS)
    caplog.set_level(logging.WARNING, "anna.http")
    async with trio.open_nursery() as nursery:
        port = await nursery.start(server.serve, "127.0.0.1", 0)
        for _ in range(3):
            stream = await trio.open_tcp_stream("127.0.0.1", port)
            await stream.send_all(b"GET //[ HTTP/1.1\r\nhost: t\r\n\r\n")
            with trio.fail_after(5):
                while await stream.receive_some(65536):
                    pass
            await stream.aclose()
        await server.shutdown()
    logged = [r.getMessage() for r in caplog.records if "malformed HTTP" in r.getMessage()]
    assert len(logged) == 1 and "from 127.0.0.1" in logged[0], logged
