"""The engine: prompts and images in, text out — batched, streaming, with a content-hashed image-feature cache.

`generate.py` does the token work; this file adds what needs the processor: tokenizing, encoding each image
once, detokenizing incrementally (deltas that never split a character and never emit a stop string), and
finishing each row on EOS, a stop string or the token budget.
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import torch
from transformers import StaticCache

from openowl.infer.generate import EAGER_STEP, DecodeStep, generate_tokens, static_cache
from openowl.infer.sampling import SamplingParams
from openowl.model.owl import OwlForConditionalGeneration
from openowl.processing import ImageInput, OwlProcessor, check_media_count
from openowl.prompts import Prompt


@dataclass
class Request:
    """One prompt in the model's template and its media, in order. The prompt is best a `Prompt` rendered from
    messages (`processor.apply_chat_template`): its image and video parts are its media and its message text is
    only ever text. In a plain string, each `<image>` / `<|video|>` tag is a medium and special tokens count."""

    prompt: str | Prompt
    images: Sequence[ImageInput] = ()
    videos: Sequence[Sequence[ImageInput]] = ()


@dataclass
class Completion:
    text: str
    token_ids: list[int]
    finish_reason: str  # "stop" (EOS or a stop string) or "length"
    prompt_tokens: int


@dataclass
class Detokenizer:
    """Turns one row's tokens into text deltas whose concatenation is the final text.

    Each token is decoded in a window of a few tokens: the ones of the previous delta, as context (a SentencePiece
    decoder drops the space of a text's first token), and the new ones. The text they add is the window's text past
    the context's. A step costs the same whatever the length of the answer, where decoding the whole answer at every
    step costs more with every token (measured: docs/performance.md, Figures quoted by other pages, Detokenizing).
    """

    tokenizer: object
    stop: tuple[str, ...] = ()
    eos_ids: frozenset[int] = frozenset()
    ids: list[int] = field(default_factory=list)
    text: str = ""  # emitted so far
    finish_reason: str | None = None
    decoded: str = ""  # the text of `ids[:read]`: `text`, then what may still become a stop string
    context: int = 0  # ids[context:read] are the previous delta's tokens, which decode to `context_text`
    read: int = 0
    context_text: str = ""

    def add(self, token: int) -> str:
        """Take the next token; return the new text that is now certain (possibly "")."""
        if self.finish_reason:
            return ""
        if token in self.eos_ids:
            self.finish_reason = "stop"
            return self._emit(self.decoded)
        self.ids.append(token)
        window = self._decode(self.ids[self.context :])
        if window.endswith("\ufffd") or len(window) <= len(self.context_text):
            return ""  # an incomplete UTF-8 sequence (wait for its next byte), or no text yet
        self.decoded += window[len(self.context_text) :]
        self.context, self.read, self.context_text = self.read, len(self.ids), self._decode(self.ids[self.read :])
        for stop in self.stop:
            at = self.decoded.find(stop, max(0, len(self.text) - len(stop)))
            if at >= 0:
                self.finish_reason = "stop"
                return self._emit(self.decoded[:at])
        return self._emit(self.decoded[: len(self.decoded) - _stop_prefix_length(self.decoded, self.stop)])

    def finish(self) -> str:
        """The budget ran out: release any held-back text (nothing for a row that already stopped)."""
        if self.finish_reason:  # EOS or a stop string: the text is final (it must not regain the stop string)
            return ""
        self.finish_reason = "length"
        pending = self._decode(self.ids[self.context :])[len(self.context_text) :]  # tokens still waiting
        return self._emit(self.decoded + pending.rstrip("\ufffd"))

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def _emit(self, upto: str) -> str:
        delta = upto[len(self.text) :]
        self.text += delta
        return delta


def _stop_prefix_length(text: str, stops: tuple[str, ...]) -> int:
    """Length of the longest end of `text` that could still grow into a stop string."""
    best = 0
    for stop in stops:
        for n in range(min(len(stop) - 1, len(text)), best, -1):
            if text.endswith(stop[:n]):
                best = n
                break
    return best


class ImageFeatureCache:
    """Visual tokens by the SHA-256 of the preprocessed pixels, least recently used evicted first."""

    def __init__(self, capacity: int = 256):
        self.capacity = capacity
        self._items: OrderedDict[str, torch.Tensor] = OrderedDict()
        self.hits = self.misses = 0

    @staticmethod
    def key(pixels: torch.Tensor) -> str:
        return hashlib.sha256(pixels.detach().cpu().contiguous().flatten().view(torch.uint8).numpy()).hexdigest()

    def encode(self, pixels: torch.Tensor, encoder) -> torch.Tensor:
        """`(N, ...)` pixels -> `(N, 65, D)` features, running `encoder` only on the ones not cached."""
        keys = [self.key(p) for p in pixels]
        todo = [i for i, k in enumerate(keys) if k not in self._items]
        self.misses += len(todo)
        self.hits += len(keys) - len(todo)
        if todo:
            fresh = encoder(pixels[todo])
            for i, feats in zip(todo, fresh, strict=True):
                self._items[keys[i]] = feats
        for k in keys:
            self._items.move_to_end(k)
        out = torch.stack([self._items[k] for k in keys])
        while len(self._items) > self.capacity:
            self._items.popitem(last=False)
        return out


class StaticCachePool:
    """The static KV caches of a compiled step, kept between requests: at most `capacity` free caches, one per
    (rows, length).

    A compiled step's CUDA graph is recorded on the addresses of its cache's tensors, so that a new cache makes
    cudagraph trees record the graph again, at every request. A cache is lent to one stream (or one chat session)
    at a time, zeroed, and comes back when its stream ends or is dropped; a stream that finds its shape lent gets a
    new cache.
    """

    def __init__(self, model: OwlForConditionalGeneration, capacity: int = 4):
        self.model = model
        self.capacity = capacity
        self._free: OrderedDict[tuple[int, int], StaticCache] = OrderedDict()
        self._lock = threading.Lock()

    def take(self, rows: int, length: int) -> StaticCache:
        """An empty cache for `rows` x `length` positions: a kept one, or a new one."""
        with self._lock:
            cache = self._free.pop((rows, length), None)
        if cache is None:
            return static_cache(self.model, length)
        cache.reset()
        return cache

    def give(self, rows: int, length: int, cache: StaticCache) -> None:
        """Return a cache that `take` lent."""
        with self._lock:
            self._free[(rows, length)] = cache
            while len(self._free) > self.capacity:
                self._free.popitem(last=False)

    def lend(self, rows: int, length: int, use: Callable[[StaticCache], Iterator]) -> Iterator:
        """Run `use(cache)` on a cache for `rows` x `length` positions; the cache comes back when it is exhausted."""
        cache = self.take(rows, length)
        try:
            yield from use(cache)
        finally:
            self.give(rows, length, cache)


class Engine:
    """Batched and streaming generation over one model and its processor. The engine never changes its model:
    `prepare_for_inference` (`prepare.py`) fuses, picks kernels and quantizes, and returns the `step` to give here.
    """

    def __init__(
        self,
        model: OwlForConditionalGeneration,
        processor: OwlProcessor,
        image_cache_size: int = 256,
        step: DecodeStep = EAGER_STEP,
    ):
        """
        Args:
            step: the decoding step; one that wants static caches (a compiled step) gets them from `static_caches`,
                kept between requests.
        """
        self.model = model
        self.processor = processor
        self.image_cache = ImageFeatureCache(image_cache_size)
        self.video_cache = ImageFeatureCache(max(1, image_cache_size // 8))
        eos = model.language_model.config.eos_token_id
        eos = eos if isinstance(eos, list) else [eos]
        self.eos_ids = frozenset(e for e in [processor.tokenizer.eos_token_id, *eos] if e is not None)
        self.step = step
        self.static_caches = StaticCachePool(model)

    # --- visual features -----------------------------------------------------------------------

    @torch.no_grad()
    def image_features(self, images: Sequence[ImageInput]) -> torch.Tensor | None:
        if not images:
            return None
        pixels = self.processor.preprocess_images(images).to(self.model.dtype)
        return self.image_cache.encode(pixels, self.model.get_image_features)

    @torch.no_grad()
    def video_features(self, videos: Sequence[Sequence[ImageInput]]) -> torch.Tensor | None:
        if not videos:
            return None
        features = []
        for frames in videos:  # videos of different lengths are encoded one by one
            pixels = self.processor.preprocess_videos([frames]).to(self.model.dtype)
            features.append(self.video_cache.encode(pixels, self.model.get_video_features))
        return torch.cat(features)

    # --- generation ----------------------------------------------------------------------------

    def stream_batch(self, requests: Sequence[Request], params: SamplingParams) -> Iterator[list[str]]:
        """Yield, each step, one text delta per request ("" for rows with nothing new); see `generate`."""
        state = self._start(requests, params)
        yield from self._run(state, params)

    def generate(self, requests: Sequence[Request], params: SamplingParams) -> list[Completion]:
        """Run a batch to completion; every row gives, token for token, what it would give alone."""
        state = self._start(requests, params)
        for _ in self._run(state, params):
            pass
        return state.completions()

    def stream(self, request: Request, params: SamplingParams) -> Iterator[str]:
        """Text deltas of one request; they concatenate to exactly the completion's text."""
        for deltas in self.stream_batch([request], params):
            if deltas[0]:
                yield deltas[0]

    def token_stream(
        self, requests: Sequence[Request], params: SamplingParams
    ) -> tuple[Iterator[torch.Tensor], list[int]]:
        """Tokenize, encode the media (through the feature caches) and start decoding.

        Returns:
            an iterator of `(B,)` next tokens, one per step, and each prompt's length in tokens.
        """
        prompts = [r.prompt for r in requests]
        images = [img for r in requests for img in r.images]
        videos = [v for r in requests for v in r.videos]
        check_media_count(prompts, len(images), len(videos))
        ids = [self.processor.tokenize_prompt(p) for p in prompts]
        batch = self.processor.pad(ids, padding_side="left")
        image_features = self.image_features(images)
        video_features = self.video_features(videos)

        def run(cache: StaticCache | None) -> Iterator[torch.Tensor]:
            return generate_tokens(
                self.model, batch["input_ids"], batch["attention_mask"], params, image_features, video_features,
                cache=cache, decode=self.step.run,
            )  # fmt: skip

        lengths = [len(x) for x in ids]
        if not self.step.static_cache:
            return run(None), lengths
        length = -(-(batch["input_ids"].shape[1] + params.max_new_tokens) // 256) * 256  # few shapes to compile
        return self.static_caches.lend(len(ids), length, run), lengths

    def _start(self, requests: Sequence[Request], params: SamplingParams) -> _BatchState:
        tokens, prompt_lengths = self.token_stream(requests, params)
        detoks = [Detokenizer(self.processor.tokenizer, params.stop, self.eos_ids) for _ in requests]
        return _BatchState(tokens, detoks, prompt_lengths)

    def _run(self, state: _BatchState, params: SamplingParams) -> Iterator[list[str]]:
        for step_tokens in state.tokens:
            deltas = [d.add(t) for d, t in zip(state.detoks, step_tokens.tolist(), strict=True)]
            if all(d.finish_reason for d in state.detoks):
                yield deltas
                return
            yield deltas
        yield [d.finish() for d in state.detoks]


@dataclass
class _BatchState:
    tokens: Iterator[torch.Tensor]
    detoks: list[Detokenizer]
    prompt_tokens: list[int]

    def completions(self) -> list[Completion]:
        return [
            Completion(d.text, list(d.ids), d.finish_reason or "length", n)
            for d, n in zip(self.detoks, self.prompt_tokens, strict=True)
        ]
