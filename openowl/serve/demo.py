"""`openowl demo`: a web chat on Gradio's multimodal `ChatInterface`, mounted on the HTTP API's app (`demo_app`).

Each message becomes one scheduler `Job` on the API's own `Scheduler`, as an HTTP chat completion does
(`handler.py`), so browser tabs and API clients are decoded in one batch. Each turn sends the model the whole
conversation, but no image travels twice: Gradio keeps uploaded files on the server and the page sends back only
their paths; each file is opened once, squash-resized to the model's input size at once (`media.open_image`, as the
server does) and kept in a small cache, and the engine's feature cache reuses the earlier images' features. Stop and
Clear cancel the running job (its rows leave the batch before the next step), so a cleared turn never reaches the
next prompt. Bad input (a file that won't decode, a video for a model without video, a conversation too long for the
context, a busy server) is answered as a message in the chat; such a turn is left out of the next prompts.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hmac
import mimetypes
import sys
import tempfile
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from openowl.infer.engine import Engine
from openowl.processing import check_media_count
from openowl.prompts import DEFAULT_SYSTEM
from openowl.serve.config import ServeConfig
from openowl.serve.errors import APIError
from openowl.serve.media import open_image, open_video
from openowl.serve.scheduler import Delta, Failed, Finished, Job, QueueFullError, Scheduler

ERROR_TITLE = "⚠️ not sent to the model"  # the title of an error message in the chat; its turn is left out
MEDIA_CACHE = 64  # opened (downscaled) images and videos kept, by file path
SETTLE_S = 0.5  # after a cleared answer stops: time for the page's own updates of it to land before the last Clear
EXAMPLE_PROMPTS = ("Describe this image in detail.", "What is in these pictures? Compare them.")


class Tab:
    """One browser tab's own state (a `gr.State`, the same object for each of the tab's events): how many times
    its chat was cleared, which a running answer watches, and how many history entries before the last Clear are
    still to be left out.

    Gradio's history can outlive a Clear pressed during a stream: an update of the cancelled answer that was already
    on its way writes the old turns back into the history the next message is sent with, though the page shows none
    of them. So the first message after a Clear counts the history it comes with as cleared, and every later
    message of the tab leaves that many entries out (Retry and Undo only ever take entries off the end). The page
    can show them again too, so a Clear empties the chat once more when the answer it stopped has ended (`settle`).
    """

    def __init__(self):
        self.cleared = 0
        self.started, self.answering = 0, 0  # answers of this tab: ever started, streaming now
        self.stale = 0  # history entries left out of every prompt: what a Clear left behind
        self._fresh = False  # cleared, and no message sent since
        self._stopped: int | None = None  # `started` when a Clear stopped an answer

    def clear(self) -> tuple[list, list, list]:
        self.cleared += 1
        self.stale, self._fresh = 0, True
        self._stopped = self.started if self.answering else None
        return [], [], []

    async def settle(self) -> tuple:
        """After a Clear that stopped an answer: the chat emptied again once that answer has ended and its last
        updates have landed, unless a new message was sent meanwhile. Otherwise nothing changes."""
        import gradio as gr

        stopped, loop = self._stopped, asyncio.get_running_loop()
        deadline = loop.time() + 10
        while stopped is not None and self.answering and self.started == stopped and loop.time() < deadline:
            await asyncio.sleep(0.05)
        await asyncio.sleep(SETTLE_S if stopped is not None else 0)
        if stopped is None or self.started != stopped:
            return gr.skip(), gr.skip(), gr.skip()
        return [], [], []

    def current(self, history: list[dict]) -> list[dict]:
        """The part of `history` that belongs to the conversation since the last Clear."""
        if self._fresh:
            self.stale, self._fresh = len(history), False
        return history[self.stale :]


class InputError(Exception):
    """A message the model can't take; its text is shown in the chat."""


@dataclass(frozen=True)
class Prepared:
    """One turn, ready for the scheduler: the prompt's ids and its media in order."""

    prompt_ids: list[int]
    images: list
    videos: list


# --- the conversation: Gradio's history -> template messages and media --------------------------------------------


def conversation(history: list[dict], message: dict, system: str) -> tuple[list[dict], list[str]]:
    """Gradio's history (messages with text and file parts) and the new message -> messages for
    `processor.apply_chat_template` and the paths of their files, in reading order. Turns answered by an error
    message are left out."""
    turns: list[tuple[list[dict], list[dict]]] = []  # (user messages, answers)
    for item in history:
        if item["role"] == "user":
            if not turns or turns[-1][1]:
                turns.append(([], []))
            turns[-1][0].append(item)
        elif turns:
            turns[-1][1].append(item)
    out = [{"role": "system", "content": system}] if system.strip() else []
    paths: list[str] = []
    for users, answers in turns:
        if any((answer.get("metadata") or {}).get("title") == ERROR_TITLE for answer in answers):
            continue
        for user in users:
            out.append(_user_message(user["content"], paths))
        text = "".join(part["text"] for a in answers for part in a["content"] if part.get("type") == "text")
        if answers:
            out.append({"role": "assistant", "content": [{"type": "text", "text": text}]})
    files = message.get("files") or []  # paths; file dicts when Retry sends a message again
    new = [{"type": "file", "file": {"path": f["path"] if isinstance(f, dict) else f}} for f in files]
    out.append(_user_message([*new, {"type": "text", "text": message.get("text") or ""}], paths))
    return out, paths


def _user_message(content: list[dict], paths: list[str]) -> dict:
    parts = []
    for part in content:
        if part.get("type") == "file":
            path = part["file"]["path"]
            paths.append(path)
            parts.append({"type": media_kind(path)})
        elif part.get("type") == "text" and part["text"]:
            parts.append({"type": "text", "text": part["text"]})
    return {"role": "user", "content": parts}


def media_kind(path: str) -> str:
    mime = mimetypes.guess_type(path)[0] or ""
    return "video" if mime.startswith("video/") else "image"


# --- the chat -----------------------------------------------------------------------------------------------------


class DemoChat:
    """The chat function of the page: a message and its history -> the answer's text as it grows."""

    def __init__(self, engine: Engine, scheduler: Scheduler, config: ServeConfig):
        self.engine, self.scheduler, self.config = engine, scheduler, config
        self.videos = bool(engine.model.config.video)
        positions = getattr(engine.model.language_model.config, "max_position_embeddings", None)  # BLOOM has none
        self.context = positions or config.max_prompt_tokens + config.max_output_tokens
        self._open = functools.lru_cache(MEDIA_CACHE)(self._open_file)

    async def respond(
        self, message: dict, history: list[dict], tab: Tab, system: str, *controls: Any
    ) -> AsyncIterator[Any]:
        """Yields the answer so far after each step; a refusal is one error message. Stops at once when the tab's
        chat is cleared."""
        tab.started, tab.answering = tab.started + 1, tab.answering + 1
        try:
            async with contextlib.aclosing(self._respond(message, tab.current(history), tab, system, *controls)) as run:
                async for update in run:
                    yield update
        finally:  # closing `run` first: its job leaves the batch
            tab.answering -= 1

    async def _respond(
        self, message: dict, history: list[dict], tab: Tab, system: str, *controls: Any
    ) -> AsyncIterator[Any]:
        cleared = tab.cleared
        try:
            prepared = await asyncio.to_thread(self.prepare, message, history, system)
            params = self.sampling(len(prepared.prompt_ids), *controls)
        except InputError as err:
            yield error_message(str(err))
            return
        loop, events = asyncio.get_running_loop(), asyncio.Queue()

        def emit(event) -> None:
            with contextlib.suppress(RuntimeError):  # a closed event loop: the demo is stopping
                loop.call_soon_threadsafe(events.put_nowait, event)

        job = Job(prepared.prompt_ids, [params], emit, prepared.images, prepared.videos)
        try:
            self.scheduler.submit(job)
        except QueueFullError as err:
            yield error_message(f"the model is busy ({err}); send it again in a moment")
            return
        try:
            text = ""
            while not isinstance(event := await events.get(), Finished | Failed):
                if tab.cleared != cleared:
                    return
                text += event.text if isinstance(event, Delta) else ""
                yield text
            if tab.cleared == cleared:
                yield error_message(event.message) if isinstance(event, Failed) else text
        finally:  # Stop, Clear, a closed tab: Gradio cancels this generator, and the job leaves the batch
            job.cancel()

    def prepare(self, message: dict, history: list[dict], system: str) -> Prepared:
        """Raises InputError: media the model can't take, too many of them, or a prompt too long."""
        processor = self.engine.processor
        messages, paths = conversation(history, message, system)
        if len(paths) > self.config.max_images:
            raise InputError(f"the conversation holds {len(paths)} images or videos; the limit is "
                             f"{self.config.max_images} (--max-images): press Clear to start again")  # fmt: skip
        media = [(media_kind(path), self._open(path)) for path in paths]
        prompt = processor.apply_chat_template(messages)
        images = [item for kind, item in media if kind == "image"]
        videos = [item for kind, item in media if kind == "video"]
        try:
            check_media_count([prompt], len(images), len(videos))
        except ValueError as err:  # the template lost or added a media part: never sent half-matched
            raise InputError(str(err)) from None
        ids = processor.tokenize_prompt(prompt)
        limit = min(self.config.max_prompt_tokens, self.context - 1)
        if len(ids) > limit:
            raise InputError(f"the conversation is {len(ids)} tokens long (an image counts "
                             f"{self.engine.model.num_visual_tokens}); the limit is {limit}: press Clear to start "
                             "again")  # fmt: skip
        return Prepared(ids, images, videos)

    def _open_file(self, path: str) -> Any:
        name = Path(path).name
        if media_kind(path) == "video" and not self.videos:
            raise InputError(f"{name}: the model {self.config.model_name!r} takes no videos (a -video checkpoint does)")
        try:
            data = Path(path).read_bytes()
            pixels = self.config.media.max_image_pixels
            if media_kind(path) == "video":
                return open_video(data, name, pixels)
            return open_image(data, name, pixels, self.engine.processor.image_size)
        except APIError as err:
            raise InputError(err.message) from None
        except OSError as err:
            raise InputError(f"{name}: could not be read ({err.strerror or err})") from None

    def sampling(self, prompt_tokens: int, temperature, top_p, top_k, max_tokens, repetition_penalty, seed):
        """The page's controls over the CLI's defaults; max tokens is cut to what the context has room for."""
        room = self.context - prompt_tokens
        changes = {
            "max_new_tokens": max(1, min(int(max_tokens), self.config.max_output_tokens, room)),
            "do_sample": temperature > 0,
            "top_p": float(top_p),
            "top_k": int(top_k),
            "repetition_penalty": float(repetition_penalty),
            "seed": None if seed in (None, "") or seed < 0 else int(seed),
        }
        if temperature > 0:
            changes["temperature"] = float(temperature)
        try:
            return self.config.defaults.with_(**changes)
        except ValueError as err:
            raise InputError(str(err)) from None


def error_message(text: str) -> dict:
    return {"role": "assistant", "content": text, "metadata": {"title": ERROR_TITLE}}


# --- the page -----------------------------------------------------------------------------------------------------


def build_demo(engine: Engine, config: ServeConfig, scheduler: Scheduler | None = None):
    """The Gradio app (not yet launched) and its scheduler (not yet started)."""
    import gradio as gr

    scheduler = scheduler or Scheduler(engine, config.max_batch_size, config.max_queue, config.prefill_chunk)
    chat = DemoChat(engine, scheduler, config)
    defaults = config.defaults
    system = DEFAULT_SYSTEM if engine.processor.prompt_format == "mplug-owl" else ""
    tab, most = gr.State(Tab), min(defaults.max_new_tokens, config.max_output_tokens)
    controls = [
        tab,
        gr.Textbox(system, label="System prompt", lines=2, placeholder="(the model's default)"),
        gr.Slider(0, 2, defaults.temperature if defaults.do_sample else 0, step=0.05, label="Temperature (0: greedy)"),
        gr.Slider(0.05, 1, defaults.top_p, step=0.05, label="Top-p"),
        gr.Slider(0, max(100, defaults.top_k), defaults.top_k, step=1, label="Top-k (0: all)"),
        gr.Slider(1, config.max_output_tokens, most, step=1, label="Max new tokens"),
        gr.Slider(0.5, 2, defaults.repetition_penalty, step=0.05, label="Repetition penalty"),
        gr.Number(-1 if defaults.seed is None else defaults.seed, precision=0, label="Seed (-1: random)"),
    ]
    kinds = "images and videos" if chat.videos else "images"
    textbox = gr.MultimodalTextbox(
        file_count="multiple", file_types=["image", "video"] if chat.videos else ["image"], sources=["upload"],
        placeholder=f"Ask about your {kinds}: drop, paste or attach them (several at once)", stop_btn=True,
    )  # fmt: skip
    demo = gr.ChatInterface(
        chat.respond, multimodal=True, textbox=textbox, additional_inputs=controls,
        additional_inputs_accordion=gr.Accordion("System prompt and sampling", open=False),
        examples=_examples(), run_examples_on_click=False, cache_examples=False,
        title="openowl", description=f"Chat with **{config.model_name}** about {kinds}.",
        concurrency_limit=None, analytics_enabled=False, fill_height=True,
    )  # fmt: skip
    _cancel_on_clear(demo, tab)
    return demo, scheduler


def _cancel_on_clear(demo, tab) -> None:
    """Clear cancels what Stop cancels (the running answer) and empties the conversation once more when that answer
    has ended, so that the stream can't write the cleared turns back (Gradio's own Clear leaves the answer running,
    and its next update restores the conversation, cleared turn included)."""
    stopped = {i for fn in demo.fns.values() if (demo.textbox._id, "stop") in fn.targets for i in fn.cancels}
    if not stopped:
        raise RuntimeError("this Gradio version's ChatInterface has no Stop to follow; Clear could not cancel")
    with demo:
        outputs = [demo.chatbot, demo.chatbot_state, demo.chatbot_value]
        cancels = [demo.fns[i].get_config() for i in sorted(stopped)]
        demo.chatbot.clear(Tab.clear, tab, outputs, queue=False, cancels=cancels).then(Tab.settle, tab, outputs)


@functools.cache
def _example_image() -> str:
    """A picture for the examples: a blue circle beside a red square (what owl-small was trained on)."""
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (224, 224), "white")
    draw = ImageDraw.Draw(image)
    draw.ellipse((20, 60, 110, 150), fill="royalblue")
    draw.rectangle((130, 70, 200, 140), fill="firebrick")
    path = Path(tempfile.mkdtemp(prefix="openowl-demo-")) / "shapes.png"
    image.save(path)
    return str(path)


def _examples() -> list[list]:
    shapes = _example_image()
    return [[{"text": "What shapes are in this image, and what colours are they?", "files": [shapes]}]] + [
        [{"text": text}] for text in EXAMPLE_PROMPTS
    ]


def demo_app(engine: Engine, config: ServeConfig, scheduler: Scheduler | None = None):
    """The HTTP API's app (`create_app`) with the page mounted at `/`: one scheduler decodes the page's messages and
    the API's requests in one batch. The API keeps its routes, key and Host check (which covers the page too); with
    `config.api_key` the page asks for the key as its password."""
    import gradio as gr

    from openowl.serve.app import create_app

    app = create_app(engine, config, scheduler)
    page, _ = build_demo(engine, config, app.state.scheduler)
    page.queue(max_size=config.max_queue, default_concurrency_limit=None)
    key = config.api_key
    auth = None if key is None else (lambda _user, password: hmac.compare_digest(password.encode(), key.encode()))
    return gr.mount_gradio_app(app, page, path="/", auth=auth, max_file_size=config.max_body_bytes, show_error=True)


def run_demo(
    make_engine: Callable[[], Engine], config: ServeConfig, host: str, port: int, open_browser: bool = False
) -> int:
    """Serve the page and the API until interrupted (Ctrl-C)."""
    try:
        import gradio  # noqa: F401
        import uvicorn
    except ImportError as err:
        raise ImportError(f"the demo needs the demo extra: pip install -e '.[demo]' ({err})") from err
    app = demo_app(make_engine(), config)
    shown = f"[{host}]" if ":" in host else host
    url = f"http://{'127.0.0.1' if host in ('0.0.0.0', '::') else shown}:{port}/"
    print(f"openowl demo: open {url} in a browser (the API is at {url}v1)", file=sys.stderr, flush=True)
    if open_browser:
        import threading
        import webbrowser

        threading.Timer(1.5, webbrowser.open, [url]).start()
    uvicorn.run(app, host=host, port=port, log_level="warning")
    return 0
