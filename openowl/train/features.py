"""The frozen-encoder feature cache: a frozen ViT's outputs for every training image, computed once and stored, so
that training runs the abstractor and the language model on them instead of running the ViT again every epoch.

The cache is right only when the ViT's output for an image never changes: the ViT is frozen and the image takes
the deterministic eval transform (`check_cacheable` refuses anything else, saying why).

A cache folder holds:

- `features-00000.safetensors`, `features-00001.safetensors`, ...: one float32 tensor `(257, C)` per image (the ViT's
  output, CLS included), named by the image's key. The shard's metadata records the cache's settings (`settings`:
  what the features depend on), every image of its group in order (`images`, the undecodable ones included) and
  the undecodable ones with a name each (`skipped`, a JSON object).
- `cache.json`, the manifest, written last: the settings (image size, mean/std, the ViT's weights digest, dtype),
  the feature shape and the shard list. A folder without it is a cache whose build has not finished.

Keys are content hashes: the sha256 (hex) of the image file's bytes, so images read from paths, tar members or
parquet rows all find their features, and an image listed twice is stored once.

Shards and resumption: the distinct images, in input order, are cut into groups of `shard_size`; group i is shard i
(an undecodable image keeps its place in its group and is listed as skipped, so the groups follow from the bytes
alone and nothing is decoded to find them). Each shard is written atomically (`files.atomic_write`), so a shard
file that exists is whole; a rerun keeps every shard whose settings and images match and runs the ViT only on the
others. Over several processes shard i is computed by process `i % world`; every process reads (and hashes) all
images, and the one that finds every shard complete writes the manifest.
"""

from __future__ import annotations

import copy
import hashlib
import json
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import torch
from PIL import Image, UnidentifiedImageError
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from openowl import files
from openowl.processing import OwlProcessor
from openowl.train.policy import TrainPolicy
from openowl.train.transforms import eval_transform

MANIFEST = "cache.json"
SHARD_PATTERN = "features-{:05d}.safetensors"
FORMAT = "openowl-feature-cache/1"
_DECODE_ERRORS = (UnidentifiedImageError, Image.DecompressionBombError, OSError, SyntaxError, ValueError)
ImageItem = bytes | tuple[str, bytes]  # an image file's bytes, or (a name to report it by, its bytes)


def check_cacheable(policy: TrainPolicy, augment: bool) -> None:
    """Refuse a feature cache where the ViT's output for an image would change during training.

    Raises:
        ValueError: the policy trains the ViT, or images are augmented; naming why the cache would be wrong.
    """
    if policy.vision != "frozen":
        raise ValueError(
            f"a feature cache needs a frozen ViT, but this policy trains it (vision: {policy.vision}): its outputs "
            "change at every step, so cached ones would be stale; choose a policy with a frozen ViT or unset "
            "data.features"
        )
    if augment:
        raise ValueError(
            "a feature cache needs deterministic images, but data.augment=true gives each image a new random crop "
            "and flip every epoch: a cache would train on one fixed view instead; set data.augment=false (the eval "
            "transform) or unset data.features"
        )


def image_key(data: bytes) -> str:
    """An image's key in a cache: the sha256 (hex) of its file's bytes (`files.sha256` of a file gives the same)."""
    return hashlib.sha256(data).hexdigest()


def vision_digest(model: torch.nn.Module) -> str:
    """A digest of the ViT's weights (names, shapes and float32 values), so that a cache made by another ViT is
    refused. Values are hashed as float32: a frozen weight stored in bf16 without loss (`train.bf16`) still
    matches."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.vision_model.state_dict().items()):
        digest.update(f"{name}:{tuple(tensor.shape)};".encode())
        digest.update(tensor.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return "sha256:" + digest.hexdigest()


def cache_settings(model: torch.nn.Module, processor: OwlProcessor) -> dict[str, Any]:
    """What cached features depend on: the eval transform's size and mean/std, the ViT's weights, the dtype."""
    return {
        "format": FORMAT,
        "transform": "eval",
        "image_size": processor.image_size,
        "image_mean": [float(x) for x in processor.image_mean],
        "image_std": [float(x) for x in processor.image_std],
        "vision_model": vision_digest(model),
        "dtype": "float32",
    }


def cache_digest(folder: str | Path) -> str:
    """A cache's identity for a run's settings: the sha256 of its manifest (the folder may move; what it holds
    may not change under a resumed run), or the folder's name while it has none."""
    manifest = Path(folder) / MANIFEST
    return f"sha256:{files.sha256(manifest)}" if manifest.is_file() else str(folder)


# --- building --------------------------------------------------------------------------------------


def build_feature_cache(
    model: torch.nn.Module,
    processor: OwlProcessor,
    images: Iterable[ImageItem],
    folder: str | Path,
    shard_size: int = 256,
    batch_size: int = 16,
    rank: int = 0,
    world: int = 1,
) -> dict[str, Any]:
    """Run the ViT once over every distinct image and store its outputs in `folder` (see the module docstring).

    Images go through the eval transform and `model.vision_model` in float32 (`float32_vision`), in eval mode,
    without gradients. Undecodable images are skipped and counted, never fatal. Shards already complete are kept as
    they are (the ViT does not run on them), so an interrupted build continues where it stopped.

    Args:
        model: an `OwlForConditionalGeneration`; only its `vision_model` runs, on the device it is on.
        processor: gives the image size and mean/std.
        images: image file bytes, or `(name, bytes)` pairs (the name is only for the report), in input order.
        folder: the cache folder (created).
        shard_size: images per shard (the undecodable ones included).
        batch_size: images per ViT call.
        rank, world: this process's index and the number of processes; shard i is computed by rank `i % world`.

    Returns:
        Counts: `images` (distinct), `duplicates`, `cached` (now, by this process), `already_cached`,
        `other_processes` (left to the other ranks), `skipped` and `skipped_names` (the first few), `shards`, and
        `complete` (every shard exists and the manifest is written).
    """
    if shard_size < 1 or batch_size < 1 or not 0 <= rank < world:
        raise ValueError(f"need shard_size, batch_size ≥ 1 and 0 ≤ rank < world; got {shard_size}, {batch_size}, "
                         f"rank {rank} of {world}")  # fmt: skip
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / MANIFEST).unlink(missing_ok=True)  # rewritten once every shard matches this build
    settings = cache_settings(model, processor)
    vision = float32_vision(model)
    counts = {"images": 0, "duplicates": 0, "cached": 0, "already_cached": 0, "other_processes": 0, "skipped": 0}
    skipped_names: list[str] = []
    groups: list[list[str]] = []
    for index, group in enumerate(_groups(images, shard_size, counts)):
        groups.append([key for key, _, _ in group])
        path = folder / SHARD_PATTERN.format(index)
        stored = _complete_shard(path, settings, groups[-1])
        if stored is None and index % world != rank:
            counts["other_processes"] += len(group)
            continue
        if stored is None:
            stored = _write_shard(path, vision, processor, group, settings, batch_size)
            counts["cached"] += stored["rows"]
        else:
            counts["already_cached"] += stored["rows"]
        counts["skipped"] += len(stored["skipped"])
        skipped_names += list(stored["skipped"].values())
    complete = _write_manifest(folder, settings, groups)
    return {**counts, "skipped_names": skipped_names[:5], "shards": len(groups), "complete": complete}


def _groups(images: Iterable[ImageItem], shard_size: int, counts: dict[str, int]) -> Iterator[list[tuple]]:
    """The distinct images in input order, in groups of `shard_size`: lists of `(key, name, bytes)`."""
    seen: set[str] = set()
    group: list[tuple[str, str, bytes]] = []
    for number, item in enumerate(images):
        name, data = item if isinstance(item, tuple) else (f"image #{number}", item)
        key = image_key(data)
        if key in seen:
            counts["duplicates"] += 1
            continue
        seen.add(key)
        counts["images"] += 1
        group.append((key, name, data))
        if len(group) == shard_size:
            yield group
            group = []
    if group:
        yield group


def _complete_shard(path: Path, settings: dict[str, Any], keys: list[str]) -> dict[str, Any] | None:
    """`{rows, skipped}` of a shard file made under `settings` from exactly the images `keys`; None when it is
    missing, unreadable or made from something else (it is then computed again)."""
    if not path.is_file():
        return None
    try:
        with safe_open(path, framework="pt") as f:
            meta, rows = f.metadata() or {}, len(f.keys())
        if json.loads(meta["settings"]) != settings or json.loads(meta["images"]) != keys:
            return None
        return {"rows": rows, "skipped": json.loads(meta["skipped"])}
    except (SafetensorError, OSError, KeyError, ValueError, TypeError):  # a foreign or damaged file
        return None


def _write_shard(
    path: Path, vision: torch.nn.Module, processor: OwlProcessor, group: list[tuple], settings: dict, batch_size: int
) -> dict[str, Any]:
    """Encode a group and write its shard atomically; returns `{rows, skipped}` as `_complete_shard` does."""
    for stale in path.parent.glob(f".{path.name}.*.tmp"):  # left by a process killed while writing this shard
        stale.unlink(missing_ok=True)
    pixels, skipped = {}, {}
    for key, name, data in group:
        try:
            pixels[key] = _eval_pixels(data, processor)
        except _DECODE_ERRORS as err:
            skipped[key] = f"{name} ({err})"
    tensors = encode_images(vision, pixels, batch_size)
    metadata = {"settings": json.dumps(settings), "images": json.dumps([key for key, _, _ in group]),
                "skipped": json.dumps(skipped)}  # fmt: skip
    files.atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))
    return {"rows": len(tensors), "skipped": skipped}


def _eval_pixels(data: bytes, processor: OwlProcessor) -> torch.Tensor:
    """An image file's bytes through the eval transform: `(3, size, size)` float32."""
    return eval_transform(data, processor.image_size, processor.image_mean, processor.image_std)


def float32_vision(model: torch.nn.Module) -> torch.nn.Module:
    """The model's ViT in float32: itself, or a float32 copy when it is held in another dtype (cached features are
    float32 whatever the model's dtype)."""
    vision = model.vision_model
    if any(p.dtype != torch.float32 for p in vision.parameters()):
        vision = copy.deepcopy(vision).float()
    return vision


@torch.no_grad()
def encode_images(vision: torch.nn.Module, pixels: dict[str, torch.Tensor], batch_size: int) -> dict[str, torch.Tensor]:
    """`{key: (3, H, W) pixels}` -> `{key: (257, C)}` outputs of the ViT `vision` (see `float32_vision`), float32 on
    the CPU, `batch_size` images a call, in eval mode (no dropout)."""
    device = next(vision.parameters()).device
    was_training = vision.training
    vision.eval()
    keys, out = list(pixels), {}
    try:
        for start in range(0, len(keys), batch_size):
            chunk = keys[start : start + batch_size]
            batch = torch.stack([pixels[key] for key in chunk]).to(device)  # (B, 3, H, W)
            tokens = vision(batch).float().cpu()  # (B, 257, C)
            out.update({key: row.clone() for key, row in zip(chunk, tokens, strict=True)})  # own storage each
    finally:
        vision.train(was_training)
    return out


def _write_manifest(folder: Path, settings: dict[str, Any], groups: list[list[str]]) -> bool:
    """Write `cache.json` when every shard of the build is complete; returns whether it did."""
    shards, shape = [], None
    for index, keys in enumerate(groups):
        path = folder / SHARD_PATTERN.format(index)
        stored = _complete_shard(path, settings, keys)
        if stored is None:
            return False  # another process has yet to write it; the last one to finish writes the manifest
        shards.append({"file": path.name, "rows": stored["rows"], "skipped": len(stored["skipped"])})
        if shape is None and stored["rows"]:
            with safe_open(path, framework="pt") as f:
                shape = list(f.get_slice(next(iter(f.keys()))).get_shape())
    manifest = {**settings, "shape": shape, "images": sum(s["rows"] for s in shards),
                "skipped": sum(s["skipped"] for s in shards), "shards": shards}  # fmt: skip
    files.atomic_write_text(folder / MANIFEST, json.dumps(manifest, indent=1) + "\n")
    return True


def describe(summary: dict[str, Any], folder: str | Path) -> str:
    """`build_feature_cache`'s counts as one line."""
    s = summary
    skipped = f"{s['skipped']} skipped"
    if s["skipped_names"]:
        more = ", ..." if s["skipped"] > len(s["skipped_names"]) else ""
        skipped += f" ({', '.join(s['skipped_names'])}{more})"
    left = f", {s['other_processes']} left to other processes" if s["other_processes"] else ""
    state = "complete" if s["complete"] else "incomplete: waiting for other processes' shards"
    return (f"feature cache {folder}: {s['images']} images ({s['duplicates']} duplicates), {s['cached']} cached now, "
            f"{s['already_cached']} already cached{left}, {skipped}; {s['shards']} shards, {state}")  # fmt: skip


# --- reading ---------------------------------------------------------------------------------------


class FeatureCache:
    """A built cache folder, read back: `get(key)` gives an image's ViT output `(257, C)` float32.

    Shards are opened on first use with `safetensors.safe_open` (memory-mapped) and the key -> shard index is read
    from the shard headers once. Open shards are not pickled: a DataLoader worker gets a copy that reopens them.

    Args:
        folder: the cache folder.
        model, processor: when given, the manifest is checked against them (the ViT's weights; the image size and
            mean/std), so features of another ViT or another transform are never trained on.

    Raises:
        FileNotFoundError: no manifest (not a cache, or its build has not finished).
        ValueError: the cache holds no features, or was made for another ViT or transform (naming what differs).
    """

    def __init__(self, folder: str | Path, model: torch.nn.Module | None = None, processor: OwlProcessor | None = None):
        self.folder = Path(folder)
        manifest = self.folder / MANIFEST
        if not manifest.is_file():
            raise FileNotFoundError(f"{self.folder}: no {MANIFEST}: not a feature cache, or its build has not "
                                    "finished (run `openowl data cache-features` again to complete it)")  # fmt: skip
        self.manifest = json.loads(manifest.read_text())
        if self.manifest.get("format") != FORMAT:
            raise ValueError(f"{self.folder}: a feature cache of format {self.manifest.get('format')!r}, not {FORMAT}")
        if not self.manifest["shape"]:
            raise ValueError(f"{self.folder}: the feature cache holds no features (every image was skipped)")
        self.shape = tuple(self.manifest["shape"])  # (257, C)
        if model is not None or processor is not None:
            self.check(model, processor)
        self._index: dict[str, str] | None = None
        self._open: dict[str, Any] = {}

    def check(self, model: torch.nn.Module | None, processor: OwlProcessor | None) -> None:
        """Raise a ValueError naming each setting of the manifest that differs from the model's or processor's."""
        now: dict[str, Any] = {}
        if processor is not None:
            now.update({"image_size": processor.image_size, "image_mean": [float(x) for x in processor.image_mean],
                        "image_std": [float(x) for x in processor.image_std]})  # fmt: skip
        if model is not None:
            now["vision_model"] = vision_digest(model)
        differ = [f"{key}: cache {self.manifest.get(key)!r}, now {value!r}" for key, value in now.items()
                  if self.manifest.get(key) != value]  # fmt: skip
        if differ:
            what = "the ViT's weights differ" if "vision_model" in "".join(differ) else "the image transform differs"
            raise ValueError(f"{self.folder}: this feature cache was made for other inputs ({what}): "
                             f"{'; '.join(differ)}. Rebuild it with `openowl data cache-features` or point "
                             "data.features at a cache of this model")  # fmt: skip

    def _shard_of(self) -> dict[str, str]:
        if self._index is None:
            self._index = {}
            for shard in self.manifest["shards"]:
                with safe_open(self.folder / shard["file"], framework="pt") as f:
                    self._index.update(dict.fromkeys(f.keys(), shard["file"]))
        return self._index

    def __len__(self) -> int:
        return len(self._shard_of())

    def __contains__(self, key: str) -> bool:
        return key in self._shard_of()

    def get(self, key: str, name: str | None = None) -> torch.Tensor:
        """The ViT output `(257, C)` float32 of the image whose key (`image_key`) is `key`.

        Raises:
            KeyError: the image is not in the cache, naming it (`name`, e.g. its path, else its key).
        """
        file = self._shard_of().get(key)
        if file is None:
            raise KeyError(f"image {name or key} (sha256 {key}) is not in the feature cache {self.folder}; rebuild the "
                           "cache for this data with `openowl data cache-features`")  # fmt: skip
        if file not in self._open:
            self._open[file] = safe_open(self.folder / file, framework="pt")
        return self._open[file].get_tensor(key)

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_open": {}}  # safetensors handles don't pickle; a worker reopens its own
