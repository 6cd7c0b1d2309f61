"""Training data: reading sample files into messages, tokenizing them with their loss mask, the dataset, batching.

- Readers (`read_samples`) turn upstream training jsonl, LLaVA-style conversations and image–caption pairs into
  `Sample`s: the conversation as messages (the chat format of `openowl.prompts`) and its image paths. Upstream's
  conversation text is parsed into messages once, as it is read (`prompts.parse_prompt`).
- `tokenize_conversation` renders the messages through upstream's template and tokenizes them exactly as upstream
  does (docs/upstream.md, "Conversation tokenization and loss mask"): each piece of `prompts.render_conversation`
  on its own, an answer followed by EOS and taking the loss (with its EOS), everything else — system line,
  questions, delimiters, image placeholders — context. Checkpoints with `prompt_format: chat-template`
  (owl-small) go through `tokenize_chat_conversation` instead: the same messages rendered by the language
  model's chat template, with the same masks. `tokenize_sample` picks the one of a processor.
- `TrainDataset` tokenizes every sample up front, checks its images, and drops (and reports) the samples it can't
  train on; `collate` right-pads a batch; `LengthGroupedSampler` batches samples of similar length.
"""

from __future__ import annotations

import json
import logging
import math
from array import array
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image, UnidentifiedImageError
from transformers import PreTrainedTokenizerBase

from openowl import files
from openowl.constants import IGNORE_INDEX, IMAGE_PLACEHOLDER_ID, IMAGE_TAG
from openowl.processing import OwlProcessor, media_count_mismatch
from openowl.prompts import DEFAULT_SYSTEM, assistant_message, build_prompt, parse_prompt, render_conversation
from openowl.train.features import FeatureCache
from openowl.train.transforms import eval_transform, make_generator, train_transform

logger = logging.getLogger(__name__)


@dataclass
class TokenizedSample:
    """`input_ids` is `max_length + 1` long (right-padded); the three masks are `max_length` long and aligned
    with next-token targets: position t says whether token t + 1 is real, text, and part of an answer."""

    input_ids: torch.Tensor
    non_padding_mask: torch.Tensor
    non_media_mask: torch.Tensor
    answer_mask: torch.Tensor
    num_images: int
    answers_cut: int = 0  # answers that truncation cut short: partly kept, their EOS lost

    @property
    def labels(self) -> torch.Tensor:
        """transformers-style labels: the ids where a loss is taken, IGNORE_INDEX elsewhere."""
        keep = self.non_padding_mask * self.non_media_mask * self.answer_mask
        labels = self.input_ids.clone()
        labels[1:][keep == 0] = IGNORE_INDEX
        labels[0] = IGNORE_INDEX
        return labels

    @property
    def num_supervised(self) -> int:
        return int((self.non_padding_mask * self.non_media_mask * self.answer_mask).sum())

    @property
    def length(self) -> int:
        """The number of real tokens (BOS and image placeholders included), before the right padding."""
        return int(self.non_padding_mask.sum()) + 1


def tokenize_conversation(
    messages: Sequence[dict[str, Any]], tokenizer: PreTrainedTokenizerBase, max_length: int, num_visual_tokens: int = 65
) -> TokenizedSample:
    """Tokenize one training conversation exactly as upstream does (docs/upstream.md): BOS, then each piece of
    `render_conversation(messages, "mplug-owl")` on its own, an `<image>` as `num_visual_tokens` placeholders.

    An image block that would not fit is dropped whole; other pieces are cut to the room left, and an answer
    keeps its EOS only if there is room for it (`answers_cut` counts those that lost it).
    """
    room = max_length + 1
    ids: list[int] = [tokenizer.bos_token_id]
    is_answer: list[int] = [0]
    cut = 0
    for piece, answer in render_conversation(messages, "mplug-owl"):
        left = room - len(ids)
        if piece == IMAGE_TAG:
            if num_visual_tokens <= left:
                ids += [IMAGE_PLACEHOLDER_ID] * num_visual_tokens
                is_answer += [0] * num_visual_tokens
            continue
        tokens = tokenizer(piece, add_special_tokens=False)["input_ids"]
        if answer:
            cut += 0 < left < len(tokens) + 1
            tokens = (tokens + [tokenizer.eos_token_id])[:left]
        else:
            tokens = tokens[:left]
        ids += tokens
        is_answer += [int(answer)] * len(tokens)
    sample = _padded(ids, is_answer, max_length, tokenizer.pad_token_id, num_visual_tokens)
    sample.answers_cut = cut
    return sample


def tokenize_chat_conversation(
    messages: Sequence[dict[str, Any]], processor: OwlProcessor, max_length: int
) -> TokenizedSample:
    """Tokenize a training conversation through the language model's chat template (`prompt_format:
    chat-template`), with the same masks as `tokenize_conversation`.

    Each answer's text is supervised up to and including the template's end-of-turn (EOS) token; everything else
    — system text, user turns, role headers, image placeholders — is context (`render_conversation`). A
    conversation longer than `max_length + 1` ids is cut there, an image block that would not fit whole dropped
    (`answers_cut` counts the answers cut short, their end of turn lost).
    """
    tokenizer, visual = processor.tokenizer, processor.num_visual_tokens
    ids: list[int] = []
    is_answer: list[int] = []
    answers: list[tuple[int, int]] = []  # (start, end) of each answer's ids
    for piece, answer in render_conversation(messages, "chat-template", tokenizer):
        if piece == IMAGE_TAG:
            tokens = [IMAGE_PLACEHOLDER_ID] * visual
        else:
            tokens = tokenizer(piece, add_special_tokens=False)["input_ids"]
        if answer:
            answers.append((len(ids), len(ids) + len(tokens)))
        ids += tokens
        is_answer += [int(answer)] * len(tokens)
    cut = max_length + 1
    if len(ids) > cut:
        if ids[cut - 1] == IMAGE_PLACEHOLDER_ID and ids[cut] == IMAGE_PLACEHOLDER_ID:  # mid-block
            while cut > 0 and ids[cut - 1] == IMAGE_PLACEHOLDER_ID:
                cut -= 1
        ids, is_answer = ids[:cut], is_answer[:cut]
    sample = _padded(ids, is_answer, max_length, tokenizer.pad_token_id, visual)
    sample.answers_cut = sum(start < cut < end for start, end in answers)
    return sample


def tokenize_sample(messages: Sequence[dict[str, Any]], processor: OwlProcessor, max_length: int) -> TokenizedSample:
    """Tokenize a training conversation in the processor's prompt format (`tokenize_conversation` or
    `tokenize_chat_conversation`)."""
    if processor.prompt_format == "chat-template":
        return tokenize_chat_conversation(messages, processor, max_length)
    return tokenize_conversation(messages, processor.tokenizer, max_length, processor.num_visual_tokens)


def _padded(
    ids: list[int], is_answer: list[int], max_length: int, pad_token_id: int, num_visual_tokens: int
) -> TokenizedSample:
    """A sample's ids (at most `max_length + 1`) and answer flags, right-padded, with the masks of their targets."""
    pad = max_length + 1 - len(ids)
    input_ids = torch.tensor(ids + [pad_token_id] * pad, dtype=torch.long)
    answer = torch.tensor(is_answer + [0] * pad, dtype=torch.long)
    return TokenizedSample(
        input_ids=input_ids,
        non_padding_mask=(torch.arange(max_length) < len(ids) - 1).long(),
        non_media_mask=(input_ids[1:] >= 0).long(),
        answer_mask=answer[1:],
        num_images=ids.count(IMAGE_PLACEHOLDER_ID) // num_visual_tokens,
    )


# --- samples and readers -------------------------------------------------------------------------

FORMATS = ("auto", "upstream", "llava", "caption")
IMAGE_CHECKS = ("verify", "decode", "none")  # how `TrainDataset` checks images up front
_HUMAN_ROLES = {"human", "user"}
_AI_ROLES = {"gpt", "assistant"}


@dataclass
class Sample:
    """One training conversation as messages (`openowl.prompts`), with the paths of its images in `<image>` order."""

    id: str
    messages: list[dict[str, Any]]
    images: list[Path] = field(default_factory=list)

    def __post_init__(self):
        self.images = [Path(p) for p in self.images]


def llava_messages(conversations: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """A LLaVA conversation (`[{"from": "human" | "gpt", "value": ...}, ...]`) as messages.

    Each `<image>` in a human turn becomes an image part of its own, placed before the rest of the turn (which is
    how upstream writes images, and where LLaVA moves its tag too): "<image>\\nWhat is this?" gives an image part,
    then the text "What is this?". Consecutive human turns form one user message; gpt turns become assistant
    messages. Turn values are stripped of surrounding whitespace. `user` / `assistant` are accepted for `human` /
    `gpt`; a leading `system` turn becomes a system message (left out when it is upstream's default).

    Raises:
        ValueError: a turn that isn't an object with a known `from` and a string `value`.
    """
    messages: list[dict[str, Any]] = []
    for n, turn in enumerate(conversations):
        if not isinstance(turn, dict) or not isinstance(turn.get("value"), str):
            raise ValueError(f"turn {n} is not an object with a string 'value'")
        role, value = turn.get("from"), turn["value"]
        if role in _HUMAN_ROLES:
            rest = value.replace(IMAGE_TAG, "").strip()
            parts = [{"type": "image"}] * value.count(IMAGE_TAG) + ([{"type": "text", "text": rest}] if rest else [])
            if parts and messages and messages[-1]["role"] == "user":
                messages[-1]["content"] += parts
            elif parts:
                messages.append({"role": "user", "content": parts})
        elif role in _AI_ROLES:
            messages.append(assistant_message(value.strip()))
        elif role == "system" and n == 0:
            if value.strip() != DEFAULT_SYSTEM:
                messages.append({"role": "system", "content": value.strip()})
        else:
            raise ValueError(f"turn {n} has an unknown 'from': {role!r} (expected human or gpt)")
    return messages


def caption_messages(caption: str) -> list[dict[str, Any]]:
    """The stage-1 (pre-training) conversation for an image–caption pair: the image as the user's turn, the
    caption (stripped) as the answer.

    Upstream never released its stage-1 data or prompt, so this is our choice: the same template as instruction
    tuning (with its default system line), so the loss falls on the caption alone.
    """
    return [{"role": "user", "content": [{"type": "image"}]}, assistant_message(caption.strip())]


def image_count_mismatch(sample: Sample) -> str | None:
    """None when the sample's conversation has one `<image>` per listed image, else what differs
    (`processing.media_count_mismatch`)."""
    return media_count_mismatch([build_prompt(sample.messages, add_generation_prompt=False)], len(sample.images))


def read_samples(path: str | Path, image_root: str | Path | None = None, format: str = "auto") -> list[Sample]:
    """Read a training file into `Sample`s.

    Files are jsonl (one JSON object a line; blank lines are skipped) or a JSON array of objects. Formats:

    - "upstream": `{"text": conversation, "image": [paths], "task_type": "..._sft"}`, the text parsed by
      `prompts.parse_prompt`; `image` optional (text-only) and may be a single path; `task_type` is ignored.
    - "llava": `{"id", "image": path or [paths], "conversations": [{"from": "human" | "gpt", "value"}]}`, converted
      by `llava_messages`; `image` optional.
    - "caption": `{"image": path, "caption": text}`, converted by `caption_messages` (stage 1).
    - "auto": chosen from the first record's keys: `conversations` → llava, `caption` → caption, `text` → upstream.

    A record's `id` (string or number) is kept; without one the id is its 1-based line number (jsonl) or its
    0-based index (JSON array). Image paths are relative to `image_root`, or to the file's folder without one.

    Args:
        path: the file.
        image_root: the folder image paths are relative to (default: the file's folder).
        format: one of "auto", "upstream", "llava", "caption".

    Returns:
        The samples, in file order.

    Raises:
        FileNotFoundError: no such file.
        ValueError: an unknown format, a file whose format can't be told, or a malformed record (invalid JSON, a
            missing or mistyped field, not as many `<image>` tags as images listed); the message names `file:line`
            (jsonl) or `file[index]` (JSON array).
    """
    if format not in FORMATS:
        raise ValueError(f"unknown format {format!r} (expected one of {', '.join(FORMATS)})")
    path = Path(path)
    root = Path(image_root) if image_root is not None else path.parent
    records = _read_records(path)
    if format == "auto":
        format = detect_format(records[0][0], records[0][2]) if records else "upstream"
    return [record_sample(record, default_id, root, format, where) for where, default_id, record in records]


def record_sample(record: dict[str, Any], default_id: str, root: Path, format: str, where: str) -> Sample:
    """One record (a jsonl row's object) of a known format (not "auto") as a `Sample`, its image paths relative
    to `root`.

    Raises:
        ValueError: a missing or mistyped field, or not as many `<image>` tags as images; the message starts with
            `where`.
    """
    convert = {"upstream": _upstream_sample, "llava": _llava_sample, "caption": _caption_sample}[format]
    try:
        sample = convert(record, default_id, root)
        _check_image_count(sample)
    except ValueError as err:
        raise ValueError(f"{where}: {err}") from None
    return sample


def _read_records(path: Path) -> list[tuple[str, str, dict[str, Any]]]:
    """(location, default id, object) for each record of a jsonl file or JSON array."""
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    text = path.read_text(encoding="utf-8")
    if text.lstrip().startswith("["):
        try:
            items = json.loads(text)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}:{err.lineno}: not valid JSON ({err.msg})") from None
        records = [(f"{path}[{i}]", str(i), item) for i, item in enumerate(items)]
    else:
        records = []
        for lineno, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                records.append((f"{path}:{lineno}", str(lineno), json.loads(line)))
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{lineno}: not valid JSON ({err.msg})") from None
    for where, _, record in records:
        if not isinstance(record, dict):
            raise ValueError(f"{where}: expected a JSON object, got {type(record).__name__}")
    return records


def detect_format(where: str, record: dict[str, Any]) -> str:
    for key, format in (("conversations", "llava"), ("caption", "caption"), ("text", "upstream")):
        if key in record:
            return format
    raise ValueError(
        f"{where}: can't tell the format (no 'conversations', 'caption' or 'text' field); keys: {sorted(record)}"
    )


def _sample_id(record: dict[str, Any], default: str) -> str:
    value = record.get("id")
    if value is None:
        return default
    if not isinstance(value, str | int):
        raise ValueError(f"'id' must be a string or a number, not {type(value).__name__}")
    return str(value)


def image_paths(record: dict[str, Any], root: Path, required: bool = False) -> list[Path]:
    """A record's `image` field (a path or a list of them) as paths under `root`. Raises ValueError when it is
    missing (`required`) or not paths."""
    value = record.get("image")
    if value is None:
        if required:
            raise ValueError("no 'image' field")
        return []
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list) or not all(isinstance(p, str) and p for p in items):
        raise ValueError("'image' must be a path or a list of paths")
    return [root / p for p in items]


def _string_field(record: dict[str, Any], key: str) -> str:
    value = record.get(key)
    if not isinstance(value, str):
        raise ValueError(f"'{key}' must be a string" if key in record else f"no '{key}' field")
    return value


def _upstream_sample(record: dict[str, Any], default_id: str, root: Path) -> Sample:
    text = _string_field(record, "text")
    return Sample(_sample_id(record, default_id), parse_prompt(text), image_paths(record, root))


def _llava_sample(record: dict[str, Any], default_id: str, root: Path) -> Sample:
    conversations = record.get("conversations")
    if not isinstance(conversations, list) or not conversations:
        raise ValueError("'conversations' must be a non-empty list")
    return Sample(_sample_id(record, default_id), llava_messages(conversations), image_paths(record, root))


def _caption_sample(record: dict[str, Any], default_id: str, root: Path) -> Sample:
    caption = _string_field(record, "caption")
    if not caption.strip():
        raise ValueError("empty 'caption'")
    images = image_paths(record, root, required=True)
    if len(images) != 1:
        raise ValueError(f"a caption record needs one image, got {len(images)}")
    return Sample(_sample_id(record, default_id), caption_messages(caption), images)


def _check_image_count(sample: Sample) -> None:
    problem = image_count_mismatch(sample)
    if problem:
        raise ValueError(f"the text has {problem} are listed")


# --- the dataset ---------------------------------------------------------------------------------


class TrainDataset(torch.utils.data.Dataset):
    """Tokenized training samples with their images, ready for `collate`.

    At construction every sample is checked and tokenized with `tokenize_sample` (in the processor's prompt
    format); a sample is left out (and never silently replaced by another) when:

    - its conversation holds a different number of `<image>` tags than it lists images (`image_count_mismatch`),
    - one of its images is missing or unreadable (see `check_images`),
    - truncation to `max_length` dropped one of its image blocks (it would train as text-only on answers about an
      image it never sees),
    - no token of it is supervised (truncation to `max_length` cut every answer; these would give a NaN loss
      upstream).

    Answers that truncation cut short (partly kept, their EOS lost) are counted (`answers_cut`), not dropped. One
    warning per kind gives the count and a few ids.

    Every left-out sample is in `skipped` as `(id, reason)`; `report()` summarises them. Only the real tokens are
    kept (compactly: int32 ids and a boolean loss mask), so a sample of the dataset is at most `max_length + 1`
    tokens long.

    Items are dicts: `input_ids` (L,) and `labels` (L,) int64 (`IGNORE_INDEX` where no loss is taken),
    `pixel_values` `(num_images, 3, size, size)` float32, `id`. With `train=True` (and `augment`) images go through
    `train_transform` with a generator seeded from `(seed, epoch, index)`: the same index in the same epoch always
    gets the same crop, whatever the worker. Call `set_epoch` before each epoch (before `iter(loader)`; with
    `persistent_workers` the workers would keep the epoch they started with). With `train=False` or
    `augment=False`, `eval_transform`. With a feature cache (`features`) an item carries the images' cached ViT
    outputs as `vision_tokens` `(num_images, 257, C)` float32 instead of pixels (`pixel_values` None), looked up by
    the sha256 of each image file's bytes.

    An image that passes the check but fails to load later (a truncated JPEG passes "verify") never stops a run:
    the item comes back with no supervised token (all labels `IGNORE_INDEX`, black pixels in the image's place, so
    the batch keeps its shape and adds nothing to the loss), and the sample joins `skipped` and `failed` (upstream
    silently trained on another sample instead). An image missing from the feature cache is treated the same way
    (zero `vision_tokens` in its place).

    Args:
        samples: the samples (see `read_samples`).
        processor: gives the tokenizer, image size, mean/std and the number of visual tokens per image.
        max_length: the upstream `max_length` (sequences hold at most `max_length + 1` tokens).
        train: random crops and flips (True) or the deterministic eval resize (False).
        seed: the seed of the image augmentation.
        check_images: how images are checked at construction (`IMAGE_CHECKS`): "verify" (PIL open + verify: reads
            headers and structure, fast, but a truncated JPEG passes), "decode" (a full decode of every image,
            slow, catches truncation) or "none".
        augment: with `train`, random crops and flips (True) or the eval transform (False: deterministic images,
            as a feature cache needs).
        features: a frozen ViT's cached outputs (`openowl.train.features`), used instead of the images' pixels.
    """

    def __init__(
        self,
        samples: Sequence[Sample],
        processor: OwlProcessor,
        max_length: int,
        train: bool = True,
        seed: int = 0,
        check_images: str = "verify",
        augment: bool = True,
        features: FeatureCache | None = None,
    ):
        if check_images not in IMAGE_CHECKS:
            raise ValueError(f"check_images must be 'verify', 'decode' or 'none', not {check_images!r}")
        self.processor = processor
        self.max_length = max_length
        self.train = train
        self.augment = augment
        self.features = features
        self.seed = seed
        self.epoch = 0
        self.skipped: list[tuple[str, str]] = []
        self.failed: dict[str, str] = {}  # id -> why its image failed to load after the check
        self.samples: list[Sample] = []
        self.answers_cut = 0
        self._num_images: list[int] = []
        self._offsets = array("q", [0])
        ids, supervised = array("i"), array("b")
        image_problems: dict[Path, str | None] = {}
        left_out: dict[str, list[str]] = {"unsupervised": [], "images": [], "image_cut": [], "answer_cut": []}
        for sample in samples:
            kind, problem, tokens = self._admit(sample, image_problems, check_images)
            if problem:
                self.skipped.append((sample.id, problem))
                left_out[kind].append(sample.id)
                continue
            if tokens.answers_cut:
                self.answers_cut += tokens.answers_cut
                left_out["answer_cut"].append(sample.id)
            length = tokens.length
            ids.extend(tokens.input_ids[:length].tolist())
            supervised.extend((tokens.labels[:length] != IGNORE_INDEX).tolist())
            self._offsets.append(len(ids))
            self._num_images.append(tokens.num_images)
            self.samples.append(sample)
        self._ids = torch.frombuffer(ids, dtype=torch.int32).clone() if ids else torch.zeros(0, dtype=torch.int32)
        self._supervised = (
            torch.frombuffer(supervised, dtype=torch.int8).bool() if ids else torch.zeros(0, dtype=torch.bool)
        )
        _warn_left_out(len(samples), max_length, left_out)

    def _admit(
        self, sample: Sample, image_problems: dict[Path, str | None], check_images: str
    ) -> tuple[str, str | None, TokenizedSample | None]:
        """(kind, why the sample is left out or None, its tokens)."""
        problem = image_count_mismatch(sample)
        if problem is None and check_images != "none":
            checks = (_check_image(p, image_problems, decode=check_images == "decode") for p in sample.images)
            problem = next(filter(None, checks), None)
        if problem:
            return "images", problem, None
        tokens = tokenize_sample(sample.messages, self.processor, self.max_length)
        if tokens.num_images < len(sample.images):
            dropped = len(sample.images) - tokens.num_images
            why = f"truncation to max_length={self.max_length} dropped {dropped} of its {len(sample.images)} image(s)"
            return "image_cut", why, tokens
        if tokens.num_supervised == 0:
            return "unsupervised", f"no supervised token within max_length={self.max_length}", tokens
        return "", None, tokens

    def __len__(self) -> int:
        return len(self.samples)

    @property
    def lengths(self) -> list[int]:
        """The number of tokens of each sample (image placeholders included), for length grouping."""
        offsets = self._offsets
        return [offsets[i + 1] - offsets[i] for i in range(len(self.samples))]

    @property
    def ids(self) -> list[str]:
        return [s.id for s in self.samples]

    def set_epoch(self, epoch: int) -> None:
        """Select the augmentation stream of `epoch` (crops and flips differ from epoch to epoch)."""
        self.epoch = epoch

    def add_failed(self, failed: dict[str, str]) -> None:
        """Record samples whose images failed to load (in this process or, gathered, in others) as skipped."""
        for sample_id, reason in failed.items():
            if sample_id not in self.failed:
                self.failed[sample_id] = reason
                self.skipped.append((sample_id, reason))

    def report(self, limit: int | None = 100) -> str:
        """A summary of the samples left out: their count, then one `id: reason` line each (the first `limit`);
        then the number of answers truncation cut short."""
        total = len(self.samples) + len(self.skipped) - len(self.failed)  # a failed sample is in both
        cut = f"\n{self.answers_cut} answer(s) cut short by truncation (EOS lost)" if self.answers_cut else ""
        if not self.skipped:
            return f"all {total} samples kept" + cut
        shown = self.skipped if limit is None else self.skipped[:limit]
        lines = [f"skipped {len(self.skipped)} of {total} samples:"]
        lines += [f"  {sample_id}: {reason}" for sample_id, reason in shown]
        if len(shown) < len(self.skipped):
            lines.append(f"  ... and {len(self.skipped) - len(shown)} more (all in .skipped)")
        return "\n".join(lines) + cut

    def summary(self) -> dict[str, Any]:
        """Counts for a run's final metrics: samples used, skipped (with the first ids), answers cut short."""
        return {"samples": len(self.samples) + len(self.skipped) - len(self.failed), "skipped": len(self.skipped),
                "skipped_ids": [sample_id for sample_id, _ in self.skipped[:20]],
                "failed_to_load": sorted(self.failed), "answers_cut": self.answers_cut}  # fmt: skip

    def __getitem__(self, index: int) -> dict[str, Any]:
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for a dataset of {len(self)} samples")
        index %= len(self)
        sample = self.samples[index]
        start, end = self._offsets[index], self._offsets[index + 1]
        input_ids = self._ids[start:end].long()
        labels = input_ids.masked_fill(~self._supervised[start:end], IGNORE_INDEX)
        paths = sample.images[: self._num_images[index]]
        key = "pixel_values" if self.features is None else "vision_tokens"
        visual = self._pixels(index, paths) if self.features is None else self._vision_tokens(index, paths)
        if visual is None:  # an image failed to load: the sample keeps its place and adds nothing
            labels = torch.full_like(input_ids, IGNORE_INDEX)
            visual = torch.zeros((self._num_images[index], *self._visual_shape()), dtype=torch.float32)
        item = {"input_ids": input_ids, "labels": labels, "pixel_values": None, "id": sample.id}
        if sample.id in self.failed:  # said beside the item too: a DataLoader worker's `failed` stays in the worker
            item["failed"] = self.failed[sample.id]
        return {**item, key: visual}

    def _visual_shape(self) -> tuple[int, ...]:
        """The shape of one image's entry: `(3, size, size)` pixels, or `(257, C)` cached ViT outputs."""
        if self.features is not None:
            return self.features.shape
        return (3, self.processor.image_size, self.processor.image_size)

    def _pixels(self, index: int, paths: Sequence[Path]) -> torch.Tensor | None:
        """The sample's images, transformed; None when one fails to load (the sample is then recorded as failed)."""
        p = self.processor
        if not paths:
            return torch.zeros((0, *self._visual_shape()), dtype=torch.float32)
        sample_id = self.samples[index].id
        if sample_id in self.failed:
            return None
        generator = make_generator(self.seed, self.epoch, index) if self.train and self.augment else None
        out = []
        for path in paths:
            try:
                if generator is not None:
                    out.append(train_transform(path, p.image_size, generator, p.image_mean, p.image_std))
                else:
                    out.append(eval_transform(path, p.image_size, p.image_mean, p.image_std))
            except (OSError, ValueError, Image.DecompressionBombError) as err:
                self._fail(sample_id, f"image {path} failed to load ({err})")
                return None
        return torch.stack(out)

    def _vision_tokens(self, index: int, paths: Sequence[Path]) -> torch.Tensor | None:
        """The sample's images' cached ViT outputs, by the sha256 of each file's bytes; None when one can't be read
        or is not in the cache (the sample is then recorded as failed)."""
        if not paths:
            return torch.zeros((0, *self._visual_shape()), dtype=torch.float32)
        sample_id = self.samples[index].id
        if sample_id in self.failed:
            return None
        out = []
        for path in paths:
            try:
                out.append(self.features.get(files.sha256(path), name=str(path)))
            except OSError as err:
                self._fail(sample_id, f"image {path} failed to load ({err})")
                return None
            except KeyError as err:
                self._fail(sample_id, err.args[0])
                return None
        return torch.stack(out)

    def _fail(self, sample_id: str, why: str) -> None:
        """Record a sample whose image failed after the check, and say so once."""
        self.add_failed({sample_id: why})
        logger.warning("sample %r skipped: %s", sample_id, why)


def _check_image(path: Path, cache: dict[Path, str | None], decode: bool = False) -> str | None:
    """None for a file PIL can open and verify (or decode), else why not (cached per path)."""
    if path not in cache:
        if not path.is_file():
            cache[path] = f"missing image {path}"
        else:
            try:
                with Image.open(path) as img:
                    if decode:
                        img.load()
                    else:
                        img.verify()
                cache[path] = None
            except (UnidentifiedImageError, Image.DecompressionBombError, OSError, SyntaxError, ValueError) as err:
                cache[path] = f"unreadable image {path} ({err})"
    return cache[path]


def _warn_left_out(total: int, max_length: int, left_out: dict[str, list[str]]) -> None:
    """One warning per kind of sample left out (or, for answers cut short, kept but counted)."""
    messages = {
        "unsupervised": "dropped %d of %d samples with no supervised token (truncation to max_length=%d cut every "
        "answer): %s",
        "images": "skipped %d of %d samples whose images are missing, unreadable or not one per <image> tag "
        "(max_length=%d): %s (see report())",
        "image_cut": "skipped %d of %d samples whose image block truncation to max_length=%d dropped: %s",
        "answer_cut": "kept %d of %d samples with an answer that truncation to max_length=%d cut short (its EOS "
        "lost): %s",
    }
    for kind, message in messages.items():
        if left_out[kind]:
            logger.warning(message, len(left_out[kind]), total, max_length, _some_ids(left_out[kind]))


def _some_ids(ids: Sequence[str], limit: int = 5) -> str:
    shown = ", ".join(repr(i) for i in ids[:limit])
    return shown + (f" and {len(ids) - limit} more" if len(ids) > limit else "")


# --- batching ------------------------------------------------------------------------------------

MODEL_INPUT_KEYS = ("input_ids", "attention_mask", "pixel_values", "vision_tokens", "labels")


def collate(batch: Sequence[dict[str, Any]], pad_token_id: int) -> dict[str, Any]:
    """Items of `TrainDataset` -> a right-padded batch.

    Returns:
        `input_ids` (B, L) padded with `pad_token_id`; `labels` (B, L) padded with `IGNORE_INDEX`;
        `attention_mask` (B, L), 0 on padding; `pixel_values` (all images of the batch in order, N, 3, H, W) or
        None when the batch has no image; `vision_tokens` likewise for items with cached ViT outputs (N, 257, C);
        `num_images` (a list, per sample); `ids` (a list). Pass `model_inputs(batch)` (all but the last two) to
        the model's forward.
    """
    width = max(len(item["input_ids"]) for item in batch)
    input_ids = torch.full((len(batch), width), pad_token_id, dtype=torch.long)
    labels = torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(batch), width), dtype=torch.long)
    for row, item in enumerate(batch):
        n = len(item["input_ids"])
        input_ids[row, :n] = item["input_ids"]
        labels[row, :n] = item["labels"]
        attention_mask[row, :n] = 1
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "labels": labels,
        "pixel_values": _concat(batch, "pixel_values"),
        "vision_tokens": _concat(batch, "vision_tokens"),
        "num_images": [sum(len(t) for t in map(item.get, _VISUAL_KEYS) if t is not None) for item in batch],
        "ids": [item["id"] for item in batch],
    }


_VISUAL_KEYS = ("pixel_values", "vision_tokens")  # an item's images: pixels, or cached ViT outputs


def _concat(batch: Sequence[dict[str, Any]], key: str) -> torch.Tensor | None:
    """The items' image tensors under `key` one after the other, or None when there is none."""
    present = [item[key] for item in batch if item.get(key) is not None and len(item[key])]
    return torch.cat(present) if present else None


def model_inputs(batch: dict[str, Any]) -> dict[str, Any]:
    """The keys of a collated batch that the model's forward takes (`num_images` and `ids` are bookkeeping)."""
    return {key: batch[key] for key in MODEL_INPUT_KEYS}


class LengthGroupedSampler(torch.utils.data.Sampler[list[int]]):
    """A batch sampler whose batches hold samples of similar length (less padding), reproducible and resumable.

    Each epoch: shuffle all indices with a generator seeded from `(seed, epoch)`; cut the order into mega-batches
    of `mega_batch_mult` batches; sort each mega-batch by length (longest first) and cut it into batches; shuffle
    the order of the batches. With `drop_last` the one incomplete batch is dropped, else it is kept (smaller).

    Use it as a DataLoader's `batch_sampler`. Call `set_epoch(epoch)` before each epoch; to resume in the middle of
    an epoch call `skip(n)` after `set_epoch`: iteration then starts at batch `n` of that epoch's order, and
    `len()` counts the batches left.

    Args:
        lengths: the length of each sample (e.g. `TrainDataset.lengths`).
        batch_size: samples per batch.
        seed: the shuffling seed.
        drop_last: drop the incomplete batch.
        mega_batch_mult: batches per mega-batch (the sorting window).
    """

    def __init__(
        self, lengths: Sequence[int], batch_size: int, seed: int = 0, drop_last: bool = False, mega_batch_mult: int = 50
    ):
        if batch_size < 1 or mega_batch_mult < 1:
            raise ValueError(f"batch_size and mega_batch_mult must be ≥ 1, got {batch_size} and {mega_batch_mult}")
        self.lengths = torch.as_tensor(list(lengths), dtype=torch.long)
        self.batch_size = batch_size
        self.seed = seed
        self.drop_last = drop_last
        self.mega_batch_mult = mega_batch_mult
        self.epoch = 0
        self.start = 0

    @property
    def num_batches(self) -> int:
        """The number of batches in a whole epoch."""
        n = len(self.lengths)
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    def set_epoch(self, epoch: int) -> None:
        """Select the order of `epoch`, from its first batch."""
        self.epoch = epoch
        self.start = 0

    def skip(self, num_batches: int) -> None:
        """Start the current epoch at batch `num_batches` (the batches a resumed run has already trained on)."""
        if not 0 <= num_batches <= self.num_batches:
            raise ValueError(f"can't skip {num_batches} batches of an epoch of {self.num_batches}")
        self.start = num_batches

    def batches(self, epoch: int) -> list[list[int]]:
        """All batches of `epoch`, in order."""
        generator = make_generator(self.seed, epoch)
        order = torch.randperm(len(self.lengths), generator=generator)
        mega = self.batch_size * self.mega_batch_mult
        batches = []
        for chunk in order.split(mega):
            ranked = chunk[torch.argsort(self.lengths[chunk], descending=True, stable=True)]
            batches += [b.tolist() for b in ranked.split(self.batch_size)]
        if batches and self.drop_last and len(batches[-1]) < self.batch_size:
            batches.pop()
        shuffle = torch.randperm(len(batches), generator=generator).tolist()
        return [batches[i] for i in shuffle]

    def __iter__(self) -> Iterator[list[int]]:
        yield from self.batches(self.epoch)[self.start :]

    def __len__(self) -> int:
        return self.num_batches - self.start
