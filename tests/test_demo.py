"""The web demo in headless Chromium (Debian's /usr/bin/chromium driven by Playwright): upload an image, ask, watch
the answer stream in, ask a follow-up that carries the history, clear it; a screenshot is saved."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from conftest import IMAGES
from server_helpers import serve

from openowl import build_prompt
from openowl.infer.engine import Engine, Request
from openowl.infer.sampling import SamplingParams
from openowl.serve.config import LOOPBACK_NAMES, ServeConfig

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]  # fmt: skip
TOKENS = 24

pytestmark = pytest.mark.skipif(not CHROMIUM.exists(), reason="needs Debian's chromium (apt-get install chromium)")


@pytest.fixture(scope="module")
def page(model, processor):
    from playwright.sync_api import sync_playwright

    config = ServeConfig(model_name="owl-demo", allowed_hosts=LOOPBACK_NAMES)
    with serve(Engine(model, processor), config) as running, sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1100, "height": 760})
        page.goto(f"{running.url}/")
        yield page
        browser.close()


def _greedy(model, processor, messages: list[dict], images: list[Path]) -> str:
    request = Request(build_prompt(messages), images)
    return Engine(model, processor).generate([request], SamplingParams(max_new_tokens=TOKENS))[0].text


def _ask(page, text: str) -> str:
    """Type a question, send it and wait for the answer to finish; returns the answer's text."""
    answers = page.locator(".msg.assistant")
    count = answers.count()
    page.fill("#prompt", text)
    page.click("#send")
    answer = answers.nth(count)
    answer.and_(page.locator("[data-done=true]")).wait_for(timeout=30_000)
    return answer.locator(".text").inner_text()


def test_upload_ask_stream_follow_up_and_clear(page, model, processor, tmp_path_factory):
    page.locator("#model").filter(has_text="owl-demo").wait_for(timeout=10_000)
    page.fill("#max_tokens", str(TOKENS))
    page.set_input_files("#images", [str(IMAGES / "image0.jpg"), str(IMAGES / "image1.jpg")])
    page.locator("#attachments img").nth(1).wait_for()
    # Count the answer's updates as they happen: a streamed answer grows in several steps.
    page.evaluate("""() => {
        window.updates = 0;
        new MutationObserver(() => { window.updates += 1; })
            .observe(document.getElementById("log"), {subtree: true, characterData: true, childList: true});
    }""")
    answer = _ask(page, "What is in these pictures?")
    first_turn = [{"role": "user", "content": [{"type": "image"}, {"type": "image"},
                                               {"type": "text", "text": "What is in these pictures?"}]}]  # fmt: skip
    images = [IMAGES / "image0.jpg", IMAGES / "image1.jpg"]
    assert answer == _greedy(model, processor, first_turn, images)
    assert page.evaluate("window.updates") > 5
    assert page.locator(".msg.user img").count() == 2
    assert page.locator(".msg.assistant .meta").inner_text() == "finish: length"

    follow_up = _ask(page, "And what colour is it?")
    history = [
        *first_turn,
        {"role": "assistant", "content": answer},
        {"role": "user", "content": "And what colour is it?"},
    ]
    assert follow_up == _greedy(model, processor, history, images)

    folder = Path(os.environ.get("OPENOWL_SCREENSHOTS") or tmp_path_factory.mktemp("screenshots"))
    shot = folder / "demo.png"
    page.screenshot(path=str(shot), full_page=True)
    assert shot.stat().st_size > 10_000

    page.click("#clear")
    assert page.locator("#log .msg").count() == 0
    after_clear = _ask(page, "Hi")  # a fresh conversation: no earlier turn is sent
    assert after_clear == _greedy(model, processor, [{"role": "user", "content": "Hi"}], [])


def test_errors_show_in_the_page(page):
    page.set_input_files("#video", str(IMAGES / "image0.jpg"))  # the checkpoint takes no videos
    page.locator("#attachments video").wait_for()
    page.fill("#prompt", "What happens?")
    page.click("#send")
    error = page.locator(".msg.error")
    error.wait_for(timeout=10_000)
    assert "takes no videos" in error.inner_text()
    assert page.input_value("#prompt") == "What happens?"  # kept, to edit and resend
