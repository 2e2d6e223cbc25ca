"""The web page end to end: headless Chromium against a real uvicorn server."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from absvl import AbsVLModel
from absvl.retrieval import ImageIndex
from absvl.serve import create_app

from .conftest import LiveServer, tiny_config

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


@pytest.fixture(scope="module")
def page(live_server, tmp_path_factory):
    if not CHROMIUM.exists():
        message = f"{CHROMIUM} is missing: install Debian's chromium package (apt-get install chromium)"
        if os.environ.get("ABSVL_REQUIRE_BROWSER") == "1":
            pytest.fail(message + " — ABSVL_REQUIRE_BROWSER=1 requires the browser test")
        pytest.skip(message)
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch_persistent_context(
            str(tmp_path_factory.mktemp("chromium-profile")),
            executable_path=str(CHROMIUM),
            headless=True,
            args=CHROMIUM_ARGS,
            viewport={"width": 1100, "height": 1300},
        )
        try:
            tab = browser.new_page()
            tab.console_errors = []  # CSP violations and script errors, checked last
            tab.on("console", lambda message: message.type == "error" and tab.console_errors.append(message.text))
            tab.on("pageerror", lambda error: tab.console_errors.append(str(error)))
            tab.set_default_timeout(20_000)
            tab.goto(live_server.url + "/")
            tab.get_by_text("40 indexed images").wait_for()  # /health answered
            yield tab
        finally:
            browser.close()


def loaded_images(page, selector: str) -> int:
    """How many images under ``selector`` have finished loading with real pixels."""
    return page.eval_on_selector_all(selector, "els => els.filter(e => e.complete && e.naturalWidth > 0).length")


def test_search_shows_thumbnails_with_scores(page):
    page.get_by_label("Query", exact=True).fill("a red circle")
    page.get_by_label("Results", exact=True).fill("6")
    page.get_by_role("button", name="Search").click()
    results = page.locator("#search-results li")
    results.nth(5).wait_for()
    assert results.count() == 6
    page.wait_for_function(
        "() => document.querySelectorAll('#search-results img').length === 6 && "
        "[...document.querySelectorAll('#search-results img')].every(i => i.complete && i.naturalWidth > 0)"
    )
    assert loaded_images(page, "#search-results img") == 6
    first = results.first
    assert first.locator("img").get_attribute("src").startswith("/images/")
    assert "score" in first.locator("img").get_attribute("alt")
    assert re.search(r"#1 · image \d+ · score -?\d\.\d{3}", first.locator("figcaption").inner_text())


def test_search_error_is_shown(page):
    page.get_by_label("Query", exact=True).fill("   ")
    page.get_by_role("button", name="Search").click()
    alert = page.locator("#search-error")
    alert.wait_for(state="visible")
    assert "q: must not be empty" in alert.inner_text() and "HTTP 422" in alert.inner_text()


def test_ask_shows_answers_and_both_overlays(page, png_bytes, tmp_path):
    upload = tmp_path / "shapes.png"
    upload.write_bytes(png_bytes)
    page.get_by_label("Image", exact=True).set_input_files(str(upload))
    page.get_by_label("Question", exact=True).fill("what color is the circle?")
    page.get_by_role("button", name="Ask").click()
    page.locator("#vqa-result").wait_for(state="visible")
    assert page.locator("#vqa-answers li").count() == 5
    page.wait_for_function(
        "() => ['vqa-input', 'vqa-bottom-up', 'vqa-top-down'].every(id => "
        "{ const i = document.getElementById(id); return i.complete && i.naturalWidth > 0; })"
    )
    for selector in ("#vqa-bottom-up", "#vqa-top-down"):
        assert page.locator(selector).get_attribute("src").startswith("data:image/png;base64,")
        assert "attention" in page.locator(selector).get_attribute("alt")
    assert page.locator("#vqa-error").is_hidden()
    screenshot = tmp_path / "page.png"
    page.screenshot(path=str(screenshot), full_page=True)
    assert screenshot.read_bytes().startswith(b"\x89PNG\r\n\x1a\n") and screenshot.stat().st_size > 10_000


def test_ask_error_is_shown(page, tmp_path):
    not_an_image = tmp_path / "notes.png"
    not_an_image.write_text("this is text, not an image")
    page.get_by_label("Image", exact=True).set_input_files(str(not_an_image))
    page.get_by_label("Question", exact=True).fill("what is this?")
    page.get_by_role("button", name="Ask").click()
    alert = page.locator("#vqa-error")
    alert.wait_for(state="visible")
    assert "not a recognised image format" in alert.inner_text() and "HTTP 415" in alert.inner_text()
    assert page.locator("#vqa-result").is_hidden()


def test_only_the_served_halves_are_shown(page, model, retrieval_model, index_dir, shapes_root):
    """A service whose --model cannot answer questions shows only the search box, one without an index only the
    question form; each lists why the other half is not served."""
    no_head = AbsVLModel(tiny_config(shapes_root)).eval()
    for app, shown, hidden, reason in [
        (
            create_app(no_head, ImageIndex.load(index_dir), model_name="no-head", retrieval_model=retrieval_model),
            "#search-section",
            "#vqa-section",
            "model no-head is an AbsVLModel, not a VQA model",
        ),
        (create_app(model), "#vqa-section", "#search-section", "no image index is loaded"),
    ]:
        with LiveServer(app) as server:
            page.goto(server.url + "/")
            page.locator("#unavailable li").wait_for()
            assert page.locator(shown).is_visible() and page.locator(hidden).is_hidden()
            assert reason in page.locator("#unavailable").inner_text()


def test_page_runs_under_its_csp_without_errors(page, live_server):
    """Runs last on the shared page: everything above went through without a CSP violation."""
    response = page.goto(live_server.url + "/")
    assert "script-src 'self'" in response.headers["content-security-policy"]
    assert response.headers["x-content-type-options"] == "nosniff"
    page.get_by_text("40 indexed images").wait_for()
    page.evaluate("document.body.setAttribute('onclick', 'window.inlineRan = true'); document.body.click()")
    assert page.evaluate("window.inlineRan === undefined")  # inline handlers are blocked
    violations = [text for text in page.console_errors if "Content Security Policy" in text]
    assert len(violations) == 1 and "script-src" in violations[0]  # only the handler injected here
    others = [text for text in page.console_errors if text not in violations]
    assert all(text.startswith("Failed to load resource: the server responded with a status of 4") for text in others)
