"""The playground at / driven in headless Chromium: a prompt runs with the canvas redrawn at every denoising step and
the final text shown, holes are filled, a selected span is regenerated; screenshots are saved under tmp_path."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
sync_api = pytest.importorskip("playwright.sync_api")
httpx = pytest.importorskip("httpx")

from test_serve import NAME, LiveServer, tiny_checkpoint

from dgemma.serve.app import ServeConfig, create_app

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--no-first-run"]

# Records the step label each time the canvas is drawn (not when it is cleared for a new run).
WATCH = """() => {
  if (window.watcher) window.watcher.disconnect();
  window.seen = [];
  const canvas = document.getElementById('canvas');
  window.watcher = new MutationObserver(() => {
    if (canvas.children.length) window.seen.push(document.getElementById('step-label').textContent);
  });
  window.watcher.observe(canvas, {childList: true});
}"""


@pytest.fixture(scope="module")
def page(tmp_path_factory):
    if not Path(CHROMIUM).exists():
        pytest.skip(f"chromium is not installed at {CHROMIUM} (apt-get install -y chromium)")
    model = tiny_checkpoint(tmp_path_factory.mktemp("playground") / NAME)
    live = LiveServer(create_app(model, ServeConfig(model_name=NAME)))
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=ARGS)
        page = browser.new_page(viewport={"width": 1100, "height": 900})
        page.set_default_timeout(60_000)
        page.goto(live.url + "/")
        page.wait_for_function("document.getElementById('model-name').textContent.startsWith('tiny')")
        page.url_base = live.url
        yield page
        browser.close()
    live.stop()


def test_prompt_updates_the_canvas_every_step_and_shows_the_text(page, tmp_path):
    page.fill("#prompt", "def fib(n):")
    page.fill("#max-tokens", "40")
    page.fill("#steps", "2")
    page.fill("#seed", "4")
    page.evaluate(WATCH)
    page.click("#generate")
    page.wait_for_function("document.getElementById('status').textContent === 'done'")
    assert page.evaluate("window.seen") == ["#0 · step 1", "#0 · step 2", "#1 · step 1", "#1 · step 2"]
    assert page.get_attribute("#canvas", "data-steps") == "4"
    assert page.locator("#canvas .cell").count() == 32
    want = httpx.post(page.url_base + "/v1/completions", json={"model": NAME, "prompt": "def fib(n):",
                                                               "max_tokens": 40, "max_denoising_steps": 2,
                                                               "seed": 4}, timeout=60).json()
    assert page.evaluate("document.getElementById('output').textContent") == want["choices"][0]["text"]
    assert "tokens/s" in page.text_content("#stats") and "steps per canvas [2, 2]" in page.text_content("#stats")
    shot = tmp_path / "playground-generate.png"
    page.screenshot(path=str(shot), full_page=True)
    assert shot.stat().st_size > 1000
    print(f"\nscreenshot: {shot}")


def test_infill_and_edit_fill_the_marked_span(page, tmp_path):
    page.click("#tab-edit")
    page.fill("#edit-text", "a = 1\nb = <|hole|>\nc = 3")
    page.fill("#fill-length", "4")
    page.fill("#steps", "2")
    page.evaluate(WATCH)
    page.click("#fill-holes")
    page.wait_for_function("document.getElementById('status').textContent === 'done'")
    assert page.evaluate("window.seen") == ["#0 · step 1", "#0 · step 2"]
    assert page.locator("#canvas .cell.pinned").count() == len("\nc = 3")  # byte-level: one token per byte
    filled = page.input_value("#edit-text")
    assert filled.startswith("a = 1\nb = ") and filled.endswith("\nc = 3") and "<|hole|>" not in filled
    shot = tmp_path / "playground-infill.png"
    page.screenshot(path=str(shot), full_page=True)

    page.fill("#edit-text", "hello brave new world")
    page.fill("#fill-length", "")
    page.evaluate("document.getElementById('edit-text').setSelectionRange(6, 11)")
    page.click("#regenerate")
    page.wait_for_function("document.getElementById('status').textContent === 'done'")
    edited = page.input_value("#edit-text")
    assert edited.startswith("hello ") and edited.endswith(" new world")
    assert page.text_content("#edit-result") == edited
    print(f"\nscreenshot: {shot}")
