"""The response side of the wire format: a job's scheduler events rendered as one `chat.completion` document or as
a stream of `chat.completion.chunk` server-sent events ending in `[DONE]`, and the documents those are made of
(completions, chunks, usage, model cards)."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, Response
from sse_starlette.sse import EventSourceResponse

from openowl.serve.errors import APIError
from openowl.serve.scheduler import Delta, Failed, Finished, Job

# --- documents -----------------------------------------------------------------------------------


def completion_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def completion(
    id_: str, model: str, texts: list[str], reasons: list[str], prompt_tokens: int, completion_tokens: int
) -> dict[str, Any]:
    choices = [
        {"index": i, "message": {"role": "assistant", "content": text}, "finish_reason": reason, "logprobs": None}
        for i, (text, reason) in enumerate(zip(texts, reasons, strict=True))
    ]
    return {"id": id_, "object": "chat.completion", "created": int(time.time()), "model": model, "choices": choices,
            "usage": usage(prompt_tokens, completion_tokens)}  # fmt: skip


def chunk(
    id_: str,
    model: str,
    choice: int | None,
    delta: dict[str, str] | None = None,
    finish_reason: str | None = None,
    usage_: dict[str, int] | None = None,
) -> dict[str, Any]:
    """A `chat.completion.chunk`; with `choice=None`, the last one that carries only `usage` (empty choices)."""
    choices = [] if choice is None else [
        {"index": choice, "delta": delta or {}, "finish_reason": finish_reason, "logprobs": None}
    ]  # fmt: skip
    out = {"id": id_, "object": "chat.completion.chunk", "created": int(time.time()), "model": model,
           "choices": choices}  # fmt: skip
    if usage_ is not None:
        out["usage"] = usage_
    return out


def model_card(name: str, videos: bool) -> dict[str, Any]:
    """An entry of `/v1/models`, with what the model accepts besides text."""
    return {"id": name, "object": "model", "created": 0, "owned_by": "openowl",
            "capabilities": {"images": True, "videos": videos}}  # fmt: skip


# --- a job's events -> the answer ----------------------------------------------------------------


@dataclass
class Answer:
    """Turns a job's events into one `chat.completion` or a stream of `chat.completion.chunk`s."""

    id: str
    model: str
    n: int
    prompt_tokens: int

    def streaming(self, job: Job, events: asyncio.Queue, include_usage: bool) -> EventSourceResponse:
        """The answer as a `text/event-stream` response (a comment ping every 10 s keeps idle proxies open)."""
        return EventSourceResponse(self.stream(job, events, include_usage), sep="\n", ping=10)

    async def stream(self, job: Job, events: asyncio.Queue, include_usage: bool) -> AsyncIterator[dict[str, str]]:
        """Server-sent events: a role chunk per choice, text chunks, a finish chunk per choice, usage, `[DONE]`."""
        try:
            for choice in range(self.n):
                yield _sse(chunk(self.id, self.model, choice, {"role": "assistant", "content": ""}))
            open_choices, completion_tokens = self.n, 0
            while open_choices:
                for event in await _pending(events):
                    if isinstance(event, Delta):
                        yield _sse(chunk(self.id, self.model, event.choice, {"content": event.text}))
                    elif isinstance(event, Finished):
                        open_choices -= 1
                        completion_tokens += event.completion_tokens
                        yield _sse(chunk(self.id, self.model, event.choice, {}, event.reason))
                    else:
                        yield {"data": json.dumps(_failure(event).body())}
                        return
            if include_usage:
                yield _sse(chunk(self.id, self.model, None, usage_=usage(self.prompt_tokens, completion_tokens)))
            yield {"data": "[DONE]"}
        finally:  # also when the client went away: its rows leave the batch before the next step
            job.cancel()

    async def whole(self, job: Job, events: asyncio.Queue, request: Request) -> Response:
        """One `chat.completion` once every choice has finished; 499 (and the job cancelled) if the client left."""
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
        return JSONResponse(completion(self.id, self.model, texts, reasons, self.prompt_tokens, tokens))

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


def _sse(document: dict[str, Any]) -> dict[str, str]:
    return {"data": json.dumps(document, ensure_ascii=False)}


def _failure(event: Failed) -> APIError:
    return APIError(500, event.message, "generation_failed", kind="server_error")


async def _disconnected(request: Request) -> None:
    """Returns when the client disconnects (the body has been read, so `receive` waits for that)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass
