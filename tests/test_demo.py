"""The web demo (`openowl demo`, Gradio's multimodal chat) in headless Chromium (Debian's /usr/bin/chromium driven
by Playwright), on the parity checkpoint: upload two images, ask, read the streamed answer (the engine's greedy
answer); a follow-up carries the history without re-uploading the images; Clear during a stream cancels it and the
next prompt holds only the new turn; a corrupt image is answered with a message, and its turn is left out after.
The prompts the model saw are recorded by a scheduler that notes each job. A screenshot is saved."""

from __future__ import annotations

import asyncio
import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from conftest import IMAGES
from server_helpers import serve_app

from openowl.infer.engine import Engine, Request
from openowl.infer.sampling import SamplingParams
from openowl.prompts import DEFAULT_SYSTEM
from openowl.serve.config import ServeConfig, loopback_hosts
from openowl.serve.scheduler import Delta, Finished, Scheduler

pytest.importorskip("gradio")
from openowl.serve.demo import (  # noqa: E402
    ERROR_TITLE,
    SETTLE_S,
    DemoChat,
    InputError,
    Tab,
    conversation,
    demo_app,
)

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]  # fmt: skip
TOKENS = 24
TIMEOUT_MS = 30_000
CONFIG = ServeConfig(
    model_name="owl-demo",
    allowed_hosts=loopback_hosts("127.0.0.1"),
    defaults=SamplingParams(max_new_tokens=TOKENS),
    max_images=4,
)
pytestmark = pytest.mark.filterwarnings(  # Gradio's queue, on pandas 3
    "ignore:'future.no_silent_downcasting' is deprecated", "ignore:The copy keyword is deprecated"
)
needs_chromium = pytest.mark.skipif(not CHROMIUM.exists(), reason="needs Debian's chromium (apt-get install chromium)")


class RecordingScheduler(Scheduler):
    """The real scheduler, noting each job it is given; `delay` slows each text delta (to clear mid-stream)."""

    def __init__(self, engine: Engine):
        super().__init__(engine, max_batch_size=4, max_queue=8)
        self.jobs, self.finished, self.delay = [], [], 0.0

    def submit(self, job) -> None:
        emit = job.emit

        def slowed(event) -> None:
            if isinstance(event, Delta) and self.delay:
                time.sleep(self.delay)
            if isinstance(event, Finished):
                self.finished.append(job)
            emit(event)

        job.emit = slowed
        self.jobs.append(job)
        super().submit(job)


@pytest.fixture(scope="module")
def demo(model, processor):
    """`openowl demo`'s app (the API with the page mounted at /) on a free loopback port, over a recording
    scheduler."""
    scheduler = RecordingScheduler(Engine(model, processor))
    app = demo_app(Engine(model, processor), CONFIG, scheduler)
    with serve_app(app) as running:
        yield app, scheduler, running.url + "/"


@pytest.fixture(scope="module")
def page(demo):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        context = browser.new_context(viewport={"width": 1100, "height": 900})
        context.grant_permissions(["clipboard-read", "clipboard-write"], origin=demo[2].rstrip("/"))
        page = context.new_page()
        page.goto(demo[2])
        page.locator("textarea").wait_for(timeout=TIMEOUT_MS)
        yield page
        browser.close()


def _prompt(processor, messages: list[dict]):
    """The prompt the demo renders for `messages` under its default system prompt."""
    return processor.apply_chat_template([{"role": "system", "content": DEFAULT_SYSTEM}, *messages])


def _prompt_ids(processor, messages: list[dict]) -> list[int]:
    return processor.tokenize_prompt(_prompt(processor, messages))


def _greedy(model, processor, messages: list[dict], images: list[Path]) -> str:
    request = Request(_prompt(processor, messages), images)
    return Engine(model, processor).generate([request], SamplingParams(max_new_tokens=TOKENS))[0].text


def _send(page, text: str) -> None:
    page.locator("textarea").fill(text)
    page.locator("textarea").press("Enter")


def _wait_answer(page, scheduler, finished: int) -> str:
    """Wait until `finished` jobs have finished and the page took the answer; the last answer's text, as copied."""
    deadline = time.monotonic() + TIMEOUT_MS / 1000
    while len(scheduler.finished) < finished:
        assert time.monotonic() < deadline, "the answer did not finish"
        time.sleep(0.05)
    page.wait_for_function("() => !document.querySelector('textarea').disabled", timeout=TIMEOUT_MS)
    page.locator("[data-testid=bot]").last.hover()
    page.locator("button[aria-label='Copy message']").last.click()
    return page.evaluate("navigator.clipboard.readText()")


@needs_chromium
def test_upload_ask_stream_follow_up(demo, page, model, processor, tmp_path):
    _, scheduler, _ = demo
    assert "video" not in page.get_attribute("input[data-testid=file-upload]", "accept")  # no video for this model
    images = [IMAGES / "image0.jpg", IMAGES / "image1.jpg"]
    page.set_input_files("input[data-testid=file-upload]", [str(path) for path in images])
    page.locator("[aria-label='File thumbnail'] img").nth(1).wait_for(timeout=TIMEOUT_MS)
    # Count the answer's updates as they happen: a streamed answer grows in several steps.
    page.evaluate("""() => { window.updates = 0; new MutationObserver(() => { window.updates += 1; })
        .observe(document.querySelector('[role=log]') || document.body,
                 {subtree: true, characterData: true, childList: true}); }""")
    _send(page, "What is in these pictures?")
    answer = _wait_answer(page, scheduler, 1)
    first = [{"role": "user", "content": [{"type": "image"}, {"type": "image"},
                                          {"type": "text", "text": "What is in these pictures?"}]}]  # fmt: skip
    assert scheduler.jobs[-1].prompt_ids == _prompt_ids(processor, first)
    assert answer == _greedy(model, processor, first, images)
    assert page.evaluate("window.updates") > 5
    assert page.locator("[data-testid=user] img").count() == 2

    sent = []  # what the page sends for the follow-up: the history by reference, never the images again
    page.on("request", lambda request: sent.append((request.url, len(request.post_data_buffer or b""))))
    _send(page, "And what colour is it?")
    follow_up = _wait_answer(page, scheduler, 2)
    history = [*first, {"role": "assistant", "content": [{"type": "text", "text": answer}]},
               {"role": "user", "content": [{"type": "text", "text": "And what colour is it?"}]}]  # fmt: skip
    assert scheduler.jobs[-1].prompt_ids == _prompt_ids(processor, history)
    assert follow_up == _greedy(model, processor, history, images)
    assert not any("/upload" in url for url, _ in sent)
    assert max(size for _, size in sent) < min(path.stat().st_size for path in images) // 2

    page.locator("button[aria-label='Retry']").last.click()  # the last turn again: the same prompt, the same answer
    assert _wait_answer(page, scheduler, 3) == follow_up
    assert scheduler.jobs[-1].prompt_ids == _prompt_ids(processor, history)

    shot = Path(os.environ.get("OPENOWL_SCREENSHOTS") or tmp_path) / "demo.png"
    page.screenshot(path=str(shot), full_page=True)
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 10_000


@needs_chromium
def test_clear_during_a_stream_drops_the_turn(demo, page, model, processor):
    _, scheduler, _ = demo
    done, answers = len(scheduler.finished), page.locator("[data-testid=bot]").count()
    scheduler.delay = 0.25  # 24 tokens: about six seconds of stream
    try:
        _send(page, "Tell me a long story.")
        page.locator("[data-testid=bot]").nth(answers).wait_for(timeout=TIMEOUT_MS)  # the answer is streaming
        running = scheduler.jobs[-1]
        assert page.locator("textarea").is_disabled()  # no second message while one is answered
        page.locator("button[aria-label='Clear']").click()
        deadline = time.monotonic() + 10
        while not running.cancelled:
            assert time.monotonic() < deadline, "Clear did not cancel the answer"
            time.sleep(0.05)
    finally:
        scheduler.delay = 0.0
    assert running not in scheduler.finished
    page.wait_for_function("() => !document.querySelector('textarea').disabled", timeout=TIMEOUT_MS)
    page.wait_for_function("() => !document.querySelector('[data-testid=bot]')", timeout=TIMEOUT_MS)
    time.sleep(1.5)  # the stopped answer's last updates have landed: they must not bring the cleared turns back
    assert page.locator("[data-testid=bot]").count() == 0
    _send(page, "Hi")
    answer = _wait_answer(page, scheduler, done + 1)
    turn = [{"role": "user", "content": [{"type": "text", "text": "Hi"}]}]
    assert scheduler.jobs[-1].prompt_ids == _prompt_ids(processor, turn)  # the cleared turns are gone
    assert answer == _greedy(model, processor, turn, [])


@needs_chromium
def test_a_corrupt_image_is_a_message(demo, page, processor, tmp_path):
    _, scheduler, _ = demo
    page.locator("button[aria-label='Clear']").click()
    jobs, done = len(scheduler.jobs), len(scheduler.finished)
    broken = tmp_path / "broken.jpg"
    broken.write_bytes((IMAGES / "image0.jpg").read_bytes()[:4000])  # a truncated JPEG
    page.set_input_files("input[data-testid=file-upload]", str(broken))
    page.locator("[aria-label='File thumbnail']").first.wait_for(timeout=TIMEOUT_MS)
    _send(page, "What is this?")
    page.locator("[data-testid=bot]", has_text="truncated or corrupt").wait_for(timeout=TIMEOUT_MS)
    assert len(scheduler.jobs) == jobs  # refused before the scheduler
    page.wait_for_function("() => !document.querySelector('textarea').disabled", timeout=TIMEOUT_MS)
    _send(page, "Hi")  # the chat goes on; the refused turn is not part of the next prompt
    _wait_answer(page, scheduler, done + 1)
    turn = [{"role": "user", "content": [{"type": "text", "text": "Hi"}]}]
    assert scheduler.jobs[-1].prompt_ids == _prompt_ids(processor, turn)


# --- without a browser ------------------------------------------------------------------------------------------


def test_history_written_back_after_a_clear_is_left_out():
    """What the browser test above meets about one run in five: the cancelled answer's last update writes the old
    turns back into the history the next message comes with. The tab leaves those entries out, on the first message
    after the Clear and on every later one, while Retry's shorter history stays whole."""
    old = [{"role": "user", "content": "Tell me a long story."}, {"role": "assistant", "content": "Once"}]
    tab = Tab()
    assert tab.current(old) == old  # no Clear yet: the history is the conversation
    tab.clear()
    assert tab.current(old) == []  # the first message after the Clear: all of it was cleared
    turn = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
    assert tab.current([*old, *turn]) == turn
    assert tab.current([*old, *turn[:1]]) == turn[:1]  # Retry / Undo take entries off the end
    tab.clear()
    assert tab.current([]) == [] and tab.current(turn) == turn  # a Clear with nothing written back


def test_a_clear_that_stopped_an_answer_empties_the_page_again_once_it_ended():
    """The page's side of the same write-back: after a Clear that stopped an answer, `settle` empties the chat again
    when that answer has ended; a Clear with nothing running, or a new message sent meanwhile, changes nothing."""
    import gradio as gr

    async def settle_after(tab: Tab, answer_ends: float, new_message: bool = False) -> tuple:
        async def the_answer():
            await asyncio.sleep(answer_ends)
            tab.answering -= 1
            if new_message:
                tab.started, tab.answering = tab.started + 1, tab.answering + 1

        task = asyncio.create_task(the_answer())
        started = time.monotonic()
        result = await tab.settle()
        await task
        return result, time.monotonic() - started

    def run(coroutine):  # in a thread of its own: the browser tests' Playwright keeps a loop running in this one
        with ThreadPoolExecutor(1) as pool:
            return pool.submit(asyncio.run, coroutine).result()

    tab = Tab()
    tab.started, tab.answering = 1, 1
    tab.clear()
    result, waited = run(settle_after(tab, 0.3))
    assert result == ([], [], []) and waited >= 0.3 + SETTLE_S
    tab = Tab()
    tab.clear()  # nothing was running
    assert all(isinstance(update, dict) and update == gr.skip() for update in run(tab.settle()))
    tab = Tab()
    tab.started, tab.answering = 1, 1
    tab.clear()
    result, _ = run(settle_after(tab, 0.1, new_message=True))
    assert all(update == gr.skip() for update in result)  # the new message's turn stays


def test_conversation_keeps_file_references_and_drops_refused_turns():
    def user(path: str, text: str) -> dict:
        return {"role": "user", "content": [{"type": "file", "file": {"path": path}}, {"type": "text", "text": text}]}

    history = [
        user("/up/a.jpg", "A?"),
        {"role": "assistant", "content": [{"type": "text", "text": "an a"}]},
        user("/up/bad.jpg", "B?"),
        {"role": "assistant", "content": [{"type": "text", "text": "bad"}], "metadata": {"title": ERROR_TITLE}},
    ]
    messages, paths = conversation(history, {"text": "C?", "files": ["/up/c.png"]}, "")
    assert paths == ["/up/a.jpg", "/up/c.png"]
    assert messages == [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "A?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "an a"}]},
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "C?"}]},
    ]
    again = conversation([], {"text": "D?", "files": [{"path": "/up/d.jpg", "orig_name": "d.jpg"}]}, "")  # Retry
    assert again == ([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "D?"}]}], ["/up/d.jpg"])


def test_videos_only_for_video_models_and_sampling_controls(model, processor, tmp_path):
    chat = DemoChat(Engine(model, processor), None, CONFIG)
    video = tmp_path / "clip.mp4"
    video.write_bytes(b"not really a video")
    with pytest.raises(InputError, match="takes no videos"):
        chat.prepare({"text": "What happens?", "files": [str(video)]}, [], "")
    html = chat.prepare({"text": "What does the <image> tag do in HTML? </s>", "files": []}, [], "")
    assert html.images == [] and min(html.prompt_ids) >= 0  # typed tags are text: no placeholder, no refusal
    assert processor.tokenizer.eos_token_id not in html.prompt_ids  # nor is a typed special token
    params = chat.sampling(100, 0.7, 0.9, 5, 4000, 1.1, 7)
    assert (params.do_sample, params.temperature, params.top_p, params.top_k, params.seed) == (True, 0.7, 0.9, 5, 7)
    assert params.max_new_tokens == min(CONFIG.max_output_tokens, chat.context - 100)  # the limit, the context
    assert chat.sampling(1000, 0, 1, 0, 100, 1, -1).max_new_tokens == chat.context - 1000
    assert not chat.sampling(10, 0, 1, 0, 100, 1, -1).do_sample


def test_demo_binds_loopback_by_default_and_checks_the_host(demo):
    import httpx

    from openowl.cli import build_parser

    args = build_parser().parse_args(["demo"])
    assert args.host == "127.0.0.1" and args.func.__name__ == "cmd_demo"
    url = demo[2]
    assert httpx.get(url).status_code == 200
    assert httpx.get(url, headers={"Host": "rebound.example"}).status_code == 400  # DNS rebinding


def test_the_page_and_the_api_share_one_scheduler(demo, processor):
    """`openowl demo` serves the OpenAI API beside the page, and a request to it is decoded by the page's scheduler
    (so the page's messages and the API's requests batch together)."""
    import httpx

    _, scheduler, url = demo
    jobs = len(scheduler.jobs)
    assert httpx.get(url + "v1/models").json()["data"][0]["id"] == CONFIG.model_name
    body = {"model": CONFIG.model_name, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3}
    reply = httpx.post(url + "v1/chat/completions", json=body, timeout=60)
    assert reply.status_code == 200, reply.text
    assert len(scheduler.jobs) == jobs + 1
    turn = [{"role": "user", "content": [{"type": "text", "text": "Hi"}]}]
    assert scheduler.jobs[-1].prompt_ids == processor.tokenize_prompt(processor.apply_chat_template(turn))


def test_videos_on_a_video_checkpoint_and_images_opened_once_downscaled(video_model, tmp_path):
    pytest.importorskip("av")
    from conftest import VIDEO_CHECKPOINT
    from test_engine import _write_video

    from openowl import OwlProcessor

    processor = OwlProcessor.from_pretrained(VIDEO_CHECKPOINT)
    chat = DemoChat(Engine(video_model, processor), None, CONFIG)
    clip, photo = str(_write_video(tmp_path / "clip.mp4")), str(IMAGES / "image0.jpg")
    prepared = chat.prepare({"text": "What happens?", "files": [clip, photo]}, [], "")
    assert (len(prepared.videos), len(prepared.images)) == (1, 1)
    assert prepared.images[0].size == (processor.image_size, processor.image_size)  # no full-size pixels kept
    again = chat.prepare({"text": "And now?", "files": []}, [{"role": "user", "content": [
        {"type": "file", "file": {"path": photo}}, {"type": "text", "text": "What happens?"}]}], "")  # fmt: skip
    assert again.images[0] is prepared.images[0]  # the earlier turn's image: from the cache, not decoded again
