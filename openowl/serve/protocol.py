"""The OpenAI chat-completions request: its typed models (validated with pydantic, every refusal an `APIError`
naming the field), and the two translations to our side: messages -> template messages and media references,
request fields -> `SamplingParams`. The response documents are `render.py`'s."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from openowl.constants import IMAGE_TAG, VIDEO_TAG
from openowl.infer.sampling import SamplingParams
from openowl.serve.errors import APIError

MAX_STOP_STRINGS = 4


# --- requests ------------------------------------------------------------------------------------


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class MediaURL(_Strict):
    url: str
    detail: str | None = None  # accepted and ignored: every image is resized to the model's input size


class ImagePart(_Strict):
    type: Literal["image_url"]
    image_url: MediaURL


class VideoPart(_Strict):
    type: Literal["video_url"]
    video_url: MediaURL


Part = Annotated[TextPart | ImagePart | VideoPart, Field(discriminator="type")]


class Message(_Strict):
    role: Literal["system", "user", "assistant"]
    content: str | list[Part] | None = None


class StreamOptions(_Strict):
    include_usage: bool = False


class ChatCompletionRequest(_Strict):
    model: str
    messages: list[Message] = Field(min_length=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=0)  # extension (as vLLM): sample among the k most likely tokens
    repetition_penalty: float | None = Field(None, gt=0)  # extension (as vLLM)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)  # the newer name of max_tokens
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=0, lt=2**63)
    n: int = Field(1, ge=1)
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logprobs: bool | None = None
    tools: list[Any] | None = None
    response_format: dict[str, Any] | None = None


def parse_request(body: bytes) -> ChatCompletionRequest:
    """Raises APIError (400) naming the first field that is wrong, or saying the body is not JSON."""
    try:
        request = ChatCompletionRequest.model_validate_json(body)
    except ValidationError as err:
        first = max(err.errors(), key=lambda e: len(e["loc"]))  # the deepest: the union branch that was meant
        if first["type"] == "json_invalid":
            raise APIError(400, f"the body is not valid JSON: {first['msg']}", "invalid_json") from None
        param = _param(first["loc"])
        raise APIError(400, f"{param or 'body'}: {first['msg']}", "invalid_value", param) from None
    for name in ("presence_penalty", "frequency_penalty"):
        if getattr(request, name) != 0:
            raise APIError(400, f"{name} is not supported (use repetition_penalty)", "unsupported_parameter", name)
    if request.logprobs or request.tools or (request.response_format or {}).get("type", "text") != "text":
        param = "logprobs" if request.logprobs else "tools" if request.tools else "response_format"
        raise APIError(400, f"{param} is not supported by this server", "unsupported_parameter", param)
    return request


def _param(loc: tuple) -> str:
    """Pydantic's error location -> `messages[0].content[1].image_url.url`, without the union branches' labels."""
    out, tagged, tag_next = "", False, False
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
            tag_next, tagged = tagged, False
            continue
        if tag_next or part in ("str", "int", "float", "bool") or "[" in part:  # a branch label or a tag value
            tagged, tag_next = "tagged-union" in part, False
            continue
        out += f".{part}" if out else part
    return out


# --- messages -> our prompt ----------------------------------------------------------------------


@dataclass(frozen=True)
class MediaRef:
    kind: str  # "image" or "video"
    url: str
    param: str  # where it is in the request, for error messages


def conversation(messages: list[Message]) -> tuple[list[dict[str, Any]], list[MediaRef]]:
    """Request messages -> messages for `processor.apply_chat_template` and the media they reference, in reading order.

    Raises:
        APIError: media outside a user message, or `<image>` / `<|video|>` tags typed in the text.
    """
    out, media = [], []
    for i, message in enumerate(messages):
        content = message.content
        parts = [TextPart(type="text", text=content)] if isinstance(content, str) else list(content or [])
        converted = []
        for j, part in enumerate(parts):
            where = f"messages[{i}].content" + ("" if isinstance(content, str) else f"[{j}]")
            if isinstance(part, TextPart):
                if IMAGE_TAG in part.text or VIDEO_TAG in part.text:
                    raise APIError(400, f"{where}: the text may not contain {IMAGE_TAG} or {VIDEO_TAG}; send images "
                                   "as image_url parts", "invalid_value", where)  # fmt: skip
                converted.append({"type": "text", "text": part.text})
                continue
            kind = "image" if isinstance(part, ImagePart) else "video"
            if message.role != "user":
                raise APIError(400, f"{where}: only user messages may hold images or videos", "invalid_value", where)
            url = part.image_url.url if isinstance(part, ImagePart) else part.video_url.url
            media.append(MediaRef(kind, url, f"{where}.{kind}_url.url"))
            converted.append({"type": kind})
        out.append({"role": message.role, "content": converted})
    return out, media


def sampling_params(request: ChatCompletionRequest, defaults: SamplingParams, max_new_tokens: int) -> SamplingParams:
    """The request's sampling fields over the server's defaults. Temperature 0 is greedy, > 0 samples; fields left
    out keep the server's default (`openowl serve --preset ...`)."""
    changes: dict[str, Any] = {"max_new_tokens": max_new_tokens}
    if request.temperature is not None:
        changes["do_sample"] = request.temperature > 0
        if request.temperature > 0:
            changes["temperature"] = request.temperature
    for name in ("top_p", "top_k", "repetition_penalty", "seed"):
        if getattr(request, name) is not None:
            changes[name] = getattr(request, name)
    stops = [request.stop] if isinstance(request.stop, str) else request.stop
    if stops is not None:
        if len(stops) > MAX_STOP_STRINGS:
            raise APIError(400, f"stop: at most {MAX_STOP_STRINGS} stop strings, got {len(stops)}", "invalid_value",
                           "stop")  # fmt: skip
        changes["stop"] = tuple(stops)
    try:
        return defaults.with_(**changes)
    except ValueError as err:
        raise APIError(400, str(err), "invalid_value") from None
