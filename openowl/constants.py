"""Names every layer shares: placeholder ids, media tags, normalisation constants and the weight dtypes.

This module imports nothing of openowl's: processing, the model, training and serving all read these from here.
"""

from __future__ import annotations

import torch

# Prompt ids: each `<image>` / `<|video|>` tag becomes `num_visual_tokens` of these, which the model replaces with
# the visual tokens (`model/owl.py`, `embed_inputs`).
IMAGE_PLACEHOLDER_ID = -1
VIDEO_PLACEHOLDER_ID = -2
IGNORE_INDEX = -100  # a label that takes no loss (transformers' convention)

IMAGE_TAG = "<image>"
VIDEO_TAG = "<|video|>"

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def as_dtype(dtype: torch.dtype | str) -> torch.dtype:
    """A weight dtype from its name ("bfloat16", "torch.bfloat16") or itself.

    Raises:
        ValueError: a dtype other than float32, bfloat16 or float16.
    """
    name = str(dtype).removeprefix("torch.")
    if name not in DTYPES:
        raise ValueError(f"unsupported dtype {dtype!r} (use {', '.join(DTYPES)})")
    return DTYPES[name]
