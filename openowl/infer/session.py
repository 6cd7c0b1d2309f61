"""A multi-turn chat that keeps its KV cache: each turn runs only its own new tokens.

The session holds the conversation as token ids, in the upstream template: the first turn is tokenized as a
fresh prompt (BOS, system line, `Human:` lines, `AI: `); each answer stays as the ids the model generated,
followed by EOS (as in upstream's training data, where an EOS ends every answer); each later turn appends
`\\nHuman: ...\\nAI: ` tokenized chunk by chunk. The cache always holds a prefix of these ids, so a turn runs only
what the model has not seen: the new question, its images, and the answer's last token.

(Re-tokenizing the whole history as text, as a stateless server does, would give different ids at every
answer's start — the prompt ends in "▁" and the answer's first word carries its own — and so would recompute
every answer.)
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path

import torch

from openowl.infer.engine import Detokenizer, Engine
from openowl.infer.generate import generate_tokens, new_cache
from openowl.infer.sampling import SamplingParams
from openowl.processing import ImageInput, check_media_count, load_image
from openowl.prompts import user_message
from openowl.video import load_video_frames


class ChatSession:
    """History + cache for one conversation. `ask` streams the answer and records it.

    The session decodes with its engine's step. An eager step keeps a growing cache; a compiled one (which wants a
    static cache) borrows one cache of `max_length` positions from the engine's pool for the whole conversation
    (default: the language model's `max_position_embeddings`), given back by `reset` and `close`.
    """

    def __init__(
        self,
        engine: Engine,
        system: str | None = None,
        params: SamplingParams | None = None,
        max_length: int | None = None,
    ):
        self.engine = engine
        self.system = system
        self.params = params or SamplingParams()
        self.max_length = max_length or engine.model.language_model.config.max_position_embeddings
        self._cache = None
        self.reset()

    def reset(self) -> None:
        """Forget the history and the cache."""
        self.close()
        self.messages: list[dict] = [] if self.system is None else [{"role": "system", "content": self.system}]
        self.images: list[ImageInput] = []
        self.videos: list[Sequence[ImageInput]] = []
        self.ids: list[int] = []  # the whole conversation, placeholders included
        self.last_prompt_ids: list[int] = []  # the ids the last answer was generated from
        if self.engine.step.static_cache:
            self._cache = self.engine.static_caches.take(1, self.max_length)
        else:
            self._cache = new_cache(self.engine.model)
        self.last_prefill_tokens = 0  # how many tokens the last turn actually ran before its answer

    def close(self) -> None:
        """Give a borrowed static cache back to the engine's pool (the session can't answer until `reset`)."""
        if self._cache is not None and self.engine.step.static_cache:
            self.engine.static_caches.give(1, self.max_length, self._cache)
        self._cache = None

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
        params = params or self.params
        # Read every file before touching the history: a bad path raises here and leaves the session usable.
        images = [load_image(img) for img in images]
        videos = [load_video_frames(v) if isinstance(v, str | Path) else [load_image(f) for f in v] for v in videos]
        message = user_message(text, len(images), len(videos))
        turn_ids = self._tokenize_turn(message, len(images), len(videos))
        if len(self.ids) + len(turn_ids) + params.max_new_tokens > self.max_length:
            raise ValueError(
                f"this turn would take the conversation past the session's {self.max_length} positions: /reset"
            )
        self.messages.append(message)
        self.images += images
        self.videos += videos
        self.ids += turn_ids
        self.last_prompt_ids = list(self.ids)
        detok = Detokenizer(self.engine.processor.tokenizer, params.stop, self.engine.eos_ids)
        generated: list[int] = []
        try:
            for token in self._generate(images, videos, params):
                generated.append(token)
                delta = detok.add(token)
                if delta:
                    yield delta
                if detok.finish_reason:
                    break
            else:
                tail = detok.finish()
                if tail:
                    yield tail
        finally:  # also when the caller stops reading: the history stays consistent with the cache
            eos = self.engine.processor.tokenizer.eos_token_id
            self.ids += generated if generated[-1:] == [eos] else [*generated, eos]
            self.messages.append({"role": "assistant", "content": detok.text})

    def _tokenize_turn(self, message: dict, num_images: int, num_videos: int) -> list[int]:
        """The turn's ids: its text tokenized as text only (a `<image>` typed in it is characters), its media as
        placeholders."""
        processor = self.engine.processor
        first = not self.ids
        # The first turn: BOS, system line, the user's lines, "AI: ". Later: "\nHuman: ...\nAI: " after the EOS.
        text = processor.turn_prompt(self.messages, message)
        check_media_count([text], num_images, num_videos)
        return processor.tokenize_prompt(text, add_bos=first and processor.adds_bos)

    def _generate(self, images: list, videos: list, params: SamplingParams) -> Iterator[int]:
        engine = self.engine
        start = self._cache.get_seq_length()
        new_ids = torch.tensor([self.ids[start:]])
        self.last_prefill_tokens = new_ids.shape[1]
        image_features = engine.image_features(images)  # only this turn's media: older ones are cached
        video_features = engine.video_features(videos)
        tokens = generate_tokens(
            engine.model,
            new_ids,
            torch.ones_like(new_ids),
            params,
            image_features=image_features,
            video_features=video_features,
            cache=self._cache,
            history=[[i for i in self.ids if i >= 0]],
            decode=engine.step.run,
        )
        for token in tokens:
            yield int(token[0])
