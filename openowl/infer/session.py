"""A multi-turn chat that keeps its KV cache: each turn only runs the tokens the cache doesn't already hold.

The prompt of every turn is built from the whole history in the upstream template and tokenized exactly as a
fresh prompt would be; the session then finds the longest prefix it has already computed — comparing token ids,
and image identities (content hashes) at placeholder positions — crops the cache there and runs the rest. The
result is the same as recomputing the whole prompt, without the cost.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path

import torch

from openowl.infer.engine import Detokenizer, Engine
from openowl.infer.generate import generate_tokens, new_cache
from openowl.infer.sampling import SamplingParams
from openowl.model.owl import IMAGE_PLACEHOLDER_ID, VIDEO_PLACEHOLDER_ID
from openowl.processing import ImageInput, load_image


class ChatSession:
    """History + cache for one conversation. `ask` streams the answer and records it."""

    def __init__(self, engine: Engine, system: str | None = None, params: SamplingParams | None = None):
        self.engine = engine
        self.system = system
        self.params = params or SamplingParams()
        self.reset()

    def reset(self) -> None:
        """Forget the history and the cache."""
        self.messages: list[dict] = [] if self.system is None else [{"role": "system", "content": self.system}]
        self.images: list[ImageInput] = []
        self.videos: list[Sequence[ImageInput]] = []
        self._cache = new_cache(self.engine.model)
        self._cached_keys: list = []
        self.last_prefill_tokens = 0  # how many prompt tokens the last turn actually ran

    def ask(
        self,
        text: str,
        images: Sequence[ImageInput] = (),
        videos: Sequence[Sequence[ImageInput] | str | Path] = (),
        params: SamplingParams | None = None,
    ) -> Iterator[str]:
        """Add a user turn (its images / videos first, then the text) and stream the answer's text deltas.

        A video is a list of frames or a video file (decoded with PyAV, frames at segment centres).
        """
        from openowl.infer.video import load_video_frames

        params = params or self.params
        # Read every file before touching the history: a bad path raises here and leaves the session usable.
        images = [load_image(img) for img in images]
        videos = [load_video_frames(v) if isinstance(v, str | Path) else [load_image(f) for f in v] for v in videos]
        parts = [{"type": "image"} for _ in images] + [{"type": "video"} for _ in videos]
        self.messages.append({"role": "user", "content": [*parts, {"type": "text", "text": text}]})
        self.images += list(images)
        self.videos += videos
        detok = Detokenizer(self.engine.processor.tokenizer, params.stop, self.engine.eos_ids)
        for token in self._generate(params):
            delta = detok.add(int(token))
            if delta:
                yield delta
            if detok.finish_reason:
                break
        else:
            tail = detok.finish()
            if tail:
                yield tail
        self.messages.append({"role": "assistant", "content": detok.text})

    def _generate(self, params: SamplingParams) -> Iterator[torch.Tensor]:
        engine = self.engine
        prompt = engine.processor.apply_chat_template(self.messages, system=None)
        ids = engine.processor.tokenize_prompt(prompt)
        image_features, image_keys = engine.image_features(self.images)
        video_features, video_keys = engine.video_features(self.videos)
        keys = _token_keys(ids, image_keys, video_keys, engine.model.num_visual_tokens)
        start = self._reusable_prefix(keys, engine.model.num_visual_tokens)
        surplus = self._cache.get_seq_length() - start
        if surplus > 0:
            self._cache.crop(-surplus)
        new_ids = torch.tensor([ids[start:]])
        images_done = sum(1 for i in ids[:start] if i == IMAGE_PLACEHOLDER_ID) // engine.model.num_visual_tokens
        videos_done = sum(1 for i in ids[:start] if i == VIDEO_PLACEHOLDER_ID) // engine.model.num_visual_tokens
        self.last_prefill_tokens = len(ids) - start
        history = [[i for i in ids if i >= 0]]
        tokens = generate_tokens(
            engine.model,
            new_ids,
            torch.ones_like(new_ids),
            params,
            image_features=None if image_features is None else image_features[images_done:],
            video_features=None if video_features is None else video_features[videos_done:],
            cache=self._cache,
            history=history,
        )
        generated: list[int] = []
        for token in tokens:
            generated.append(int(token))
            # Everything but the newest token has been run through the model and sits in the cache.
            self._cached_keys = keys + generated[:-1]
            yield token[0]

    def _reusable_prefix(self, keys: list, block: int) -> int:
        """Length of the common prefix of `keys` and the cache, never ending inside a visual block, and leaving at
        least one token to run (the last position's logits are needed)."""
        n = 0
        for a, b in zip(keys, self._cached_keys, strict=False):
            if a != b:
                break
            n += 1
        n = min(n, len(keys) - 1, self._cache.get_seq_length())
        while n > 0 and isinstance(keys[n], tuple) and keys[n][2] > 0:  # inside a block: back to its start
            n -= 1
        return n


def _token_keys(ids: list[int], image_keys: list[str], video_keys: list[str], block: int) -> list:
    """Per position: the token id, or (image hash, kind, offset in the block) for placeholders."""
    keys: list = []
    counters = {IMAGE_PLACEHOLDER_ID: 0, VIDEO_PLACEHOLDER_ID: 0}
    sources = {IMAGE_PLACEHOLDER_ID: image_keys, VIDEO_PLACEHOLDER_ID: video_keys}
    for i in ids:
        if i >= 0:
            keys.append(i)
            continue
        seen = counters[i]
        keys.append((sources[i][seen // block], i, seen % block))
        counters[i] += 1
    return keys
