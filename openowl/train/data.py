"""Training samples: the upstream tokenization of a `Human:` / `AI:` conversation and its loss mask.

The conversation text is split on `<image>`, `AI: ` and `\\nHuman: `; each piece is tokenized on its own. The
piece after each `AI: ` is an answer: it is followed by EOS and it (with its EOS) is what the loss is computed
on. Everything else — system line, questions, delimiters, image placeholders — is context.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from transformers import PreTrainedTokenizerBase

from openowl.model.owl import IGNORE_INDEX, IMAGE_PLACEHOLDER_ID
from openowl.processing import IMAGE_TAG

AI_DELIMITER = "AI: "
HUMAN_DELIMITER = "\nHuman: "
_SPLIT = re.compile(f"({re.escape(IMAGE_TAG)}|{re.escape(AI_DELIMITER)}|{re.escape(HUMAN_DELIMITER)})")


@dataclass
class TokenizedSample:
    """`input_ids` is `max_length + 1` long (right-padded); the three masks are `max_length` long and aligned
    with next-token targets: position t says whether token t + 1 is real, text, and part of an answer."""

    input_ids: torch.Tensor
    non_padding_mask: torch.Tensor
    non_media_mask: torch.Tensor
    prompt_mask: torch.Tensor
    num_images: int

    @property
    def labels(self) -> torch.Tensor:
        """transformers-style labels: the ids where a loss is taken, IGNORE_INDEX elsewhere."""
        keep = self.non_padding_mask * self.non_media_mask * self.prompt_mask
        labels = self.input_ids.clone()
        labels[1:][keep == 0] = IGNORE_INDEX
        labels[0] = IGNORE_INDEX
        return labels

    @property
    def num_supervised(self) -> int:
        return int((self.non_padding_mask * self.non_media_mask * self.prompt_mask).sum())


def tokenize_conversation(
    text: str, tokenizer: PreTrainedTokenizerBase, max_length: int, num_visual_tokens: int = 65
) -> TokenizedSample:
    """Tokenize one training conversation exactly as upstream does (SPEC §6.5).

    An image block that would not fit is dropped whole; other pieces are cut to the room left, and an answer
    keeps its EOS only if there is room for it.
    """
    room = max_length + 1
    ids: list[int] = [tokenizer.bos_token_id]
    is_answer: list[int] = [0]
    num_images = 0
    after_ai = False
    for piece in _SPLIT.split(text):
        if not piece:
            continue
        left = room - len(ids)
        if piece == IMAGE_TAG:
            if num_visual_tokens <= left:
                ids += [IMAGE_PLACEHOLDER_ID] * num_visual_tokens
                is_answer += [0] * num_visual_tokens
                num_images += 1
            after_ai = False
            continue
        tokens = tokenizer(piece, add_special_tokens=False)["input_ids"]
        if after_ai:
            tokens = (tokens + [tokenizer.eos_token_id])[:left]
            is_answer += [1] * len(tokens)
        else:
            tokens = tokens[:left]
            is_answer += [0] * len(tokens)
        ids += tokens
        after_ai = piece == AI_DELIMITER
    length = len(ids)
    pad = room - length
    input_ids = torch.tensor(ids + [tokenizer.pad_token_id] * pad, dtype=torch.long)
    answer = torch.tensor(is_answer + [0] * pad, dtype=torch.long)
    return TokenizedSample(
        input_ids=input_ids,
        non_padding_mask=(torch.arange(max_length) < length - 1).long(),
        non_media_mask=(input_ids[1:] >= 0).long(),
        prompt_mask=answer[1:],
        num_images=num_images,
    )
