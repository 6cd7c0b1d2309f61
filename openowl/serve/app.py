"""The HTTP server as a FastAPI app: thin routes for OpenAI's chat completions and model list, health and metrics,
over one `Scheduler` (which owns the model) started and stopped with the app's lifespan.

A route only parses: the chat route reads the body within its size limit and validates it into a
`ChatCompletionRequest` (in a worker thread: a large body never stalls the event loop, which streams every other
answer); `OpenAIServingChat` (`handler.py`) does the rest. The bytes of the bodies being read, parsed and decoded at
once are bounded (`BytesInFlight`), not only the number of queued requests.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, PlainTextResponse, Response

from openowl.infer.engine import Engine
from openowl.serve import protocol
from openowl.serve.auth import add_cors, add_host_check, api_key_check
from openowl.serve.config import ServeConfig
from openowl.serve.errors import APIError, add_error_handlers, unknown_model
from openowl.serve.handler import OpenAIServingChat
from openowl.serve.metrics import MEDIA_TYPE, StatusCounter, render_metrics
from openowl.serve.protocol import ChatCompletionRequest
from openowl.serve.render import model_card
from openowl.serve.scheduler import Scheduler

CHAT_PATH = "/v1/chat/completions"


def create_app(engine: Engine, config: ServeConfig, scheduler: Scheduler | None = None) -> FastAPI:
    """The app; its scheduler thread (by default a new one over `engine`) starts and stops with the app's lifespan
    (`app.state.scheduler`)."""
    scheduler = scheduler or Scheduler(engine, config.max_batch_size, config.max_queue, config.prefill_chunk)
    statuses: Counter[int] = Counter()  # chat-completion responses by HTTP status

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        scheduler.start()
        yield
        await run_in_threadpool(scheduler.stop)

    app = FastAPI(title="openowl", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.scheduler, app.state.config = scheduler, config
    app.state.inflight = BytesInFlight(config.max_inflight_bytes, config.retry_after)
    app.add_middleware(StatusCounter, counts=statuses, path=CHAT_PATH)
    add_host_check(app, config.allowed_hosts)
    add_error_handlers(app)
    _add_api_routes(app, OpenAIServingChat(engine, scheduler, config), statuses)
    add_cors(app, config.cors_origins)
    return app


def _add_api_routes(app: FastAPI, chat: OpenAIServingChat, statuses: Counter) -> None:
    """Health (open to all), then metrics, the model list and chat completions (behind the API key, if any)."""
    engine, scheduler, config = chat.engine, chat.scheduler, chat.config
    inflight: BytesInFlight = app.state.inflight
    authorize = api_key_check(config.api_key)
    videos = bool(engine.model.config.video)

    @app.get("/health")
    async def health() -> JSONResponse:
        ok = scheduler.alive
        return JSONResponse({"status": "ok" if ok else "down", "model": config.model_name}, 200 if ok else 503)

    @app.get("/metrics", dependencies=[Depends(authorize)])
    async def metrics() -> PlainTextResponse:
        return PlainTextResponse(render_metrics(scheduler, statuses), media_type=MEDIA_TYPE)

    @app.get("/v1/models", dependencies=[Depends(authorize)])
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [model_card(config.model_name, videos)]}

    @app.get("/v1/models/{model_id:path}", dependencies=[Depends(authorize)])
    async def model(model_id: str) -> dict[str, Any]:
        if model_id != config.model_name:
            raise unknown_model(model_id, config.model_name)
        return model_card(model_id, videos)

    @app.post(CHAT_PATH, dependencies=[Depends(authorize)])
    async def chat_completions(request: Request) -> Response:
        async with inflight.hold() as share:  # given back once a stream starts, or a whole answer is made
            body = await _chat_request(request, config.max_body_bytes, share)
            return await chat.create_chat_completion(body, request)


class BytesInFlight:
    """The bytes of the request bodies being read, parsed or decoded at once, and their bound: a request takes its
    share as its body arrives (its whole `Content-Length` at once) and gives it back when it is done. Used from the
    event loop only."""

    def __init__(self, limit: int, retry_after: int):
        self.limit, self.used, self.retry_after = limit, 0, retry_after

    @asynccontextmanager
    async def hold(self) -> AsyncIterator[_Share]:
        share = _Share(self)
        try:
            yield share
        finally:
            self.used -= share.taken

    def take(self, share: _Share, size: int) -> None:
        """Raises APIError (503, with Retry-After) when `size` more bytes would go beyond the bound."""
        if self.used + size > self.limit:
            raise APIError(503, f"the server is busy: {self.used} bytes of requests are being read or decoded (the "
                           f"limit is {self.limit}, --max-inflight-bytes); retry later", "server_overloaded",
                           kind="server_error", headers={"Retry-After": str(self.retry_after)})  # fmt: skip
        self.used += size
        share.taken += size


class _Share:
    """One request's bytes in a `BytesInFlight`."""

    def __init__(self, pool: BytesInFlight):
        self.pool, self.taken = pool, 0

    def cover(self, size: int) -> None:
        """Hold at least `size` bytes."""
        if size > self.taken:
            self.pool.take(self, size - self.taken)


async def _chat_request(request: Request, max_body_bytes: int, share: _Share) -> ChatCompletionRequest:
    """The request's JSON body, read up to `max_body_bytes` and validated (in a worker thread).

    Raises:
        APIError: not `application/json` (415), too large (413), too many bytes in flight (503), or not a valid
            request (400).
    """
    if request.headers.get("content-type", "").split(";")[0].strip().lower() != "application/json":
        raise APIError(415, "send the body as Content-Type: application/json", "unsupported_media_type")
    return await run_in_threadpool(protocol.parse_request, await _read_body(request, max_body_bytes, share))


async def _read_body(request: Request, limit: int, share: _Share) -> bytes:
    too_large = APIError(413, f"the request body is larger than {limit} bytes (--max-body-bytes)", "body_too_large")
    declared = request.headers.get("content-length")
    if declared is not None and (not declared.isdigit() or int(declared) > limit):
        raise too_large if declared.isdigit() else APIError(400, "bad Content-Length", "invalid_request")
    share.cover(int(declared or 0))
    body = bytearray()
    async for piece in request.stream():
        body += piece
        if len(body) > limit:
            raise too_large
        share.cover(len(body))
    return bytes(body)
