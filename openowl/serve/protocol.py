"""The OpenAI chat-completions request: its typed models (validated with pydantic, every refusal an `APIError`
naming the field), and the two translations to our side: messages -> template messages and media references,
request fields -> `SamplingParams`. The response documents are `render.py`'s."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from openowl.infer.sampling import SamplingParams
from openowl.serve.errors import APIError

MAX_STOP_STRINGS = 4


# --- requests ------------------------------------------------------------------------------------


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="allow")  # fields not declared: refused by name (`unsupported`)


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class MediaURL(_Strict):
    url: str  # `detail` may be "auto" or "low" (`NO_OP_VALUES`): the model sees every image at its one input size


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
    """The parameters this server honours. Any other field, here or in a message or part, is refused
    (`unsupported_parameter`) unless it is null or holds its no-op value (`NO_OP_VALUES`): none is silently
    ignored."""

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
    logit_bias: dict[str, float] | None = None  # token id (as a string) -> a bias in [-100, 100] added to its logit
    user: str | None = None  # the end user's id, for the provider's records: this server keeps none


# Fields accepted although not honoured, because the value they hold asks for nothing (null always does).
NO_OP_VALUES: dict[str, tuple[Any, ...]] = {
    "presence_penalty": (0,),
    "frequency_penalty": (0,),
    "logprobs": (False,),
    "top_logprobs": (0,),
    "tools": ([],),
    "tool_choice": ("none",),  # without tools, nothing to call
    "response_format": ({"type": "text"},),
    "modalities": (["text"],),
    "store": (False,),
    "detail": ("auto", "low"),  # of an image_url: the model sees each image at its one (low) input size
}
_HINTS = {
    "presence_penalty": " (use repetition_penalty)",
    "frequency_penalty": " (use repetition_penalty)",
    "detail": " (the model sees every image at its one input size: use auto or low)",
}
MAX_LOGIT_BIAS = 300  # entries, as OpenAI


def parse_request(body: bytes) -> ChatCompletionRequest:
    """Raises APIError (400) naming the first field that is wrong or not supported, or saying the body is not JSON."""
    try:
        request = ChatCompletionRequest.model_validate_json(body)
    except ValidationError as err:
        first = max(err.errors(), key=lambda e: len(e["loc"]))  # the deepest: the union branch that was meant
        if first["type"] == "json_invalid":
            raise APIError(400, f"the body is not valid JSON: {first['msg']}", "invalid_json") from None
        param = _param(first["loc"])
        raise APIError(400, f"{param or 'body'}: {first['msg']}", "invalid_value", param) from None
    refused = unsupported(request)
    if refused:
        name = refused[0]
        others = f" (nor {', '.join(refused[1:])})" if refused[1:] else ""
        hint = _HINTS.get(name.rsplit(".", 1)[-1], "")
        raise APIError(400, f"{name} is not supported by this server{hint}{others}",
                       "unsupported_parameter", name)  # fmt: skip
    return request


def unsupported(model: BaseModel, where: str = "") -> list[str]:
    """The fields of a parsed request that the server would not honour, nested ones as `messages[0].name`: every
    field its models don't declare, unless null or holding its no-op value (`NO_OP_VALUES`)."""
    out = [
        f"{where}{name}" for name, value in (model.model_extra or {}).items()
        if value is not None and not any(_same(value, ok) for ok in NO_OP_VALUES.get(name, ()))
    ]  # fmt: skip
    for name in type(model).model_fields:
        value = getattr(model, name)
        for i, item in enumerate(value if isinstance(value, list) else [value]):
            if isinstance(item, BaseModel):
                out += unsupported(item, f"{where}{name}{f'[{i}]' if isinstance(value, list) else ''}.")
    return out


def _same(value: Any, no_op: Any) -> bool:
    """JSON equality, where `false` is not `0` (nor `true` 1)."""
    return value == no_op and isinstance(value, bool) == isinstance(no_op, bool)


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
        APIError: media outside a user message.
    """
    out, media = [], []
    for i, message in enumerate(messages):
        content = message.content
        parts = [TextPart(type="text", text=content)] if isinstance(content, str) else list(content or [])
        converted = []
        for j, part in enumerate(parts):
            where = f"messages[{i}].content" + ("" if isinstance(content, str) else f"[{j}]")
            if isinstance(part, TextPart):  # text only: an `<image>` in it is characters, as `<|im_end|>` is
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


def sampling_params(
    request: ChatCompletionRequest, defaults: SamplingParams, max_new_tokens: int, vocab_size: int
) -> SamplingParams:
    """The request's sampling fields over the server's defaults. Temperature 0 is greedy, > 0 samples; fields left
    out keep the server's default (`openowl serve --preset ...`). `vocab_size` bounds `logit_bias`'s token ids."""
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
    if request.logit_bias:
        changes["logit_bias"] = logit_bias(request.logit_bias, vocab_size)
    try:
        return defaults.with_(**changes)
    except ValueError as err:
        raise APIError(400, str(err), "invalid_value") from None


def logit_bias(biases: dict[str, float], vocab_size: int) -> tuple[tuple[int, float], ...]:
    """OpenAI's `logit_bias` (token ids as strings -> biases in [-100, 100]) as `SamplingParams.logit_bias`.

    Raises:
        APIError: too many entries, a key that is not a token id of the model, or a bias out of range.
    """
    if len(biases) > MAX_LOGIT_BIAS:
        raise APIError(400, f"logit_bias: at most {MAX_LOGIT_BIAS} tokens, got {len(biases)}", "invalid_value",
                       "logit_bias")  # fmt: skip
    out = []
    for key, bias in biases.items():
        if not (key.isascii() and key.isdigit() and int(key) < vocab_size):
            raise APIError(400, f"logit_bias: {key!r} is not a token id (0 to {vocab_size - 1})", "invalid_value",
                           "logit_bias")  # fmt: skip
        if not -100 <= bias <= 100:
            raise APIError(400, f"logit_bias: the bias of token {key} is {bias}, outside [-100, 100]", "invalid_value",
                           "logit_bias")  # fmt: skip
        out.append((int(key), float(bias)))
    return tuple(out)
