"""Images and prompts in, model inputs out: the upstream preprocessing, tokenization and prompt template.

- Images: squash-resize to `size`×`size` (bicubic, aspect ratio not kept), scale to [0, 1], CLIP mean/std.
- Video frames: shortest-edge resize + centre crop, then the same normalisation (the upstream video processor).
- Prompts: one BOS, then each chunk between `<image>` / `<|video|>` tags tokenized on its own (so each chunk
  gets SentencePiece's leading "▁"), each tag replaced by `num_visual_tokens` placeholder ids (-1 / -2). A rendered
  `Prompt` (`prompts.py`) knows its media parts and its message text: only its media parts become placeholders,
  and the special tokens its message text spells (`</s>`, `<|im_end|>`) are tokenized as text.
- Prompt formats: upstream checkpoints use the upstream `Human:` / `AI:` template (`build_prompt`); a checkpoint
  whose `preprocessor_config.json` says `"prompt_format": "chat-template"` (e.g. `owl-small`) uses its language
  model's own chat template, with each image / video written as its tag inside the user's message, and no BOS of
  ours (a chat template writes whatever its model starts with).
"""

from __future__ import annotations

import io
import json
import re
from collections.abc import Sequence
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from transformers import AutoTokenizer, BatchFeature, PreTrainedTokenizerBase
from transformers.tokenization_utils_sentencepiece import SentencePieceBackend
from transformers.tokenization_utils_tokenizers import TokenizersBackend

from openowl.constants import CLIP_MEAN, CLIP_STD, IMAGE_PLACEHOLDER_ID, IMAGE_TAG, VIDEO_PLACEHOLDER_ID, VIDEO_TAG
from openowl.prompts import IMAGE, PROMPT_FORMATS, TEXT, VIDEO, Prompt, build_prompt, chat_template_prompt

_LLAMA_TOKENIZER_CLASSES = {"MplugOwlTokenizer", "LlamaTokenizer", "LlamaTokenizerFast", "LlamaSentencePieceTokenizer"}
_TAG_SPLIT = re.compile(f"({re.escape(IMAGE_TAG)}|{re.escape(VIDEO_TAG)})")

ImageInput = Image.Image | str | Path | bytes  # bytes: an image file's contents (a tar member, a Parquet cell)


# --- images --------------------------------------------------------------------------------------


def load_image(image: ImageInput) -> Image.Image:
    """A PIL image from a path, an image file's bytes (or a PIL image), fully decoded, upright, in RGB.

    EXIF orientation is applied; transparency is composited over white (upstream drops the alpha channel,
    which shows whatever colour hides under transparent pixels). Opaque RGB images are unchanged.

    Raises:
        FileNotFoundError: a path that doesn't exist.
        ValueError: a file that isn't a readable image (corrupt or truncated), naming it.
    """
    if isinstance(image, Image.Image):
        return to_rgb(image)
    name = "image bytes" if isinstance(image, bytes) else Path(image)
    if not isinstance(image, bytes) and not name.is_file():
        raise FileNotFoundError(f"{name}: no such image file")
    try:
        with Image.open(io.BytesIO(image) if isinstance(image, bytes) else name) as img:
            img.load()
            return to_rgb(img)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        raise ValueError(f"{name}: not a readable image ({err})") from err


def to_rgb(image: Image.Image) -> Image.Image:
    image = ImageOps.exif_transpose(image)
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA"):
        background = Image.new("RGBA", image.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, image.convert("RGBA"))
    return image.convert("RGB")


def normalize(image: Image.Image, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """An RGB PIL image -> `(3, H, W)` float32: scaled to [0, 1], then `(x - mean) / std` per channel."""
    pixels = np.asarray(image, dtype=np.float32) / 255.0  # (H, W, 3)
    pixels = (pixels - np.asarray(mean, dtype=np.float32)) / np.asarray(std, dtype=np.float32)
    return torch.from_numpy(pixels.transpose(2, 0, 1).copy())  # (3, H, W)


def _resize_shortest_edge_and_crop(image: Image.Image, size: int) -> Image.Image:
    w, h = image.size
    short, long = (w, h) if w <= h else (h, w)
    new_short, new_long = size, int(size * long / short)
    new_w, new_h = (new_short, new_long) if w <= h else (new_long, new_short)
    if (new_w, new_h) != (w, h):
        image = image.resize((new_w, new_h), Image.BICUBIC)
    top, left = (new_h - size) // 2, (new_w - size) // 2
    return image.crop((left, top, left + size, top + size))


# --- the processor -------------------------------------------------------------------------------


class OwlProcessor:
    """Turns prompts with `<image>` / `<|video|>` tags plus PIL images / frame lists into model inputs."""

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        image_size: int = 224,
        image_mean: Sequence[float] = CLIP_MEAN,
        image_std: Sequence[float] = CLIP_STD,
        num_visual_tokens: int = 65,
        prompt_format: str = "mplug-owl",
    ):
        if prompt_format not in PROMPT_FORMATS:
            raise ValueError(f"unknown prompt_format {prompt_format!r} (expected one of {', '.join(PROMPT_FORMATS)})")
        if prompt_format == "chat-template" and not getattr(tokenizer, "chat_template", None):
            raise ValueError("prompt_format 'chat-template' needs a tokenizer with a chat template")
        self.tokenizer = tokenizer
        self.image_size = image_size
        self.image_mean = tuple(image_mean)
        self.image_std = tuple(image_std)
        self.num_visual_tokens = num_visual_tokens
        self.prompt_format = prompt_format

    @property
    def adds_bos(self) -> bool:
        """Whether `tokenize_prompt` starts a prompt with BOS (the upstream format; chat templates write their own)."""
        return self.prompt_format == "mplug-owl"

    @classmethod
    def from_pretrained(cls, path_or_id: str | Path, revision: str | None = None) -> OwlProcessor:
        """The processor of a checkpoint folder, a built-in model or a hub id (resolved by `openowl.loading`)."""
        from openowl import loading  # the processor's one edge into the loader

        return loading.load_processor(path_or_id, revision)

    @classmethod
    def from_folder(cls, folder: Path) -> OwlProcessor:
        """The processor saved in a local checkpoint folder."""
        config = _read_json(folder / "preprocessor_config.json")
        size = config.get("size", {}).get("shortest_edge") or config.get("resolution") or 224
        model_config = _read_json(folder / "config.json")
        return cls(
            tokenizer=load_tokenizer(folder),
            image_size=int(size),
            image_mean=config.get("image_mean", CLIP_MEAN),
            image_std=config.get("image_std", CLIP_STD),
            num_visual_tokens=int(model_config.get("num_query_tokens", 64)) + 1,
            prompt_format=config.get("prompt_format", "mplug-owl"),
        )

    def save_pretrained(self, folder: str | Path) -> None:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        self.tokenizer.save_pretrained(folder)
        if isinstance(self.tokenizer, LlamaSentencePieceTokenizer):  # keep the file loadable by upstream and HF
            tokenizer_config = _read_json(folder / "tokenizer_config.json")
            tokenizer_config["tokenizer_class"] = "LlamaTokenizer"
            (folder / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2) + "\n")
        config = {
            "resolution": self.image_size,
            "size": {"shortest_edge": self.image_size},
            "crop_size": {"height": self.image_size, "width": self.image_size},
            "image_mean": list(self.image_mean),
            "image_std": list(self.image_std),
            "prompt_format": self.prompt_format,
        }
        (folder / "preprocessor_config.json").write_text(json.dumps(config, indent=2) + "\n")

    # --- pixels ----------------------------------------------------------------------------------

    def preprocess_images(self, images: Sequence[ImageInput]) -> torch.Tensor:
        """Images -> `(N, 3, size, size)` float32: squash-resize (bicubic), then CLIP mean/std."""
        size = (self.image_size, self.image_size)
        return torch.stack(
            [normalize(load_image(img).resize(size, Image.BICUBIC), self.image_mean, self.image_std) for img in images]
        )

    def preprocess_videos(self, videos: Sequence[Sequence[ImageInput]]) -> torch.Tensor:
        """Frame lists (same length each) -> `(B, 3, T, size, size)`: shortest-edge resize + centre crop."""
        if len({len(frames) for frames in videos}) > 1:
            raise ValueError(f"all videos of a batch need the same number of frames, got {[len(v) for v in videos]}")
        out = []
        for frames in videos:
            if not frames:
                raise ValueError("a video has no frames")
            cropped = [_resize_shortest_edge_and_crop(load_image(f), self.image_size) for f in frames]
            pixels = [normalize(frame, self.image_mean, self.image_std) for frame in cropped]
            out.append(torch.stack(pixels, dim=1))  # (3, T, H, W)
        return torch.stack(out)

    # --- text ------------------------------------------------------------------------------------

    def tokenize_prompt(self, prompt: str | Prompt, add_bos: bool | None = None) -> list[int]:
        """BOS (by default when `adds_bos`) + chunk-wise token ids, each tag expanded to `num_visual_tokens`
        placeholder ids.

        A `Prompt` is cut at its media pieces only, and within a chunk the special tokens that its message text
        spells are tokenized as text, on their own; the rest of the chunk is tokenized as one string (so a prompt
        whose text spells none gets exactly the ids of its plain string)."""
        ids = [self.tokenizer.bos_token_id] if (self.adds_bos if add_bos is None else add_bos) else []
        chunks = _media_chunks(prompt) if isinstance(prompt, Prompt) else _TAG_SPLIT.split(prompt)
        for chunk in chunks:
            if chunk == IMAGE_TAG:
                ids += [IMAGE_PLACEHOLDER_ID] * self.num_visual_tokens
            elif chunk == VIDEO_TAG:
                ids += [VIDEO_PLACEHOLDER_ID] * self.num_visual_tokens
            elif isinstance(chunk, list):
                ids += self._tokenize_pieces(chunk)
            elif chunk:
                ids += self.tokenizer(chunk, add_special_tokens=False)["input_ids"]
        return ids

    def _tokenize_pieces(self, pieces: list[tuple[str, str]]) -> list[int]:
        """The ids of a chunk of template and message text (no media): as one string, except that the special
        tokens spelled in message text are cut out and tokenized as text (the text after a cut is tokenized as
        the continuation it is: without SentencePiece's leading "▁")."""
        ids, run, cut = [], "", False
        for kind, text in pieces:
            if kind != TEXT:
                run += text
                continue
            for n, part in enumerate(self._special_tokens.split(text)):
                if n % 2 == 0:
                    run += part
                elif part:
                    ids += self._encode(run, continued=cut) + self._encode(part, continued=True, as_text=True)
                    run, cut = "", True
        return ids + self._encode(run, continued=cut)

    @cached_property
    def _special_tokens(self) -> re.Pattern:
        """Matches the tokenizer's special tokens and its other added tokens (bar whitespace ones), longest first;
        `split` keeps each match."""
        added = {
            t.content for t in self.tokenizer.added_tokens_decoder.values() if t.special or not t.content.isspace()
        }
        added |= set(self.tokenizer.all_special_tokens)
        pattern = "|".join(re.escape(t) for t in sorted(added, key=len, reverse=True) if t)
        return re.compile(f"({pattern})" if pattern else "(?!)")

    def _encode(self, text: str, continued: bool = False, as_text: bool = False) -> list[int]:
        """`text`'s ids (none of the tokenizer's added tokens matched in it when `as_text`). A `continued` text is
        tokenized after a newline that is then dropped, so that SentencePiece adds no "▁" of its own (as
        transformers' `sanitize_control_tokens` does)."""
        if not text:
            return []
        if not continued:
            return (
                self._encode_as_text(text) if as_text else self.tokenizer(text, add_special_tokens=False)["input_ids"]
            )
        newline, ids = self._encode("\n", as_text=as_text), self._encode("\n" + text, as_text=as_text)
        return ids[len(newline) :] if ids[: len(newline)] == newline else self._encode(text, as_text=as_text)

    def _encode_as_text(self, text: str) -> list[int]:
        backend = getattr(self.tokenizer, "backend_tokenizer", None)
        if backend is None:  # a Python tokenizer: `split_special_tokens` skips its added tokens
            return self.tokenizer.convert_tokens_to_ids(self.tokenizer.tokenize(text, split_special_tokens=True))
        # a `tokenizers` pipeline run without its added tokens (its `encode_special_tokens` flag is shared state)
        text = backend.normalizer.normalize_str(text) if backend.normalizer else text
        splits = [w for w, _ in backend.pre_tokenizer.pre_tokenize_str(text)] if backend.pre_tokenizer else [text]
        return [token.id for split in splits for token in backend.model.tokenize(split)]

    @cached_property
    def max_token_chars(self) -> int:
        """The most characters one token can cover (the longest entry of the vocabulary): a text of `n` characters
        has at least `n / max_token_chars` tokens, which bounds a prompt's length before it is tokenized."""
        return max(len(token) for token in self.tokenizer.get_vocab())

    def __call__(
        self,
        text: str | Sequence[str],
        images: Sequence[ImageInput] | None = None,
        videos: Sequence[Sequence[ImageInput]] | None = None,
        return_tensors: str = "pt",
        padding_side: str = "left",
    ) -> BatchFeature:
        """Tokenize a batch of prompts and preprocess its images (all prompts' images, in order).

        Prompts are padded to one length with EOS on `padding_side` ("left" suits generation; upstream pads on
        the right); `attention_mask` is 0 on padding.

        Raises:
            ValueError: when the number of `<image>` / `<|video|>` tags differs from the images / videos given.
        """
        if return_tensors != "pt":
            raise ValueError("only return_tensors='pt' is supported")
        texts = [text] if isinstance(text, str) else list(text)
        images, videos = list(images or []), list(videos or [])
        check_media_count(texts, len(images), len(videos))
        ids = [self.tokenize_prompt(t) for t in texts]
        data: dict[str, Any] = self.pad(ids, padding_side)
        if images:
            data["pixel_values"] = self.preprocess_images(images)
        if videos:
            data["video_pixel_values"] = self.preprocess_videos(videos)
        return BatchFeature(data)

    def pad(self, ids: Sequence[Sequence[int]], padding_side: str = "left") -> dict[str, torch.Tensor]:
        if padding_side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', not {padding_side!r}")
        width = max(len(x) for x in ids)
        input_ids = torch.full((len(ids), width), self.tokenizer.eos_token_id, dtype=torch.long)
        mask = torch.zeros((len(ids), width), dtype=torch.long)
        for row, seq in enumerate(ids):
            cols = slice(width - len(seq), width) if padding_side == "left" else slice(0, len(seq))
            input_ids[row, cols] = torch.tensor(seq, dtype=torch.long)
            mask[row, cols] = 1
        return {"input_ids": input_ids, "attention_mask": mask}

    def batch_decode(self, ids: torch.Tensor | Sequence[Sequence[int]], **kwargs) -> list[str]:
        """Decode rows of token ids; placeholder ids are dropped."""
        rows = ids.tolist() if isinstance(ids, torch.Tensor) else ids
        return self.tokenizer.batch_decode([[i for i in row if i >= 0] for row in rows], **kwargs)

    def decode(self, ids: torch.Tensor | Sequence[int], **kwargs) -> str:
        return self.batch_decode([ids.tolist() if isinstance(ids, torch.Tensor) else ids], **kwargs)[0]

    # --- prompts ---------------------------------------------------------------------------------

    def apply_chat_template(
        self, messages: Sequence[dict[str, Any]], add_generation_prompt: bool = True, system: str | None = None
    ) -> Prompt:
        """The prompt text of a conversation, in the checkpoint's prompt format: the upstream `Human:` / `AI:`
        template (see `build_prompt`) or the language model's chat template (see `chat_template_prompt`)."""
        if self.prompt_format == "chat-template":
            return chat_template_prompt(self.tokenizer, messages, add_generation_prompt, system)
        return build_prompt(messages, add_generation_prompt=add_generation_prompt, system=system)

    def turn_prompt(self, history: Sequence[dict[str, Any]], message: dict[str, Any]) -> Prompt:
        """The text that continues a conversation whose ids end with EOS after the last answer: the user's new
        `message` and the generation prompt. Without an answer in `history`, the whole prompt (system included).
        """
        if not any(m.get("role") == "assistant" for m in history):
            return self.apply_chat_template([*history, message])
        if self.prompt_format == "mplug-owl":
            return build_prompt([message], system="")  # "\nHuman: ...\nAI: "
        # The template's text after the last answer's end-of-turn token, which the ids already hold.
        before = self.apply_chat_template(history, add_generation_prompt=False)
        after = self.apply_chat_template([*history, message])
        eos = self.tokenizer.eos_token
        cut = before.rfind(eos) + len(eos)
        if eos not in before or not after.startswith(before[:cut]):
            raise ValueError("the chat template does not end answers with the EOS token; can't continue the chat")
        return after.after(cut)


def check_media_count(texts: Sequence[str | Prompt], num_images: int, num_videos: int) -> None:
    """Raises ValueError unless the prompts hold as many images and videos as are given: a `Prompt`'s image and
    video parts, a plain string's `<image>` / `<|video|>` tags."""
    counts = [
        (_media_count(texts, IMAGE_TAG), num_images, "image"),
        (_media_count(texts, VIDEO_TAG), num_videos, "video"),
    ]
    problem = _count_problem(counts)
    if problem:
        raise ValueError(f"the prompts contain {problem} were given")


def media_count_mismatch(texts: Sequence[str], num_images: int, num_videos: int | None = None) -> str | None:
    """None when the texts hold as many `<image>` tags as `num_images` (and `<|video|>` tags as `num_videos`,
    unless None: not checked), else what differs, e.g. "2 <image> tag(s) but 1 image(s)". Training skips the
    sample with it (its texts' tags, wherever they are, are what it tokenizes as images)."""
    return _count_problem([(sum(t.count(IMAGE_TAG) for t in texts), num_images, "image"),
                           (sum(t.count(VIDEO_TAG) for t in texts), num_videos, "video")])  # fmt: skip


def _media_count(texts: Sequence[str | Prompt], tag: str) -> int:
    kind = IMAGE if tag == IMAGE_TAG else VIDEO
    return sum(t.count_media(kind) if isinstance(t, Prompt) else t.count(tag) for t in texts)


def _count_problem(counts: list[tuple[int, int | None, str]]) -> str | None:
    for tags, given, kind in counts:
        if given is not None and tags != given:
            tag = IMAGE_TAG if kind == "image" else VIDEO_TAG
            return f"{tags} {tag} tag(s) but {given} {kind}(s)"
    return None


def _media_chunks(prompt: Prompt) -> list[list[tuple[str, str]] | str]:
    """A prompt's pieces cut at its media: lists of text pieces, and each image or video piece as its tag."""
    chunks: list = [[]]
    for kind, text in prompt.pieces:
        if kind in (IMAGE, VIDEO):
            chunks += [text, []]
        else:
            chunks[-1].append((kind, text))
    return [c for c in chunks if c]


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON ({err})") from err


class LlamaSentencePieceTokenizer(SentencePieceBackend):
    """LLaMA's tokenizer as upstream ran it: SentencePiece itself, on `tokenizer.model`.

    transformers 5's `LlamaTokenizer` is a `tokenizers` port that differs from SentencePiece on leading spaces and
    runs of spaces (" What" -> "▁What" instead of "▁", "▁What"); the released models were trained with
    SentencePiece. Decoding goes through SentencePiece too, so byte-fallback pieces become characters.
    """

    def convert_tokens_to_string(self, tokens: list[str]) -> str:
        return self.sp_model.decode(tokens)


def load_tokenizer(folder: Path) -> PreTrainedTokenizerBase:
    """The checkpoint's tokenizer. `MplugOwlTokenizer` (upstream's name for a LLaMA tokenizer whose pad is
    `<unk>`) and `LlamaTokenizer` both load as SentencePiece LLaMA tokenizers; anything else through AutoTokenizer.
    """
    name = _read_json(folder / "tokenizer_config.json").get("tokenizer_class")
    if name in _LLAMA_TOKENIZER_CLASSES or (name is None and (folder / "tokenizer.model").is_file()):
        tokenizer = LlamaSentencePieceTokenizer.from_pretrained(folder)
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.unk_token
        return tokenizer
    if name == "TokenizersBackend":  # a tokenizer.json of its own (owl-small's, from GGUF): no model config needed
        return TokenizersBackend.from_pretrained(folder)
    return AutoTokenizer.from_pretrained(folder)
