"""Conversations as messages, and the one place that knows the template strings that render them.

A message is `{"role": "system" | "user" | "assistant", "content": str | list of parts}`, parts being
`{"type": "image"}`, `{"type": "video"}` or `{"type": "text", "text": ...}` (the transformers chat format). Every
caller builds its user turns with `user_message`; inference renders them with `build_prompt` (upstream's
`Human:` / `AI:` template) or `chat_template_prompt` (the language model's own chat template). Training reads
upstream's conversation text back into messages once (`parse_prompt`) and renders them through the same two
templates, cut into the pieces it tokenizes with the answers marked (`render_conversation`, used by
`train/data.py`).

The two renderers return a `Prompt`: the prompt text (a `str`, unchanged) that also remembers where each of its
pieces came from — the template's own text, which may hold special tokens; message text, which the processor
tokenizes as text only (a `<|im_end|>` or `</s>` typed by a user stays characters); image and video parts, which
alone become visual tokens (a literal `<image>` in message text is text).
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Iterable, Sequence
from typing import Any

from transformers import PreTrainedTokenizerBase

from openowl.constants import IMAGE_TAG, VIDEO_TAG

PROMPT_FORMATS = ("mplug-owl", "chat-template")
DEFAULT_SYSTEM = (
    "The following is a conversation between a curious human and AI assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)
HUMAN_PREFIX = "Human: "  # upstream's template: one such line per image, video or text of a user turn
AI_PREFIX = "AI: "  # ... and one before each answer
ROLES = ("system", "user", "assistant")
_HUMAN_LINE = "\n" + HUMAN_PREFIX
_TURN = re.compile(f"\n({re.escape(HUMAN_PREFIX)}|{re.escape(AI_PREFIX)})")  # where a user or an answer line starts
_UPSTREAM_PIECES = re.compile(f"({re.escape(IMAGE_TAG)}|{re.escape(AI_PREFIX)}|{re.escape(_HUMAN_LINE)})")
_IMAGE_PIECES = re.compile(f"({re.escape(IMAGE_TAG)})")
_TAG_PARTS = {IMAGE_TAG: "image", VIDEO_TAG: "video"}
TEMPLATE, TEXT, IMAGE, VIDEO = "template", "text", "image", "video"  # the kinds of a prompt's pieces


class Prompt(str):
    """A rendered prompt: its text, and `pieces`, `(kind, text)` pairs whose texts join into it. A kind is
    `TEMPLATE` (the template's own text: its special tokens are special tokens), `TEXT` (message text: only ever
    text tokens), `IMAGE` or `VIDEO` (the part's tag: where its visual tokens go). String operations give plain
    `str`s, whose tags mean media again (`OwlProcessor.tokenize_prompt`)."""

    pieces: tuple[tuple[str, str], ...]

    def __new__(cls, pieces: Iterable[tuple[str, str]]) -> Prompt:
        pieces = tuple((kind, text) for kind, text in pieces if text)
        prompt = super().__new__(cls, "".join(text for _, text in pieces))
        prompt.pieces = pieces
        return prompt

    def __reduce__(self):
        return Prompt, (self.pieces,)

    def count_media(self, kind: str) -> int:
        """How many `IMAGE` (or `VIDEO`) pieces the prompt holds."""
        return sum(k == kind for k, _ in self.pieces)

    def after(self, start: int) -> Prompt:
        """The prompt less its first `start` characters (as `prompt[start:]`, keeping the pieces' kinds)."""
        out, at = [], 0
        for kind, text in self.pieces:
            if at + len(text) > start:
                out.append((kind, text[max(0, start - at) :]))
            at += len(text)
        return Prompt(out)


def user_message(text: str, num_images: int = 0, num_videos: int = 0) -> dict[str, Any]:
    """A user turn: its images, then its videos, then the text (the order upstream and LLaVA write them in)."""
    parts = [{"type": "image"}] * num_images + [{"type": "video"}] * num_videos + [{"type": "text", "text": text}]
    return {"role": "user", "content": parts}


def assistant_message(text: str) -> dict[str, Any]:
    return {"role": "assistant", "content": [{"type": "text", "text": text}]}


def message_text(message: dict[str, Any]) -> str:
    """The text parts of a message, joined."""
    return "".join(p["text"] for p in _parts(message.get("content", "")) if p["type"] == "text")


def build_prompt(
    messages: Sequence[dict[str, Any]], add_generation_prompt: bool = True, system: str | None = None
) -> Prompt:
    """The upstream template: a system line, then one `Human: ` line per image, video or text, `AI: ` answers.

    Messages are as in this module's docstring. A system message replaces the default system line. With
    `add_generation_prompt` the prompt ends in `AI: `.
    """
    lines = []
    for message in messages:
        role, parts = message.get("role"), _parts(message.get("content", ""))
        if role == "system":
            system = message_text(message)
        elif role == "user":
            lines += [[(TEMPLATE, HUMAN_PREFIX), _piece(part)] for part in parts]
        elif role == "assistant":
            lines.append([(TEMPLATE, AI_PREFIX), (TEXT, message_text(message))])
        else:
            raise ValueError(f"unknown message role {role!r} (expected system, user or assistant)")
    pieces = [(TEMPLATE, DEFAULT_SYSTEM) if system is None else (TEXT, system)]
    for line in lines:
        pieces += [(TEMPLATE, "\n"), *line]
    return Prompt(pieces + [(TEMPLATE, "\n" + AI_PREFIX)] if add_generation_prompt else pieces)


def chat_template_prompt(
    tokenizer: PreTrainedTokenizerBase,
    messages: Sequence[dict[str, Any]],
    add_generation_prompt: bool = True,
    system: str | None = None,
) -> Prompt:
    """A conversation through the tokenizer's own chat template. A user message's images and videos become their
    tags, each on its own line before the message's text (as LLaVA writes them); `system` adds a system message
    (without one, the template's default applies).

    The template renders each part as a unique marker, so that the text between markers is the template's own;
    the markers are then replaced by the parts.

    Raises:
        ValueError: an unknown role or part type, or a template that changes the text of a message (it can't be
            told from the template's own text then).
    """
    marker = f"\x00part-{uuid.uuid4().hex}-"
    found = re.compile(f"{re.escape(marker)}(\\d+)\x00")
    converted = [] if system is None else [{"role": "system", "content": [{"type": "text", "text": system}]}]
    for message in messages:
        if message.get("role") not in ROLES:
            raise ValueError(f"unknown message role {message.get('role')!r} (expected system, user or assistant)")
        converted.append({"role": message["role"], "content": _parts(message.get("content", ""))})
    parts = [_piece(part) for message in converted for part in message["content"]]
    marked, plain, n = [], [], 0
    for message in converted:
        count = len(message["content"])
        marked.append({"role": message["role"], "content": "\n".join(f"{marker}{n + i}\x00" for i in range(count))})
        plain.append({"role": message["role"], "content": "\n".join(text for _, text in parts[n : n + count])})
        n += count
    rendered = found.split(
        tokenizer.apply_chat_template(marked, tokenize=False, add_generation_prompt=add_generation_prompt)
    )
    pieces = [(TEMPLATE, t) if i % 2 == 0 else parts[int(t)] for i, t in enumerate(rendered)]
    prompt = Prompt(pieces)
    expected = tokenizer.apply_chat_template(plain, tokenize=False, add_generation_prompt=add_generation_prompt)
    if prompt != expected:
        raise ValueError("the chat template changes the text of messages, so it can't be told from the template's")
    return prompt


def part_text(part: dict[str, Any]) -> str:
    """A content part as prompt text: an image or video part is its tag.

    Raises:
        ValueError: an unknown part type.
    """
    kind = part.get("type")
    if kind not in ("image", "video", "text"):
        raise ValueError(f"unknown content part type {kind!r} (expected image, video or text)")
    return {"image": IMAGE_TAG, "video": VIDEO_TAG}.get(kind) or part["text"]


def _piece(part: dict[str, Any]) -> tuple[str, str]:
    """A content part as a prompt piece: `(IMAGE | VIDEO, its tag)` or `(TEXT, its text)`."""
    text = part_text(part)
    return (part["type"] if part["type"] in (IMAGE, VIDEO) else TEXT), text


def _parts(content: str | Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{"type": "text", "text": content}] if isinstance(content, str) else list(content)


# --- training: upstream's conversation text and the rendered pieces --------------------------------


def parse_prompt(text: str) -> list[dict[str, Any]]:
    """An upstream conversation text (as upstream's training files hold it) as messages: the inverse of
    `build_prompt(messages, add_generation_prompt=False)`, which gives `text` back exactly.

    Consecutive `Human: ` lines form one user message (a line that is just an `<image>` or `<|video|>` tag becomes
    that part), each `AI: ` line an assistant message. A line starts where "\\n" is followed by one of the two
    prefixes, so a line may span several lines of text. The first line is the system line: a system message unless
    it is upstream's default (left out, so that a chat template's own default applies).
    """
    pieces = _TURN.split(text)
    messages: list[dict[str, Any]] = [] if pieces[0] == DEFAULT_SYSTEM else [{"role": "system", "content": pieces[0]}]
    for prefix, body in zip(pieces[1::2], pieces[2::2], strict=True):
        if prefix == AI_PREFIX:
            messages.append(assistant_message(body))
            continue
        part = {"type": _TAG_PARTS[body]} if body in _TAG_PARTS else {"type": "text", "text": body}
        if messages and messages[-1]["role"] == "user":
            messages[-1]["content"].append(part)
        else:
            messages.append({"role": "user", "content": [part]})
    return messages


def render_conversation(
    messages: Sequence[dict[str, Any]],
    prompt_format: str = "mplug-owl",
    tokenizer: PreTrainedTokenizerBase | None = None,
) -> list[tuple[str, bool]]:
    """A training conversation as the text pieces that are tokenized one by one, each with whether it is an answer
    (the loss is taken on it). Every `<image>` tag is a piece of its own, never an answer.

    - "mplug-owl": upstream's training tokenization (docs/upstream.md, "Conversation tokenization and loss mask").
      The `build_prompt` text is split on `<image>`, `AI: ` and `\\nHuman: `, each kept as a piece, empty pieces
      dropped; the piece right after an `AI: ` piece is an answer (whatever it holds). Upstream appends EOS to each
      answer's ids; the caller does that.
    - "chat-template": the `chat_template_prompt` text (needs `tokenizer`), cut where each answer starts (where the
      inference prompt of the turns before it ends) and after the template's end of that turn (the EOS token,
      included in the answer), so that an answer's ids are those the model generates after the inference prompt.

    Raises:
        ValueError: an unknown prompt format, or "chat-template" without a tokenizer.
    """
    if prompt_format == "mplug-owl":
        return _upstream_pieces(build_prompt(messages, add_generation_prompt=False))
    if prompt_format != "chat-template":
        raise ValueError(f"unknown prompt format {prompt_format!r} (expected one of {', '.join(PROMPT_FORMATS)})")
    if tokenizer is None:
        raise ValueError("the chat-template format needs the tokenizer whose chat template renders it")
    return _chat_template_pieces(tokenizer, messages)


def _upstream_pieces(text: str) -> list[tuple[str, bool]]:
    pieces, after_ai = [], False
    for piece in _UPSTREAM_PIECES.split(text):
        if piece:
            pieces.append((piece, after_ai and piece != IMAGE_TAG))
            after_ai = piece == AI_PREFIX
    return pieces


def _chat_template_pieces(
    tokenizer: PreTrainedTokenizerBase, messages: Sequence[dict[str, Any]]
) -> list[tuple[str, bool]]:
    eos = tokenizer.eos_token
    full = chat_template_prompt(tokenizer, messages, add_generation_prompt=False)
    cuts, answers = [0], set()
    for n, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        start = len(chat_template_prompt(tokenizer, messages[:n], add_generation_prompt=True))
        end = full.find(eos, start)
        end = len(full) if end < 0 else end + len(eos)
        cuts += [start, end]
        answers.add((start, end))
    cuts.append(len(full))
    pieces = []
    for begin, end in zip(cuts, cuts[1:], strict=False):
        answer = (begin, end) in answers
        pieces += [(c, answer and c != IMAGE_TAG) for c in _IMAGE_PIECES.split(full[begin:end]) if c]
    return pieces
