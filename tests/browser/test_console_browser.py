"""The operator console in a real browser (issue 17): Debian's chromium, headless, driven
by Playwright, against a live 3-node mTLS testnet after the three seed scenarios.

Each node's console loads without console errors and fetches nothing from elsewhere,
shows 3 validators up, the three rounds Complete and node_003 Byzantine with its
evidence page reachable; the consensus chart has one point per completed round; no
page shows key material; a screenshot is not blank; axe-core (npm, injected into the
page) finds no serious or critical accessibility violation.

Needs /usr/bin/chromium, the playwright and Pillow packages and axe.min.js
(ANNA_AXE_JS): `nox -s browser` provides them. Missing, the suite fails under CI=true
and skips elsewhere, saying why. The testnet has its own folder and free ports.
`ANNA_CONSOLE_SCREENSHOT=FILE` also saves node 1's screenshot there (docs/console.png).
"""

from __future__ import annotations

import importlib.util
import io
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import attrs
import pytest
import trio

from _launch import LiveCluster
from anna_trio import testnet

pytestmark = pytest.mark.integration

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox",  # the tests run as root
    "--headless",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
VIEWPORT = {"width": 1200, "height": 900}
AXE_BLOCKING = ("serious", "critical")


def _missing() -> str | None:
    if not CHROMIUM.exists():
        return f"{CHROMIUM} not found (apt-get install -y --no-install-recommends chromium)"
    for module in ("playwright", "PIL"):
        if importlib.util.find_spec(module) is None:
            return f"Python package {module} not installed (nox -s browser installs it)"
    axe = os.environ.get("ANNA_AXE_JS")
    if not axe or not Path(axe).is_file():
        return "axe-core not found: ANNA_AXE_JS must name axe.min.js (nox -s browser, needs npm)"
    return None


@pytest.fixture(scope="module", autouse=True)
def requirements() -> None:
    why = _missing()
    if why is None:
        return
    if os.environ.get("CI") == "true":
        pytest.fail(f"browser suite cannot run in CI: {why}")
    pytest.skip(why)


@attrs.frozen
class LiveTestnet:
    nodes: LiveCluster
    round_ids: tuple[str, ...]

    def url(self, n: int, path: str = "/") -> str:
        ep = self.nodes.endpoint(n)
        return f"http://{ep.host}:{ep.metrics_port}{path}"

    def secrets(self) -> list[str]:
        """Every node's Ed25519 seed (hex) and the TLS private keys: never on a page."""
        directory = self.nodes.layout.directory
        seeds = [p.read_text().strip() for p in directory.glob("node*/keys/node_id.sec")]
        assert len(seeds) == 3
        return [*seeds, "PRIVATE KEY"]


@pytest.fixture(scope="module")
def net(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveTestnet]:
    """A 3-node testnet in its own folder on free ports, after the three scenarios."""
    layout = testnet.free_layout(tmp_path_factory.mktemp("browser") / "testnet", 3)
    testnet.init(layout)
    nodes = LiveCluster(layout)
    try:
        nodes.start(1, 2, 3)
        trio.run(nodes.wait_ready)
        results = trio.run(testnet.run_scenarios, layout)
        assert all(r.passed for r in results), testnet.summary_table(results)
        yield LiveTestnet(nodes, tuple(r.round_id for r in results))
    finally:
        codes = nodes.stop_all()
    assert codes == {1: 0, 2: 0, 3: 0}, codes


@pytest.fixture(scope="module")
def chromium() -> Iterator[Any]:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            yield browser
        finally:
            browser.close()


@attrs.define
class Watched:
    """A page and everything it complained about or fetched."""

    page: Any
    errors: list[str] = attrs.Factory(list)
    requests: list[str] = attrs.Factory(list)

    def goto(self, url: str) -> Any:
        response = self.page.goto(url, wait_until="load")
        assert response is not None
        return response


def open_page(chromium: Any, *, bypass_csp: bool = False) -> Watched:
    context = chromium.new_context(viewport=VIEWPORT, bypass_csp=bypass_csp)
    # The auto-refresh switch off, so no reload lands in the middle of a check.
    context.add_init_script("localStorage.setItem('anna-console-auto-refresh', 'off')")
    watched = Watched(context.new_page())
    watched.page.on(
        "console", lambda msg: watched.errors.append(msg.text) if msg.type == "error" else None
    )
    watched.page.on("pageerror", lambda exc: watched.errors.append(str(exc)))
    watched.page.on("request", lambda request: watched.requests.append(request.url))
    return watched


def completed_rounds(net: LiveTestnet, n: int) -> int:
    async def status() -> dict[str, Any]:
        client = testnet.Cluster(net.nodes.layout)
        try:
            return dict((await client.rpc(n, "GET", "/rpc/status"))[1])
        finally:
            await client.aclose()

    return sum(r["status"] == "Complete" for r in trio.run(status)["rounds"])


@pytest.mark.parametrize("n", [1, 2, 3])
def test_each_console_shows_the_cluster_after_the_scenarios(
    net: LiveTestnet, chromium: Any, n: int
) -> None:
    """Node n's overview, its Byzantine page and a round page: no console error, only
    this listener's own URLs fetched, 3 validators up, the three rounds Complete,
    node_003 Byzantine with its evidence, one chart point per completed round, and no
    key material anywhere."""
    watched = open_page(chromium)
    page = watched.page
    try:
        assert watched.goto(net.url(n)).status == 200
        up = page.locator('#validators tr[data-up="true"]')
        assert up.count() == 3, page.locator("#validators").inner_text()
        assert page.locator("[data-validator]").count() == 3
        assert page.get_by_text("3 of 3 validators up").is_visible()
        for round_id in net.round_ids:
            row = page.locator(f'#rounds tr[data-round="{round_id}"]')
            assert row.get_attribute("data-status") == "Complete", round_id
            assert row.locator(".badge").inner_text() == "Complete"
        byzantine = page.locator('#byzantine tr[data-byzantine="node_003"]')
        assert "ConflictingObservations" in byzantine.inner_text()
        points = page.locator("#consensus-chart circle.point")
        assert points.count() == completed_rounds(net, n) == len(net.round_ids)
        assert page.locator("#validators-chart g.series").count() == 3
        pages = [page.content()]

        byzantine.get_by_role("link", name=re.compile("conflicting observations")).click()
        page.wait_for_load_state("load")
        assert page.url == net.url(n, "/byzantine/node_003")
        evidence = page.locator("#evidence")
        assert evidence.locator("thead th").all_inner_texts() == [
            "Field",
            "Observation 1",
            "Observation 2",
        ]
        assert evidence.locator('tr[data-field="tis_overall"]').get_attribute("class") == (
            "differs"
        )
        pages.append(page.content())

        page.get_by_role("link", name=net.round_ids[2]).click()
        page.wait_for_load_state("load")
        assert page.url == net.url(n, f"/rounds/{net.round_ids[2]}")
        assert page.locator("#round-facts [data-status]").inner_text() == "Complete"
        assert page.locator("#observations [data-observation]").count() == 3
        pages.append(page.content())

        assert watched.errors == []
        base = net.url(n, "/")
        assert [url for url in watched.requests if not url.startswith(base)] == []
        for html in pages:
            for secret in net.secrets():
                assert secret not in html
    finally:
        page.context.close()


def test_screenshot_is_not_blank(net: LiveTestnet, chromium: Any) -> None:
    """A screenshot of node 1's console has text, badges and charts: many colours, and
    a good part of it is not background."""
    from PIL import Image

    watched = open_page(chromium)
    try:
        watched.goto(net.url(1))
        png = watched.page.screenshot()
    finally:
        watched.page.context.close()
    if target := os.environ.get("ANNA_CONSOLE_SCREENSHOT"):
        Path(target).write_bytes(png)
    image = Image.open(io.BytesIO(png)).convert("RGB")
    assert image.size == (VIEWPORT["width"], VIEWPORT["height"])
    colours = image.getcolors(maxcolors=1 << 20)
    assert colours is not None and len(colours) > 32, "too few colours: blank?"
    background = max(colours)[0]
    assert background < 0.97 * image.size[0] * image.size[1], "almost all one colour"


@pytest.mark.parametrize("page_path", ["/", "/byzantine/node_003", "round", "/rounds/unknown"])
def test_axe_finds_no_serious_or_critical_violation(
    net: LiveTestnet, chromium: Any, page_path: str
) -> None:
    """axe-core, injected into the page, reports no serious or critical violation on the
    overview, the Byzantine page, a round page or an error page."""
    if page_path == "round":
        page_path = f"/rounds/{net.round_ids[0]}"
    watched = open_page(chromium, bypass_csp=True)  # CSP forbids injected scripts
    try:
        watched.goto(net.url(1, page_path))
        watched.page.add_script_tag(path=os.environ["ANNA_AXE_JS"])
        results = watched.page.evaluate("async () => await axe.run(document)")
    finally:
        watched.page.context.close()
    blocking = [
        f"{v['id']} ({v['impact']}): {v['help']} at {[n['target'] for n in v['nodes']]}"
        for v in results["violations"]
        if v["impact"] in AXE_BLOCKING
    ]
    assert blocking == []
    assert results["passes"], "axe checked nothing"
