"""The running batch of continuous batching: one KV cache whose rows join and leave between decoding steps.

Rows are left-padded to a common length and the attention mask marks each row's real positions; positions are
counted from the mask, so a row computes what it would compute alone (as in `infer/generate.py`). Joining pads the
shorter of the two caches on the left and concatenates them; leaving keeps the other rows and drops the columns that
have become padding in every row.

New rows are prefilled by a `Prefill`, a chunk of prompt positions at a time, so that the scheduler can run the
running rows' decoding steps between two chunks of a long prompt; they join once their whole prompt is in.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from transformers import DynamicCache

from openowl.infer.generate import decode_one_token, new_cache, prefill_chunks
from openowl.model.owl import OwlForConditionalGeneration


class Prefill:
    """Left-padded prompts being prefilled in a KV cache of their own, `chunk` positions per `advance()` (None: all at
    once), until they join a `RunningBatch`."""

    def __init__(
        self,
        model: OwlForConditionalGeneration,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        repeats: Sequence[int],
        image_features: torch.Tensor | None = None,
        video_features: torch.Tensor | None = None,
        chunk: int | None = None,
    ):
        self.cache = new_cache(model)
        self.repeats = list(repeats)
        self.logits: torch.Tensor | None = None  # (J, V), once done
        self.mask: torch.Tensor | None = None  # (J, L), once done
        self._chunks = prefill_chunks(model, input_ids, attention_mask, self.cache, image_features, video_features,
                                      chunk)  # fmt: skip

    @torch.no_grad()
    def advance(self) -> bool:
        """Run the next chunk through the model. -> whether the whole prompt is now in the cache."""
        done = next(self._chunks)
        if done is not None:
            self.logits, self.mask = done
        return done is not None


class RunningBatch:
    """The KV cache and attention mask of the rows being decoded, in row order."""

    def __init__(self, model: OwlForConditionalGeneration):
        self.model = model
        self.cache: DynamicCache | None = None
        self.mask: torch.Tensor | None = None  # (B, S): 1 on each row's real cached positions

    def __len__(self) -> int:
        return 0 if self.mask is None else self.mask.shape[0]

    @property
    def width(self) -> int:
        """Cached positions per row, padding included."""
        return 0 if self.mask is None else self.mask.shape[1]

    @torch.no_grad()
    def add(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        repeats: Sequence[int],
        image_features: torch.Tensor | None = None,
        video_features: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Prefill `(J, L)` left-padded prompts in a cache of their own, repeat prompt `j` `repeats[j]` times (several
        choices of one request share its prefill) and append the rows to the batch.

        Returns:
            `(sum(repeats), V)` logits of each new row's last prompt position.
        """
        pending = Prefill(self.model, input_ids, attention_mask, repeats, image_features, video_features)
        while not pending.advance():
            pass
        return self.join(pending)

    def join(self, prefilled: Prefill) -> torch.Tensor:
        """Append the rows of a finished `Prefill`. -> `(sum(repeats), V)` logits of their last prompt position."""
        cache, logits, mask, repeats = prefilled.cache, prefilled.logits, prefilled.mask, prefilled.repeats
        if any(r != 1 for r in repeats):
            index = torch.repeat_interleave(torch.arange(len(repeats)), torch.tensor(repeats)).to(logits.device)
            cache.batch_select_indices(index)
            logits, mask = logits[index], mask[index]
        self._join(cache, mask)
        return logits

    @torch.no_grad()
    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """Feed one `(B,)` token per row. -> `(B, V)` logits of the next position."""
        self.mask = torch.cat([self.mask, self.mask.new_ones(len(self), 1)], dim=1)
        positions = self.mask.sum(-1, keepdim=True) - 1  # (B, 1)
        return decode_one_token(self.model, tokens.to(self.model.device), self.mask, positions, self.cache)

    def keep(self, rows: Sequence[int]) -> None:
        """Keep only `rows`, in that order; columns that are padding in every kept row are dropped."""
        if not rows:
            self.cache = self.mask = None
            return
        index = torch.tensor(list(rows), device=self.mask.device)
        self.cache.batch_select_indices(index)
        self.mask = self.mask[index]
        first = int(self.mask.any(dim=0).int().argmax())  # the first column some row still uses
        if first:
            self.mask = self.mask[:, first:]
            for layer in self.cache.layers:
                layer.keys, layer.values = layer.keys[:, :, first:], layer.values[:, :, first:]

    def _join(self, cache: DynamicCache, mask: torch.Tensor) -> None:
        if self.cache is None:
            self.cache, self.mask = cache, mask
            return
        width = max(self.width, mask.shape[1])
        self.mask = torch.cat([_pad_left(self.mask, width), _pad_left(mask, width)])
        for mine, theirs in zip(self.cache.layers, cache.layers, strict=True):
            mine.keys = torch.cat([_pad_left(mine.keys, width), _pad_left(theirs.keys, width)])
            mine.values = torch.cat([_pad_left(mine.values, width), _pad_left(theirs.values, width)])


def _pad_left(t: torch.Tensor, width: int) -> torch.Tensor:
    """Zeros on the left of the sequence axis: `(B, S)` masks or `(B, H, S, D)` keys / values to `width` positions."""
    missing = width - (t.shape[1] if t.dim() == 2 else t.shape[2])
    if not missing:
        return t
    return F.pad(t, (missing, 0)) if t.dim() == 2 else F.pad(t, (0, 0, missing, 0))
