"""The dashboard in headless Chromium (Debian's chromium driven by Playwright) against a real
uvicorn: it lists the stream, shows its live overlay, latency and fps, and draws class shares,
with every request kept on the API's own origin (the page works offline)."""

from __future__ import annotations

import asyncio
import os
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from playwright.sync_api import Browser, Page, Route, sync_playwright
from redis.asyncio import Redis
from support.api import make_key, running_api, seed_stream

from flowcloud.alerts import RuleStore
from flowcloud.labels import TRAIN_IDS
from flowcloud.settings import ApiSettings
from services.alerts.evaluator import Evaluator

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
SIZE = (384, 192)
# Set to a path (e.g. docs/img/dashboard.png) to keep a copy of the screenshot for the README.
SCREENSHOT_COPY = os.environ.get("FLOWCLOUD_DASHBOARD_SCREENSHOT")
ROAD = tuple(int(v) for v in TRAIN_IDS.palette[0])
LINK = 0.35  # the far GPU server's one-way delay: the network stage should stand out
NETWORK_COLOR = (0xEB, 0xCB, 0x8B)  # dashboard.js STAGE_COLORS.network


@dataclass
class Dashboard:
    base: str
    token: str
    browser: Browser


def open_dashboard(redis_url: str) -> Iterator[Dashboard]:
    """A real API on ``redis_url`` and a headless Chromium, with a reader key of tenant acme."""
    token = make_key(redis_url, "reader", "acme")
    with running_api(ApiSettings(redis_url=redis_url)) as base, sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield Dashboard(base, token, browser)
        finally:
            browser.close()


@pytest.fixture
def dashboard(redis_url: str) -> Iterator[Dashboard]:
    now = time.time()
    seed_stream(
        redis_url, "cam-street", "acme", count=80, start_ts=now - 8.0, period=0.1, size=SIZE, link_delay=LINK
    )
    seed_stream(redis_url, "cam-hidden", "other", count=3, start_ts=now - 1.0, period=0.1)
    yield from open_dashboard(redis_url)


def open_page(dash: Dashboard, url: str, offsite: list[str], errors: list[str] | None = None) -> Page:
    page = dash.browser.new_page(viewport={"width": 1280, "height": 1000})
    if errors is not None:  # console errors: script failures, CSP violations, failed loads
        page.on("console", lambda msg: errors.append(msg.text) if msg.type == "error" else None)
        page.on("pageerror", lambda exc: errors.append(str(exc)))

    def only_our_origin(route: Route) -> None:
        if route.request.url.startswith(dash.base) or route.request.url.startswith("data:"):
            route.continue_()
        else:
            offsite.append(route.request.url)
            route.abort()

    page.route("**/*", only_our_origin)
    page.goto(url)
    return page


def test_dashboard_lists_the_stream_and_shows_its_overlay(dashboard: Dashboard, tmp_path: Path) -> None:
    offsite: list[str] = []
    errors: list[str] = []
    page = open_page(dashboard, f"{dashboard.base}/dashboard#key={dashboard.token}", offsite, errors)
    row = page.locator('#streams tbody tr[data-stream="cam-street"]')
    row.wait_for(timeout=15_000)
    assert page.locator("#streams tbody tr").count() == 1  # another tenant's stream is not listed
    assert "live" in row.inner_text() and "acme" in row.inner_text()
    assert "key=" not in page.url  # the key leaves the address bar at once
    assert not page.locator("#key-form").is_visible()

    # The live overlay arrives over SSE and is drawn at the stream's resolution.
    page.wait_for_function(
        "() => { const img = document.getElementById('live');"
        " return img.dataset.seq === '79' && img.complete && img.naturalWidth > 0; }",
        timeout=15_000,
    )
    size = page.evaluate(
        "() => [document.getElementById('live').naturalWidth, document.getElementById('live').naturalHeight]"
    )
    assert tuple(size) == SIZE
    assert page.inner_text("#fig-seq") == "79"
    assert page.inner_text("#fig-latency").endswith("ms")
    page.wait_for_function("() => document.getElementById('fig-fps').textContent === '10.0'")
    assert "mask over the frame" in page.inner_text("#live-caption")
    assert "(cloud)" in page.inner_text("#live-caption")  # which side made the mask

    # Class shares over time: a stacked chart on canvas with a legend, road at the bottom.
    page.wait_for_function(
        "() => Number(document.getElementById('shares-chart').dataset.points) > 0", timeout=15_000
    )
    legend = page.inner_text("#legend")
    for name in ("road", "building", "sky", "car"):
        assert name in legend
    pixel = page.evaluate(
        "() => { const c = document.getElementById('shares-chart');"
        " return Array.from(c.getContext('2d').getImageData(c.width / 2, c.height - 30, 1, 1).data); }"
    )
    assert tuple(pixel[:3]) == ROAD
    page.wait_for_function("() => document.getElementById('fig-latency-summary').textContent.includes('ms')")

    # Where the time goes: the stacked stages say the 0.4 s are mostly the link, in words and colour.
    page.wait_for_function(
        "() => Number(document.getElementById('stages-chart').dataset.points) > 0", timeout=15_000
    )
    verdict = page.inner_text("#stages-verdict")
    assert verdict.startswith("Most of the time goes to network (8") and "edge to gateway" in verdict
    assert page.locator("#stages-table tbody tr").count() == 8
    network_row = page.locator('#stages-table tr[data-stage="network"]')
    assert "top" in (network_row.get_attribute("class") or "") and "358 ms" in network_row.inner_text()
    assert page.locator('#stages-table tr[data-stage="inference"]').inner_text().split()[1:3] == ["30", "ms"]
    pixel = page.evaluate(  # 40 % of the height up: inside the network band (2 ms to 360 ms of 461)
        "() => { const c = document.getElementById('stages-chart');"
        " return Array.from(c.getContext('2d').getImageData(c.width / 2, 8 + 170 * 0.6, 1, 1).data); }"
    )
    assert tuple(pixel[:3]) == NETWORK_COLOR
    page.wait_for_function("() => document.getElementById('fig-stages').textContent.startsWith('network 3')")

    shot = tmp_path / "dashboard.png"
    page.screenshot(path=str(shot), full_page=True)
    assert shot.stat().st_size > 10_000
    if SCREENSHOT_COPY:
        Path(SCREENSHOT_COPY).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(shot, SCREENSHOT_COPY)
    assert offsite == [] and errors == []
    page.close()


def test_dashboard_asks_for_a_key_and_refuses_a_bad_one(dashboard: Dashboard) -> None:
    offsite: list[str] = []
    page = open_page(dashboard, f"{dashboard.base}/dashboard", offsite)
    assert "enter an API key" in page.inner_text("#status")
    assert page.locator("#streams tbody tr").count() == 0
    page.fill("#key-input", "fck_000000000000.wrong")
    page.click("#key-form button")
    page.wait_for_function("() => document.getElementById('status').classList.contains('error')")
    assert "401" in page.inner_text("#status")
    assert page.locator("#key-form").is_visible()
    page.fill("#key-input", dashboard.token)
    page.click("#key-form button")
    page.locator('#streams tbody tr[data-stream="cam-street"]').wait_for(timeout=15_000)
    assert not page.locator("#key-form").is_visible()
    assert offsite == []
    page.close()


@pytest.fixture
def alerting(redis_url: str) -> Iterator[Dashboard]:
    """cam-street with a car rule that fired, evaluated by the real evaluator from the results stream."""

    async def evaluate(before_results: bool) -> None:
        client = Redis.from_url(redis_url)
        evaluator = Evaluator(client, "dash-test", 256, 30_000, 0.0)
        if before_results:  # the group reads new results only
            await RuleStore(client).add("acme", "car", "above", 0.02, hold_frames=3, cooldown=2.0)
            await evaluator.start()
        while await evaluator.step(block_ms=10):
            pass
        await client.aclose()  # type: ignore[attr-defined,unused-ignore]

    asyncio.run(evaluate(before_results=True))
    now = time.time()
    seed_stream(redis_url, "cam-street", "acme", count=80, start_ts=now - 8.0, period=0.1, size=SIZE)
    asyncio.run(evaluate(before_results=False))
    yield from open_dashboard(redis_url)


def test_chart_points_open_their_frames_and_alert_firings_show(alerting: Dashboard) -> None:
    offsite: list[str] = []
    errors: list[str] = []
    page = open_page(alerting, f"{alerting.base}/dashboard#key={alerting.token}", offsite, errors)
    page.wait_for_function("() => Number(document.getElementById('shares-chart').dataset.firings) > 0")
    firing = page.locator("#firings li").first
    assert "car above 2%" in firing.inner_text()
    # A red marker at the firing's time on the chart (waited for: each poll redraws the chart, and
    # the markers follow once the firings have been fetched). The 2 px line is centred on a
    # fractional x, so the pixel that it covers whole is floor(x); round(x) is half-covered
    # (antialiased pink) whenever x's fraction is above 0.5, which depends on the chart's window.
    page.wait_for_function(
        """() => { const c = document.getElementById('shares-chart'); const s = state.stats.series;
        const f = document.querySelector('#firings li').textContent.match(/frame (\\d+)/)[1];
        const p = s.reduce((b, q) => Math.abs(q.seq - f) < Math.abs(b.seq - f) ? q : b, s[0]);
        const t0 = s[0].capture_ts, span = s[s.length - 1].capture_ts - t0;
        const x = Math.floor(40 + (p.capture_ts - t0) / span * (c.width - 48));
        const px = c.getContext('2d').getImageData(x, 12, 1, 1).data;
        return [255, 59, 59].every((v, i) => Math.abs(px[i] - v) <= 8); }""",  # antialiased
        timeout=15_000,
    )
    # Click the chart at a point: its frame opens.
    point = page.evaluate(
        """() => { const c = document.getElementById('shares-chart'); const s = state.stats.series;
        const p = s[Math.floor(s.length / 3)]; const t0 = s[0].capture_ts;
        const x = 40 + (p.capture_ts - t0) / (s[s.length - 1].capture_ts - t0) * (c.width - 48);
        return [p.seq, x * c.clientWidth / c.width]; }"""
    )
    page.locator("#shares-chart").click(position={"x": point[1], "y": 60})
    page.wait_for_function(
        f"() => {{ const img = document.getElementById('frame-img');"
        f" return img.dataset.seq === '{point[0]}' && img.complete && img.naturalWidth > 0; }}"
    )
    assert page.evaluate("() => document.getElementById('frame-img').naturalWidth") == SIZE[0]
    assert f"frame {point[0]}" in page.inner_text("#frame-caption")
    # A firing in the list opens the frame that fired.
    fired = int(firing.inner_text().split("frame ")[1].split(",")[0])
    firing.click()
    page.wait_for_function(f"() => document.getElementById('frame-img').dataset.seq === '{fired}'")
    # The search box finds results by class.
    page.fill("#search-class", "car")
    page.fill("#search-min", "0.02")
    page.click("#search-form button")
    page.locator("#search-results tbody tr").first.wait_for()
    assert "results" in page.inner_text("#search-count")
    row = page.locator("#search-results tbody tr").nth(2)
    seq = row.get_attribute("data-seq")
    row.click()
    page.wait_for_function(f"() => document.getElementById('frame-img').dataset.seq === '{seq}'")
    # Chromium logs the 410 of an overlay whose frame left the recent window; the page then shows the mask.
    assert offsite == [] and [e for e in errors if "410 (Gone)" not in e] == []
    page.close()
