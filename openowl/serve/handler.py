"""The chat-completions handler: a parsed `ChatCompletionRequest` checked against the server's limits, turned into
prompt ids (message text tokenized as text only: no special token, no media tag), media and sampling
parameters, queued on the scheduler as one `Job`, and answered whole or as a stream.

A request is checked from the cheapest test to the dearest — (body size, JSON and field types in the route) the
model name, the number of choices, the queue, media counts, the text's length in characters (before anything is
tokenized), prompt and output tokens, then each image's header and pixels — and every refusal is a 4xx in OpenAI's
error shape that names the limit. Only a valid request takes a place in the bounded queue; a full queue answers 429
with `Retry-After`. A client that disconnects cancels its request, and its rows leave the batch before the next
step.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable

from fastapi import Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import Response
from PIL import Image

from openowl.infer.engine import Engine
from openowl.serve import protocol, render
from openowl.serve.config import ServeConfig
from openowl.serve.errors import APIError, unknown_model
from openowl.serve.media import open_image, open_video, read_media
from openowl.serve.protocol import ChatCompletionRequest, MediaRef
from openowl.serve.scheduler import Event, Job, QueueFullError, Scheduler

DECODERS = 2  # images or videos decoded at the same time


class OpenAIServingChat:
    """Serves `POST /v1/chat/completions` over one engine's scheduler: validate, prepare, queue, answer."""

    def __init__(self, engine: Engine, scheduler: Scheduler, config: ServeConfig):
        self.engine, self.scheduler, self.config = engine, scheduler, config
        positions = getattr(engine.model.language_model.config, "max_position_embeddings", None)  # BLOOM has none
        self.context = positions or config.max_prompt_tokens + config.max_output_tokens
        self.decoding = asyncio.Semaphore(DECODERS)

    async def create_chat_completion(self, body: ChatCompletionRequest, request: Request) -> Response:
        """The answer to `body`: a `chat.completion`, or a stream of chunks with `stream: true`.

        Args:
            body: the parsed request.
            request: the HTTP request it came in, watched for the client leaving.

        Raises:
            APIError: a request outside the limits (4xx), or a full queue (429).
        """
        self._check_request(body)
        messages, media = protocol.conversation(body.messages)
        self._check_media(media)
        self._check_text_length(messages)
        prompt_ids = await run_in_threadpool(self._prompt_ids, messages)
        vocab_size = self.engine.model.language_model.config.vocab_size
        max_new_tokens = self._max_new_tokens(body, len(prompt_ids))
        params = protocol.sampling_params(body, self.config.defaults, max_new_tokens, vocab_size)
        images, videos = await self._load_media(media)

        loop, events = asyncio.get_running_loop(), asyncio.Queue()
        job = Job(prompt_ids, [params] * body.n, _emitter(loop, events), images, videos)
        try:
            self.scheduler.submit(job)
        except QueueFullError as err:
            raise self._busy(str(err)) from None
        answer = render.Answer(render.completion_id(), self.config.model_name, body.n, len(prompt_ids))
        if body.stream:
            include_usage = body.stream_options is not None and body.stream_options.include_usage
            return answer.streaming(job, events, include_usage)
        return await answer.whole(job, events, request)

    def _check_request(self, body: ChatCompletionRequest) -> None:
        config = self.config
        if body.model != config.model_name:
            raise unknown_model(body.model, config.model_name)
        if body.n > config.max_batch_size:
            raise APIError(400, f"n: at most {config.max_batch_size} choices (--max-batch-size)", "invalid_value", "n")
        if self.scheduler.waiting >= self.scheduler.max_queue:  # shed load before decoding anything
            raise self._busy(f"{self.scheduler.waiting} requests are waiting (the limit is {config.max_queue})")

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

    def _check_text_length(self, messages: list[dict]) -> None:
        """Refuse, before rendering or tokenizing anything, text too long for `--max-prompt-tokens` whatever its
        tokens: no token covers more than `max_token_chars` characters."""
        chars = sum(len(part["text"]) for message in messages for part in message["content"] if part["type"] == "text")
        per_token, limit = self.engine.processor.max_token_chars, self.config.max_prompt_tokens
        if chars > limit * per_token:
            raise APIError(400, f"the messages hold {chars} characters of text, more than {limit} tokens of at most "
                           f"{per_token} characters each can hold; the limit is {limit} prompt tokens "
                           "(--max-prompt-tokens)", "prompt_too_long", "messages")  # fmt: skip

    def _prompt_ids(self, messages: list[dict]) -> list[int]:
        """The prompt's ids: its message text tokenized as text only, its images and videos as placeholders."""
        processor = self.engine.processor
        return processor.tokenize_prompt(processor.apply_chat_template(messages))

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

    async def _load_media(self, media: list[MediaRef]) -> tuple[list[Image.Image], list[list[Image.Image]]]:
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


def _emitter(loop: asyncio.AbstractEventLoop, events: asyncio.Queue) -> Callable[[Event], None]:
    """A thread-safe `emit` for the scheduler: puts each event on the request's asyncio queue."""

    def emit(event: Event) -> None:
        with contextlib.suppress(RuntimeError):  # a closed event loop: the server is stopping
            loop.call_soon_threadsafe(events.put_nowait, event)

    return emit
