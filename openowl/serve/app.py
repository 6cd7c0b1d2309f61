"""The HTTP server as a FastAPI app: thin routes for OpenAI's chat completions and model list, health, metrics and
the demo page, over one `Scheduler` (which owns the model) started and stopped with the app's lifespan.

A route only parses: the chat route reads the body within its size limit and validates it into a
`ChatCompletionRequest`; `OpenAIServingChat` (`handler.py`) does the rest.
"""

from __future__ import annotations

from collections import Counter
from contextlib import asynccontextmanager
from importlib import resources
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, Response

from openowl.infer.engine import Engine
from openowl.serve import protocol
from openowl.serve.auth import add_host_check, api_key_check
from openowl.serve.config import ServeConfig
from openowl.serve.errors import APIError, add_error_handlers, unknown_model
from openowl.serve.handler import OpenAIServingChat
from openowl.serve.metrics import MEDIA_TYPE, StatusCounter, render_metrics
from openowl.serve.protocol import ChatCompletionRequest
from openowl.serve.render import model_card
from openowl.serve.scheduler import Scheduler

CHAT_PATH = "/v1/chat/completions"
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
    app.add_middleware(StatusCounter, counts=statuses, path=CHAT_PATH)
    add_host_check(app, config.allowed_hosts)
    add_error_handlers(app)
    _add_page_routes(app)
    _add_api_routes(app, OpenAIServingChat(engine, scheduler, config), statuses)
    return app


def _add_page_routes(app: FastAPI) -> None:
    """The demo page (`static/`), served with a strict content security policy."""
    static = resources.files("openowl.serve").joinpath("static")
    page, page_script = static.joinpath("index.html").read_text(), static.joinpath("app.js").read_text()

    @app.get("/", include_in_schema=False)
    async def index() -> HTMLResponse:
        return HTMLResponse(page, headers=_PAGE_HEADERS)

    @app.get("/static/app.js", include_in_schema=False)
    async def script() -> Response:
        return Response(page_script, media_type="text/javascript", headers=_PAGE_HEADERS)


def _add_api_routes(app: FastAPI, chat: OpenAIServingChat, statuses: Counter) -> None:
    """Health (open to all), then metrics, the model list and chat completions (behind the API key, if any)."""
    engine, scheduler, config = chat.engine, chat.scheduler, chat.config
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
        body = await _chat_request(request, config.max_body_bytes)
        return await chat.create_chat_completion(body, request)


async def _chat_request(request: Request, max_body_bytes: int) -> ChatCompletionRequest:
    """The request's JSON body, read up to `max_body_bytes` and validated.

    Raises:
        APIError: not `application/json` (415), too large (413), or not a valid request (400).
    """
    if request.headers.get("content-type", "").split(";")[0].strip().lower() != "application/json":
        raise APIError(415, "send the body as Content-Type: application/json", "unsupported_media_type")
    return protocol.parse_request(await _read_body(request, max_body_bytes))


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
