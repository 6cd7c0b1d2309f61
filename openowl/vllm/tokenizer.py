"""The tokenizer vLLM runs for an mPLUG-Owl checkpoint (`tokenizer_mode="openowl"`): the checkpoint's own tokenizer,
as openowl loads it, that tokenizes a prompt exactly as openowl's processor does.

openowl tokenizes a prompt chunk by chunk around its `<image>` tags (each chunk gets SentencePiece's leading "▁"),
upstream's way; one pass over the whole string gives other ids. Here each tag becomes one *image token*, an id just
past the vocabulary, which the multimodal processor then grows into the image's visual tokens. The checkpoints of the
upstream prompt format get the chat template that renders `openowl.prompts.build_prompt`'s text; chat-template
checkpoints (owl-small) keep their own.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

from transformers import BatchEncoding, PreTrainedTokenizerBase

from openowl import loading
from openowl.constants import IMAGE_PLACEHOLDER_ID, IMAGE_TAG, VIDEO_PLACEHOLDER_ID
from openowl.processing import OwlProcessor
from openowl.prompts import AI_PREFIX, DEFAULT_SYSTEM, HUMAN_PREFIX

# `build_prompt` as a Jinja chat template, after the BOS that openowl's processor puts first (vLLM tokenizes chat
# prompts without adding special tokens): the system line (a system message's text, else upstream's default), one
# "Human: " line per image or text part of a user message, "AI: " before each answer and, to generate, at the end.
MPLUG_OWL_CHAT_TEMPLATE = (
    "{%- set ns = namespace(system=" + repr(DEFAULT_SYSTEM) + ") -%}"
    "{%- for message in messages if message['role'] == 'system' -%}"
    "{%- if message['content'] is string -%}{%- set ns.system = message['content'] -%}"
    "{%- else -%}{%- set ns.system = message['content'] | selectattr('type', 'equalto', 'text')"
    " | map(attribute='text') | join('') -%}{%- endif -%}"
    "{%- endfor -%}"
    "{{- bos_token + ns.system -}}"
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'user' -%}"
    "{%- if message['content'] is string -%}{{- '\\n" + HUMAN_PREFIX + "' + message['content'] -}}"
    "{%- else -%}{%- for part in message['content'] -%}"
    "{%- if part['type'] == 'image' -%}{{- '\\n" + HUMAN_PREFIX + IMAGE_TAG + "' -}}"
    "{%- elif part['type'] == 'text' -%}{{- '\\n" + HUMAN_PREFIX + "' + part['text'] -}}"
    "{%- else -%}{{- raise_exception('mPLUG-Owl takes image and text parts, not ' + part['type']) -}}"
    "{%- endif -%}{%- endfor -%}{%- endif -%}"
    "{%- elif message['role'] == 'assistant' -%}"
    "{%- if message['content'] is string -%}{{- '\\n" + AI_PREFIX + "' + message['content'] -}}"
    "{%- else -%}{{- '\\n" + AI_PREFIX + "' + (message['content'] | selectattr('type', 'equalto', 'text')"
    " | map(attribute='text') | join('')) -}}{%- endif -%}"
    "{%- elif message['role'] != 'system' -%}"
    "{{- raise_exception('unknown message role ' + message['role'] + ' (expected system, user or assistant)') -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '\\n" + AI_PREFIX + "' -}}{%- endif -%}"
)


class OwlTokenizer:
    """What vLLM's tokenizer registry loads for `tokenizer_mode="openowl"`."""

    @classmethod
    def from_pretrained(cls, path_or_repo_id: str | Path, *args: Any, revision: str | None = None, **kwargs: Any):
        """The tokenizer of a checkpoint folder, a hub id or a built-in model name (`openowl.loading` finds it)."""
        return owl_tokenizer(loading.resolve_checkpoint(path_or_repo_id, revision))


def owl_tokenizer(folder: Path) -> PreTrainedTokenizerBase:
    """The checkpoint's tokenizer (as `OwlProcessor.from_folder` loads it), made to tokenize as openowl does.

    It is the tokenizer object itself, with its class swapped for a subclass (as vLLM's own cached tokenizers are), so
    that decoding, the vocabulary and the special tokens are the checkpoint's; `image_token_id` is the image token.
    """
    processor = OwlProcessor.from_folder(folder)
    tokenizer = copy.copy(processor.tokenizer)  # the processor keeps tokenizing with the unchanged original
    if processor.prompt_format == "mplug-owl":
        tokenizer.chat_template = MPLUG_OWL_CHAT_TEMPLATE
    vocab = processor.tokenizer.get_vocab()
    base = type(processor.tokenizer)
    tokenizer.__class__ = type(f"Owl{base.__name__}", (OwlPromptTokenizer, base), {})
    tokenizer.owl_folder, tokenizer.owl_processor = folder, processor
    tokenizer.image_token_id = max(len(processor.tokenizer), max(vocab.values()) + 1)
    tokenizer.owl_max_chars = max(len(token) for token in vocab)
    return tokenizer


class OwlPromptTokenizer:
    """What `owl_tokenizer` adds to the checkpoint's tokenizer class: openowl's tokenization of prompts, and the
    image token (no piece of the vocabulary: it reads back as the tag, for vLLM detokenizes prompts' tails)."""

    owl_folder: Path
    owl_processor: OwlProcessor
    image_token_id: int
    owl_max_chars: int

    def __call__(self, text, text_pair=None, add_special_tokens=True, truncation=False, max_length=None, **_):
        if text_pair is not None:
            raise ValueError("mPLUG-Owl prompts are single texts (no text_pair)")
        rows = [text] if isinstance(text, str) else list(text)
        ids = [self.encode(t, truncation, max_length, add_special_tokens) for t in rows]
        mask = [[1] * len(row) for row in ids]
        if isinstance(text, str):
            return BatchEncoding({"input_ids": ids[0], "attention_mask": mask[0]})
        return BatchEncoding({"input_ids": ids, "attention_mask": mask})

    def encode(self, text, truncation=None, max_length=None, add_special_tokens=True, **_) -> list[int]:
        ids = prompt_ids(self.owl_processor, text, add_special_tokens, self.image_token_id)
        if truncation and max_length is not None and len(ids) > max_length:
            ids = ids[-max_length:] if self.truncation_side == "left" else ids[:max_length]
        return ids

    def convert_ids_to_tokens(self, ids, skip_special_tokens=False):
        if self.image_token_id not in ([ids] if isinstance(ids, int) else ids):
            return super().convert_ids_to_tokens(ids, skip_special_tokens)
        if isinstance(ids, int):
            return IMAGE_TAG
        convert = super().convert_ids_to_tokens
        return [IMAGE_TAG if i == self.image_token_id else convert(i)
                for i in ids if not (skip_special_tokens and i == self.image_token_id)]  # fmt: skip

    def convert_tokens_to_string(self, tokens):
        if IMAGE_TAG not in tokens:
            return super().convert_tokens_to_string(tokens)
        return _join_around(tokens, IMAGE_TAG, super().convert_tokens_to_string)

    def decode(self, token_ids, skip_special_tokens=False, **kwargs):
        ids = [token_ids] if isinstance(token_ids, int) else list(token_ids)
        if self.image_token_id not in ids:
            return super().decode(token_ids, skip_special_tokens=skip_special_tokens, **kwargs)
        text = super().decode
        return _join_around(ids, self.image_token_id, lambda part: text(part, skip_special_tokens=skip_special_tokens))

    @property
    def max_token_id(self) -> int:
        return self.image_token_id

    @property
    def max_chars_per_token(self) -> int:
        return self.owl_max_chars

    def __reduce__(self):  # vLLM sends tokenizers to other processes: they load it again there
        return owl_tokenizer, (self.owl_folder,)


def _join_around(items: list, mark, convert) -> str:
    """`convert` applied to the stretches between the `mark`s of `items`, each mark written as the image tag."""
    out, stretch = [], []
    for item in items:
        if item == mark:
            out += [convert(stretch) if stretch else "", IMAGE_TAG]
            stretch = []
        else:
            stretch.append(item)
    return "".join(out) + (convert(stretch) if stretch else "")


def prompt_ids(processor: OwlProcessor, text: str, add_special_tokens: bool, image_token_id: int) -> list[int]:
    """openowl's ids of a prompt string (`OwlProcessor.tokenize_prompt`: BOS when the prompt format starts with one,
    special tokens are asked for and the text doesn't spell it already), with one `image_token_id` for each `<image>`.

    Raises:
        ValueError: a `<|video|>` tag (the vLLM plugin serves images only).
    """
    bos = processor.tokenizer.bos_token
    add_bos = add_special_tokens and processor.adds_bos and not (bos and text.startswith(bos))
    ids = processor.tokenize_prompt(text, add_bos=add_bos)
    if VIDEO_PLACEHOLDER_ID in ids:
        raise ValueError("the vLLM plugin serves images, not videos: the prompt holds a <|video|> tag")
    out, run = [], 0
    for i in ids:
        if i != IMAGE_PLACEHOLDER_ID:
            out.append(i)
            continue
        run += 1
        if run == processor.num_visual_tokens:  # each tag is a run of exactly num_visual_tokens placeholders
            out.append(image_token_id)
            run = 0
    return out
