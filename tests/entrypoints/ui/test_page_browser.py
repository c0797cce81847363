"""The live engine page in a real browser: Playwright driving headless Chromium against a live
`pagoda serve` on 127.0.0.1, serving the default model.

Chromium is Debian's package (`.ci/run` installs it); Playwright comes from PyPI and is pointed
at it, with the background networking a fresh profile would start turned off (the machine has no
internet). Each test saves a screenshot: under $PAGODA_UI_SCREENSHOTS when set, else the test's
temporary directory.
"""

from __future__ import annotations

import os
import shutil
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.server import RemoteServer

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
playwright_api = pytest.importorskip("playwright.sync_api", reason="Playwright is not installed")
if CHROMIUM is None:
    pytest.skip("no chromium executable (apt-get install chromium)", allow_module_level=True)

API_KEY = "sk-browser-test"
CHROMIUM_FLAGS = [
    "--no-sandbox",  # CI runs as root
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-default-apps",
    "--disable-sync",
    "--no-first-run",
    "--metrics-recording-only",
    "--disable-features=Translate,OptimizationHints,MediaRouter",
]
SERVER_ARGS = ["--max-model-len", "1024"]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RemoteServer]:
    log = tmp_path_factory.mktemp("ui") / "server.log"
    remote = RemoteServer(SERVER_ARGS, log_path=log)
    yield remote
    assert remote.stop() == 0, remote.log_tail()


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    with playwright_api.sync_playwright() as playwright:
        launched = playwright.chromium.launch(
            executable_path=CHROMIUM, headless=True, args=CHROMIUM_FLAGS
        )
        yield launched
        launched.close()


class Page:
    """A browser tab on the server's page that records every console error and page error."""

    def __init__(self, browser: Any, url: str, shots: Path, **context_options: Any) -> None:
        self.context = browser.new_context(**context_options)
        self.page = self.context.new_page()
        self.errors: list[str] = []
        self.page.on("console", lambda m: self.errors.append(m.text) if m.type == "error" else None)
        self.page.on("pageerror", lambda e: self.errors.append(str(e)))
        self.shots = shots
        self.page.goto(url)

    def shot(self, name: str) -> Path:
        path = self.shots / f"{name}.png"
        self.page.screenshot(path=str(path), full_page=True)
        return path

    def text(self, selector: str) -> str:
        return str(self.page.locator(selector).inner_text())

    def close(self) -> None:
        self.context.close()


@pytest.fixture
def shots(tmp_path: Path) -> Path:
    directory = Path(os.environ.get("PAGODA_UI_SCREENSHOTS") or tmp_path)
    directory.mkdir(parents=True, exist_ok=True)
    return directory


def _wait_live(tab: Page) -> None:
    tab.page.wait_for_selector("#connection[data-state='live']", timeout=30_000)
    tab.page.wait_for_function(
        "document.getElementById('running-count').textContent !== '–'", timeout=30_000
    )


def test_the_page_loads_live_with_no_console_errors(
    browser: Any, server: RemoteServer, shots: Path
) -> None:
    tab = Page(browser, server.url, shots, viewport={"width": 1366, "height": 900})
    try:
        _wait_live(tab)
        assert tab.text("#model-name") == "HuggingFaceTB/SmolLM2-135M-Instruct"
        assert tab.text("#running-count") == "0"
        grid = tab.page.locator("#kv-grid")
        assert int(grid.get_attribute("data-free") or 0) > 0
        assert "blocks of 16 tokens" in tab.text("#kv-summary")
        assert tab.shot("engine-idle").stat().st_size > 0
        tab.page.wait_for_timeout(1500)  # a couple more documents, still no errors
        assert tab.errors == []
    finally:
        tab.close()


def test_a_chat_message_streams_a_reply_with_its_timing(
    browser: Any, server: RemoteServer, shots: Path
) -> None:
    tab = Page(browser, server.url, shots, viewport={"width": 1366, "height": 900})
    try:
        _wait_live(tab)
        tab.page.click("#tab-chat")
        tab.page.fill("#system-prompt", "You are a concise assistant.")
        tab.page.fill("#max-tokens", "24")
        tab.page.fill("#chat-input", "What is the capital of France?")
        tab.page.press("#chat-input", "Enter")
        reply = tab.page.locator(".message.assistant").last
        # The text arrives before the timing line, which comes with the stream's last chunk.
        reply.locator(".content").filter(has_text="a").or_(
            reply.locator(".content").filter(has_text="e")
        ).wait_for(timeout=60_000)
        timing = reply.locator(".timing")
        timing.wait_for(timeout=60_000)
        assert "TTFT" in timing.inner_text() and "tokens" in timing.inner_text()
        assert reply.locator(".content").inner_text().strip() != ""
        assert tab.text(".message.user") == "What is the capital of France?"
        tab.shot("chat-reply")
        tab.page.click("#tab-complete")
        tab.page.fill("#complete-prompt", "The three primary colours are")
        tab.page.fill("#complete-max-tokens", "12")
        tab.page.click("#complete-send")
        tab.page.wait_for_function(
            "document.getElementById('complete-stats').textContent.includes('tokens')",
            timeout=60_000,
        )
        output = tab.text("#complete-output")
        assert output.startswith("The three primary colours are") and len(output) > 30
        tab.shot("completion")
        assert tab.errors == []
    finally:
        tab.close()


def test_the_engine_view_follows_running_requests_and_returns_to_idle(
    browser: Any, server: RemoteServer, shots: Path
) -> None:
    tab = Page(browser, server.url, shots, viewport={"width": 1366, "height": 900})
    try:
        _wait_live(tab)

        def complete(i: int) -> None:
            httpx.post(
                f"{server.url}/v1/completions",
                json={
                    "prompt": f"Request {i}: tell me about paged attention. " * 4,
                    "max_tokens": 200,
                    "ignore_eos": True,
                },
                timeout=120,
            )

        threads = [threading.Thread(target=complete, args=(i,)) for i in range(3)]
        for thread in threads:
            thread.start()
        tab.page.wait_for_function(
            "Number(document.getElementById('running-count').textContent) >= 1"
            " && Number(document.getElementById('kv-grid').dataset.used) > 0"
            " && document.querySelectorAll('#requests-table tbody tr').length >= 1",
            timeout=60_000,
        )
        assert float(tab.text("#generation-rate")) >= 0
        tab.shot("engine-busy")
        for thread in threads:
            thread.join()
        tab.page.wait_for_function(
            "document.getElementById('running-count').textContent === '0'"
            " && document.getElementById('kv-grid').dataset.used === '0'"
            " && document.querySelectorAll('#requests-table tbody tr').length === 0",
            timeout=30_000,
        )
        assert int(tab.page.locator("#kv-grid").get_attribute("data-cached") or 0) > 0
        tab.shot("engine-idle-after")
        assert tab.errors == []
    finally:
        tab.close()


def test_a_phone_screen_shows_the_page_without_sideways_scrolling(
    browser: Any, server: RemoteServer, shots: Path
) -> None:
    tab = Page(
        browser,
        server.url,
        shots,
        viewport={"width": 390, "height": 844},
        device_scale_factor=2,
        is_mobile=True,
        has_touch=True,
    )
    try:
        _wait_live(tab)
        overflow = tab.page.evaluate(
            "document.documentElement.scrollWidth - document.documentElement.clientWidth"
        )
        assert overflow <= 0
        tab.shot("phone-engine")
        tab.page.click("#tab-chat")
        assert tab.page.locator("#chat-input").is_visible()
        tab.shot("phone-chat")
        assert tab.errors == []
    finally:
        tab.close()


def test_the_page_asks_for_the_api_key_once_and_keeps_it(
    browser: Any, shots: Path, tmp_path: Path
) -> None:
    remote = RemoteServer([*SERVER_ARGS, "--api-key", API_KEY], log_path=tmp_path / "server.log")
    tab = Page(browser, remote.url, shots, viewport={"width": 1366, "height": 900})
    try:
        dialog = tab.page.locator("#key-dialog")
        dialog.wait_for(state="visible", timeout=30_000)
        tab.shot("key-prompt")
        tab.page.fill("#key-input", "sk-wrong")
        tab.page.click("#key-submit")
        tab.page.locator("#key-error").wait_for(state="visible", timeout=30_000)
        tab.page.fill("#key-input", API_KEY)
        tab.page.click("#key-submit")
        _wait_live(tab)
        assert not dialog.is_visible()
        assert tab.text("#model-name") == "HuggingFaceTB/SmolLM2-135M-Instruct"
        # A reload in the same tab session keeps the key: no second prompt.
        tab.page.reload()
        _wait_live(tab)
        assert not dialog.is_visible()
        tab.shot("key-accepted")
        # The refused key's 401s are the only console errors (Chromium logs failed loads).
        assert all("401" in error for error in tab.errors), tab.errors
    finally:
        tab.close()
        assert remote.stop() == 0, remote.log_tail()
