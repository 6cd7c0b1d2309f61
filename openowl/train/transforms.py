"""Training and evaluation image transforms (docs/upstream.md, "Training and evaluation image transforms"), with
PIL and torch only.

- Train: RandomResizedCrop(size, scale (0.5, 1.0), ratio (3/4, 4/3), bicubic), then a horizontal flip with
  probability 0.5, then CLIP mean/std — upstream's `pipeline/data_utils` recipe (RandAugment off). The crop box is
  drawn as torchvision draws it (ten tries at a random area and log-uniform aspect ratio, else a centre crop).
- Eval: the processor's squash-resize to `size`×`size` (bicubic), then CLIP mean/std (upstream's dev transform).

All randomness comes from the `torch.Generator` passed in, so a run is reproducible and can be resumed: seed one
generator per (seed, epoch, sample index) with `make_generator`.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence

import torch
from PIL import Image

from openowl.constants import CLIP_MEAN, CLIP_STD
from openowl.processing import ImageInput, load_image, normalize

TRAIN_SCALE = (0.5, 1.0)
TRAIN_RATIO = (3 / 4, 4 / 3)

Box = tuple[int, int, int, int]  # (left, top, right, bottom), PIL's crop box


def make_generator(*keys: int) -> torch.Generator:
    """A CPU generator seeded from integer keys, e.g. `(seed, epoch, index)`.

    The keys are hashed (BLAKE2b) rather than added, so neighbouring keys give unrelated streams, and the seed is
    the same in every process (unlike Python's `hash`).
    """
    digest = hashlib.blake2b(":".join(str(int(k)) for k in keys).encode(), digest_size=8).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest, "little") & (2**63 - 1))


def random_resized_crop_box(
    width: int,
    height: int,
    generator: torch.Generator,
    scale: Sequence[float] = TRAIN_SCALE,
    ratio: Sequence[float] = TRAIN_RATIO,
) -> Box:
    """The crop box of torchvision's `RandomResizedCrop.get_params`, drawn from `generator`.

    Up to ten tries at an area of `scale` × the image's area and an aspect ratio (w/h) drawn log-uniformly from
    `ratio`; when none fits, the largest centre crop whose aspect ratio is within `ratio`.

    Returns:
        `(left, top, right, bottom)`.
    """
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * torch.empty(1).uniform_(scale[0], scale[1], generator=generator).item()
        aspect = math.exp(torch.empty(1).uniform_(log_ratio[0], log_ratio[1], generator=generator).item())
        w = round(math.sqrt(target_area * aspect))
        h = round(math.sqrt(target_area / aspect))
        if 0 < w <= width and 0 < h <= height:
            top = int(torch.randint(0, height - h + 1, (1,), generator=generator).item())
            left = int(torch.randint(0, width - w + 1, (1,), generator=generator).item())
            return left, top, left + w, top + h
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, round(width / min(ratio))
    elif in_ratio > max(ratio):
        w, h = round(height * max(ratio)), height
    else:
        w, h = width, height
    top, left = (height - h) // 2, (width - w) // 2
    return left, top, left + w, top + h


def sample_train_params(
    width: int,
    height: int,
    generator: torch.Generator,
    scale: Sequence[float] = TRAIN_SCALE,
    ratio: Sequence[float] = TRAIN_RATIO,
    flip_p: float = 0.5,
) -> tuple[Box, bool]:
    """The random choices of `train_transform` for an image of `width`×`height`: the crop box, then the flip."""
    box = random_resized_crop_box(width, height, generator, scale, ratio)
    flip = bool(torch.rand(1, generator=generator).item() < flip_p)
    return box, flip


def train_transform(
    image: ImageInput,
    size: int,
    generator: torch.Generator,
    mean: Sequence[float] = CLIP_MEAN,
    std: Sequence[float] = CLIP_STD,
    scale: Sequence[float] = TRAIN_SCALE,
    ratio: Sequence[float] = TRAIN_RATIO,
    flip_p: float = 0.5,
) -> torch.Tensor:
    """Random resized crop to `size`×`size` (bicubic), horizontal flip with probability `flip_p`, mean/std.

    Args:
        image: a PIL image, a path or an image file's bytes; converted to upright RGB as
            `openowl.processing.load_image` does.
        size: the output side.
        generator: the only source of randomness (see `make_generator`).
        mean, std: per-channel normalisation (CLIP's by default).
        scale, ratio: the crop's area fraction and aspect-ratio (w/h) ranges.
        flip_p: the probability of a horizontal flip.

    Returns:
        `(3, size, size)` float32.

    Raises:
        FileNotFoundError, ValueError: as `load_image`, for a missing or unreadable file.
    """
    image = load_image(image)
    box, flip = sample_train_params(image.width, image.height, generator, scale, ratio, flip_p)
    image = image.crop(box).resize((size, size), Image.BICUBIC)
    if flip:
        image = image.transpose(Image.FLIP_LEFT_RIGHT)
    return normalize(image, mean, std)


def eval_transform(
    image: ImageInput, size: int, mean: Sequence[float] = CLIP_MEAN, std: Sequence[float] = CLIP_STD
) -> torch.Tensor:
    """Squash-resize to `size`×`size` (bicubic, aspect ratio not kept), then mean/std: `(3, size, size)` float32.

    Identical to `OwlProcessor.preprocess_images` for one image.
    """
    return normalize(load_image(image).resize((size, size), Image.BICUBIC), mean, std)
