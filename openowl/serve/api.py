"""The HTTP server: OpenAI's chat-completions API, the model list, health, metrics and the demo page, as a FastAPI app
that is a thin adapter over one `Scheduler` (which owns the model).

A request is checked from the cheapest test to the dearest — body size, JSON and field types, the model name, media
counts, prompt and output tokens, then each image's header and pixels — and every refusal is a 4xx in OpenAI's error
shape that names the limit. Only a valid request takes a place in the bounded queue; a full queue answers 429 with
`Retry-After`. A client that disconnects cancels its request, and its rows leave the batch before the next step.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from importlib import resources
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, Response
from sse_starlette.sse import EventSourceResponse
from starlette.exceptions import HTTPException
from starlette.middleware.trustedhost import TrustedHostMiddleware

from openowl.infer.engine import Engine
from openowl.serve import protocol
from openowl.serve.config import ServeConfig
from openowl.serve.media import open_image, open_video, read_media
from openowl.serve.protocol import APIError, ChatCompletionRequest, MediaRef
from openowl.serve.scheduler import Delta, Failed, Finished, Job, QueueFullError, Scheduler

CHAT_PATH = "/v1/chat/completions"
DECODERS = 2  # images or videos decoded at the same time
_PAGE_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data: blob:; media-src 'self' data: blob:; "
    "style-src 'self' 'unsafe-inline'; script-src 'self'; connect-src 'self'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
}


def create_app(engine: Engine, config: ServeConfig) -> FastAPI:
    """The app; its scheduler thread starts and stops with the app's lifespan (`app.state.scheduler`)."""
    scheduler = Scheduler(engine, config.max_batch_size, config.max_queue)
    statuses: Counter[int] = Counter()  # chat-completion responses by HTTP status

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        scheduler.start()
        yield
        await run_in_threadpool(scheduler.stop)

    app = FastAPI(title="openowl", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.scheduler, app.state.config = scheduler, config
    app.add_middleware(_StatusCounter, counts=statuses)
    if config.allowed_hosts is not None:
        app.add_middleware(TrustedHostMiddleware, allowed_hosts=list(config.allowed_hosts))
    _add_error_handlers(app)
    authorize = _authorizer(config.api_key)
    completions = _Completions(engine, scheduler, config)
    static = resources.files("openowl.serve").joinpath("static")
    page, page_script = static.joinpath("index.html").read_text(), static.joinpath("app.js").read_text()

    @app.get("/", include_in_schema=False)
    async def index() -> HTMLResponse:
        return HTMLResponse(page, headers=_PAGE_HEADERS)

    @app.get("/static/app.js", include_in_schema=False)
    async def script() -> Response:
        return Response(page_script, media_type="text/javascript", headers=_PAGE_HEADERS)

    @app.get("/health")
    async def health() -> JSONResponse:
        ok = scheduler.alive
        return JSONResponse({"status": "ok" if ok else "down", "model": config.model_name}, 200 if ok else 503)

    @app.get("/metrics", dependencies=[Depends(authorize)])
    async def metrics() -> PlainTextResponse:
        return PlainTextResponse(_metrics(scheduler, statuses), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models", dependencies=[Depends(authorize)])
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [_model_card(config.model_name, engine)]}

    @app.get("/v1/models/{model_id:path}", dependencies=[Depends(authorize)])
    async def model(model_id: str) -> dict[str, Any]:
        if model_id != config.model_name:
            raise _unknown_model(model_id, config.model_name)
        return _model_card(model_id, engine)

    @app.post(CHAT_PATH, dependencies=[Depends(authorize)])
    async def chat_completions(request: Request) -> Response:
        return await completions(request)

    return app


# --- chat completions ----------------------------------------------------------------------------


class _Completions:
    """The chat-completions endpoint: validate, prepare, queue, then answer whole or as a stream."""

    def __init__(self, engine: Engine, scheduler: Scheduler, config: ServeConfig):
        self.engine, self.scheduler, self.config = engine, scheduler, config
        positions = getattr(engine.model.language_model.config, "max_position_embeddings", None)  # BLOOM has none
        self.context = positions or config.max_prompt_tokens + config.max_output_tokens
        self.decoding = asyncio.Semaphore(DECODERS)

    async def __call__(self, request: Request) -> Response:
        config = self.config
        if request.headers.get("content-type", "").split(";")[0].strip().lower() != "application/json":
            raise APIError(415, "send the body as Content-Type: application/json", "unsupported_media_type")
        body = protocol.parse_request(await _read_body(request, config.max_body_bytes))
        if body.model != config.model_name:
            raise _unknown_model(body.model, config.model_name)
        if body.n > config.max_batch_size:
            raise APIError(400, f"n: at most {config.max_batch_size} choices (--max-batch-size)", "invalid_value", "n")
        if self.scheduler.waiting >= self.scheduler.max_queue:  # shed load before decoding anything
            raise self._busy(f"{self.scheduler.waiting} requests are waiting (the limit is {config.max_queue})")
        messages, media = protocol.conversation(body.messages)
        self._check_media(media)
        prompt = self.engine.processor.apply_chat_template(messages)
        prompt_ids = await run_in_threadpool(self.engine.processor.tokenize_prompt, prompt)
        params = protocol.sampling_params(body, config.defaults, self._max_new_tokens(body, len(prompt_ids)))
        images, videos = await self._load_media(media)

        loop, events = asyncio.get_running_loop(), asyncio.Queue()
        job = Job(prompt_ids, [params] * body.n, _emitter(loop, events), images, videos)
        try:
            self.scheduler.submit(job)
        except QueueFullError as err:
            raise self._busy(str(err)) from None
        answer = _Answer(protocol.completion_id(), config.model_name, body.n, len(prompt_ids))
        if body.stream:
            include_usage = body.stream_options is not None and body.stream_options.include_usage
            return EventSourceResponse(answer.stream(job, events, include_usage), sep="\n", ping=10)
        return await answer.whole(job, events, request)

    def _busy(self, why: str) -> APIError:
        return APIError(429, f"the server is busy: {why}; retry later", "queue_full", kind="rate_limit_error",
                        headers={"Retry-After": str(self.config.retry_after)})  # fmt: skip

    def _check_media(self, media: list[MediaRef]) -> None:
        if len(media) > self.config.max_images:
            raise APIError(400, f"the request has {len(media)} images or videos; the limit is {self.config.max_images}"
                           " (--max-images)", "too_many_images", "messages")  # fmt: skip
        video = next((m for m in media if m.kind == "video"), None)
        if video and not self.engine.model.config.video:
            message = f"{video.param}: the model {self.config.model_name!r} takes no videos (a -video checkpoint does)"
            raise APIError(400, message, "video_not_supported", video.param)

    def _max_new_tokens(self, body: ChatCompletionRequest, prompt_tokens: int) -> int:
        config = self.config
        asked = body.max_completion_tokens or body.max_tokens
        param = "max_completion_tokens" if body.max_completion_tokens else "max_tokens"
        if prompt_tokens > config.max_prompt_tokens:
            per_image = self.engine.model.num_visual_tokens
            limit = f"the limit is {config.max_prompt_tokens} (--max-prompt-tokens)"
            message = f"the prompt has {prompt_tokens} tokens (an image counts {per_image}); {limit}"
            raise APIError(400, message, "prompt_too_long", "messages")
        if asked is not None and asked > config.max_output_tokens:
            raise APIError(400, f"{param}: {asked} is more than the limit of {config.max_output_tokens} output tokens "
                           "(--max-output-tokens)", "max_tokens_too_large", param)  # fmt: skip
        room = self.context - prompt_tokens
        if room < 1 or (asked is not None and asked > room):
            raise APIError(400, f"the prompt ({prompt_tokens} tokens) and {param} ({asked or 1}) exceed the model's "
                           f"context of {self.context} tokens", "context_length_exceeded", param)  # fmt: skip
        return asked or min(config.defaults.max_new_tokens, config.max_output_tokens, room)

    async def _load_media(self, media: list[MediaRef]) -> tuple[list, list]:
        images, videos = [], []
        pixels, size = self.config.media.max_image_pixels, self.engine.processor.image_size
        for ref in media:
            data = await read_media(ref.url, ref.param, self.config.media)
            async with self.decoding:  # a few at a time: a full-size image can take hundreds of MB while decoded
                if ref.kind == "image":
                    images.append(await run_in_threadpool(open_image, data, ref.param, pixels, size))
                else:
                    videos.append(await run_in_threadpool(open_video, data, ref.param, pixels))
        return images, videos


@dataclass
class _Answer:
    """Turns a job's events into one `chat.completion` or a stream of `chat.completion.chunk`s."""

    id: str
    model: str
    n: int
    prompt_tokens: int

    async def stream(self, job: Job, events: asyncio.Queue, include_usage: bool) -> AsyncIterator[dict[str, str]]:
        try:
            for choice in range(self.n):
                yield self._sse(protocol.chunk(self.id, self.model, choice, {"role": "assistant", "content": ""}))
            open_choices, completion_tokens = self.n, 0
            while open_choices:
                for event in await _pending(events):
                    if isinstance(event, Delta):
                        yield self._sse(protocol.chunk(self.id, self.model, event.choice, {"content": event.text}))
                    elif isinstance(event, Finished):
                        open_choices -= 1
                        completion_tokens += event.completion_tokens
                        yield self._sse(protocol.chunk(self.id, self.model, event.choice, {}, event.reason))
                    else:
                        yield {"data": json.dumps(_failure(event).body())}
                        return
            if include_usage:
                usage = protocol.usage(self.prompt_tokens, completion_tokens)
                yield self._sse(protocol.chunk(self.id, self.model, None, usage_=usage))
            yield {"data": "[DONE]"}
        finally:  # also when the client went away: its rows leave the batch before the next step
            job.cancel()

    async def whole(self, job: Job, events: asyncio.Queue, request: Request) -> Response:
        collect = asyncio.ensure_future(self._collect(events))
        gone = asyncio.ensure_future(_disconnected(request))
        try:
            await asyncio.wait({collect, gone}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            gone.cancel()
            if not collect.done():  # the client left (or the server is stopping): free the rows
                collect.cancel()
                job.cancel()
        if collect.cancelled():
            return Response(status_code=499)  # nobody reads it
        texts, reasons, tokens = collect.result()
        return JSONResponse(protocol.completion(self.id, self.model, texts, reasons, self.prompt_tokens, tokens))

    async def _collect(self, events: asyncio.Queue) -> tuple[list[str], list[str], int]:
        texts, reasons, tokens = [""] * self.n, [""] * self.n, 0
        for _ in range(self.n):
            event = await events.get()
            while isinstance(event, Delta):
                texts[event.choice] += event.text
                event = await events.get()
            if isinstance(event, Failed):
                raise _failure(event)
            reasons[event.choice] = event.reason
            tokens += event.completion_tokens
        return texts, reasons, tokens

    @staticmethod
    def _sse(document: dict[str, Any]) -> dict[str, str]:
        return {"data": json.dumps(document, ensure_ascii=False)}


async def _pending(events: asyncio.Queue) -> list[Delta | Finished | Failed]:
    """The next event and every one already queued behind it, each choice's consecutive text merged into one
    `Delta`: a client that falls behind gets fewer, longer chunks instead of a growing backlog."""
    queued = [await events.get()]
    while not events.empty():
        queued.append(events.get_nowait())
    out, text = [], {}
    for event in queued:
        if isinstance(event, Delta):
            text[event.choice] = text.get(event.choice, "") + event.text
            continue
        if isinstance(event, Finished) and event.choice in text:
            out.append(Delta(event.choice, text.pop(event.choice)))
        out.append(event)
    return out + [Delta(choice, t) for choice, t in text.items()]


def _failure(event: Failed) -> APIError:
    return APIError(500, event.message, "generation_failed", kind="server_error")


def _emitter(loop: asyncio.AbstractEventLoop, events: asyncio.Queue):
    """A thread-safe `emit` for the scheduler: puts each event on the request's asyncio queue."""

    def emit(event) -> None:
        with contextlib.suppress(RuntimeError):  # a closed event loop: the server is stopping
            loop.call_soon_threadsafe(events.put_nowait, event)

    return emit


async def _disconnected(request: Request) -> None:
    """Returns when the client disconnects (the body has been read, so `receive` waits for that)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _read_body(request: Request, limit: int) -> bytes:
    too_large = APIError(413, f"the request body is larger than {limit} bytes (--max-body-bytes)", "body_too_large")
    declared = request.headers.get("content-length")
    if declared is not None and (not declared.isdigit() or int(declared) > limit):
        raise too_large if declared.isdigit() else APIError(400, "bad Content-Length", "invalid_request")
    body = bytearray()
    async for piece in request.stream():
        body += piece
        if len(body) > limit:
            raise too_large
    return bytes(body)


def _unknown_model(name: str, served: str) -> APIError:
    return APIError(404, f"the model {name!r} does not exist; this server serves {served!r}", "model_not_found",
                    "model")  # fmt: skip


def _model_card(name: str, engine: Engine) -> dict[str, Any]:
    return {"id": name, "object": "model", "created": 0, "owned_by": "openowl",
            "capabilities": {"images": True, "videos": bool(engine.model.config.video)}}  # fmt: skip


# --- security, errors, metrics -------------------------------------------------------------------


def _authorizer(api_key: str | None):
    expected = None if api_key is None else api_key.encode()

    async def authorize(request: Request) -> None:
        if expected is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), expected):
            raise APIError(401, "missing or wrong API key (send Authorization: Bearer <key>)", "invalid_api_key",
                           kind="authentication_error")  # fmt: skip

    return authorize


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def api_error(request: Request, err: APIError) -> JSONResponse:
        return JSONResponse(err.body(), err.status, headers=err.headers)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, err: HTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(err.status_code, "http_error")
        body = APIError(err.status_code, str(err.detail), code).body()
        return JSONResponse(body, err.status_code, headers=err.headers)

    @app.exception_handler(Exception)
    async def internal_error(request: Request, err: Exception) -> JSONResponse:
        return JSONResponse(APIError(500, "internal server error", "internal_error", kind="server_error").body(), 500)


class _StatusCounter:
    """Pure ASGI middleware: counts the chat-completion responses by HTTP status."""

    def __init__(self, app, counts: Counter):
        self.app, self.counts = app, counts

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["path"] != CHAT_PATH:
            return await self.app(scope, receive, send)

        async def counting_send(message):
            if message["type"] == "http.response.start":
                self.counts[message["status"]] += 1
            await send(message)

        await self.app(scope, receive, counting_send)


def _metrics(scheduler: Scheduler, statuses: Counter) -> str:
    """Prometheus text format."""
    stats = scheduler.stats
    series = [
        ("requests_total", "counter", "chat-completion responses by HTTP status",
         [(f'{{code="{code}"}}', n) for code, n in sorted(statuses.items())]),
        ("requests_waiting", "gauge", "requests in the queue, waiting for a place in the batch", scheduler.waiting),
        ("queue_limit", "gauge", "the most requests that may wait (--max-queue)", scheduler.max_queue),
        ("batch_rows", "gauge", "rows being decoded (one per choice)", scheduler.running),
        ("batch_rows_limit", "gauge", "the most rows decoded together (--max-batch-size)", scheduler.max_batch_size),
        ("requests_admitted_total", "counter", "requests that entered the batch", stats.admitted),
        ("requests_cancelled_total", "counter", "requests whose client left before the end", stats.cancelled),
        ("requests_failed_total", "counter", "requests that failed inside the model", stats.failed),
        ("prompt_tokens_total", "counter", "prompt tokens prefilled", stats.prompt_tokens),
        ("generation_tokens_total", "counter", "tokens generated", stats.generated_tokens),
        ("decode_steps_total", "counter", "batched decoding steps", stats.steps),
        ("generation_tokens_per_second", "gauge", "tokens generated per second over the last 10 s",
         round(stats.tokens_per_second(), 3)),
    ]  # fmt: skip
    lines = []
    for name, kind, help_, values in series:
        lines += [f"# HELP openowl_{name} {help_}", f"# TYPE openowl_{name} {kind}"]
        lines += [f"openowl_{name}{labels} {v}" for labels, v in values] if isinstance(values, list) else [
            f"openowl_{name} {values}"
        ]  # fmt: skip
    return "\n".join(lines) + "\n"
