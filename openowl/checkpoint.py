"""Checkpoint I/O on a local folder: read `pytorch_model*.bin` (always `weights_only`) or `*.safetensors`, single
or sharded, check every key and shape before anything is loaded, and save sharded safetensors atomically.
(Finding the folder of a name, a hub id or a built-in model, is `openowl.loading`'s job.)

Loading never holds two copies of the weights: the model is built without storage (parameters on the `meta`
device), files are memory-mapped, and each tensor is cast straight into its parameter, one file at a time.
"""

from __future__ import annotations

import json
import logging
import os
import re
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import init_empty_weights
from safetensors import SafetensorError, safe_open
from torch import nn

from openowl.config import OwlConfig
from openowl.constants import as_dtype
from openowl.files import replace
from openowl.model.owl import OwlForConditionalGeneration

logger = logging.getLogger(__name__)

SAFE_INDEX = "model.safetensors.index.json"
BIN_INDEX = "pytorch_model.bin.index.json"
# Buffers that transformers 4.28 wrote into the files; RoPE frequencies are recomputed from the config.
IGNORED_KEYS = re.compile(r".*\.rotary_emb\.inv_freq$")
ABSTRACTOR_MLP_KEY = "abstractor.encoder.layers.0.crossattention.output.mlp.w1.weight"
TEMPORAL_DOWN_KEY = "vision_model.encoder.layers.0.temporal.down_proj.weight"


class CheckpointError(ValueError):
    """A checkpoint that can't be loaded as it is: the message names the file and the key."""


# --- the files of a checkpoint -------------------------------------------------------------------


def weight_files(folder: Path) -> list[Path]:
    """The weight files of a checkpoint: safetensors (sharded, then single) before pickled `.bin`.

    Raises:
        CheckpointError: no weights, a broken index, or an index naming a missing shard.
    """
    for index_name, single in ((SAFE_INDEX, "model.safetensors"), (BIN_INDEX, "pytorch_model.bin")):
        index = folder / index_name
        if index.is_file():
            try:
                shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            except (json.JSONDecodeError, KeyError, AttributeError) as err:
                raise CheckpointError(f"{index}: not a valid shard index ({err})") from err
            missing = [s for s in shards if not (folder / s).is_file()]
            if missing:
                raise CheckpointError(f"{index}: names shard(s) that are not in the folder: {', '.join(missing)}")
            return [folder / s for s in shards]
        if (folder / single).is_file():
            return [folder / single]
    raise CheckpointError(f"{folder}: no weights (model.safetensors, pytorch_model.bin or a sharded index)")


# --- reading tensors -----------------------------------------------------------------------------


@dataclass
class TensorInfo:
    file: Path
    shape: tuple[int, ...]
    name: str  # the key as stored in the file


@contextmanager
def open_weights(file: Path) -> Iterator[dict[str, torch.Tensor] | object]:
    """Open one weight file lazily: a safetensors handle, or a memory-mapped `weights_only` state dict.

    Raises:
        CheckpointError: a truncated or corrupt file, or a pickle that would run code, naming the file.
    """
    if file.suffix == ".safetensors":
        try:
            with safe_open(file, framework="pt") as handle:
                yield handle
        except SafetensorError as err:
            raise CheckpointError(f"{file}: unreadable safetensors file, truncated or corrupt ({err})") from err
        return
    try:
        state = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError as err:
        if "mmap" not in str(err):
            raise CheckpointError(f"{file}: unreadable checkpoint, truncated or corrupt ({err})") from err
        state = _load_bin_without_mmap(file)  # the pre-1.6 (non-zip) format can't be memory-mapped
    except Exception as err:  # UnpicklingError for code-carrying pickles; EOFError, zip errors for damage
        raise CheckpointError(
            f"{file}: refused or unreadable ({type(err).__name__}: {err}). Only plain tensor checkpoints load; "
            "pickled code is never executed."
        ) from err
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{file}: not a state dict of tensors")
    yield state


def _load_bin_without_mmap(file: Path) -> dict[str, torch.Tensor]:
    try:
        return torch.load(file, map_location="cpu", weights_only=True)
    except Exception as err:
        raise CheckpointError(f"{file}: refused or unreadable ({type(err).__name__}: {err})") from err


def _keys_and_shapes(handle) -> Iterator[tuple[str, tuple[int, ...]]]:
    if isinstance(handle, dict):
        for key, tensor in handle.items():
            yield key, tuple(tensor.shape)
    else:
        names = handle.keys()  # a safetensors handle is not iterable
        for key in names:
            yield key, tuple(handle.get_slice(key).get_shape())


def _get(handle, key: str) -> torch.Tensor:
    return handle[key] if isinstance(handle, dict) else handle.get_tensor(key)


def read_index(files: list[Path]) -> dict[str, TensorInfo]:
    """Every tensor's file and shape, read from headers (no tensor data is touched).

    Raises:
        CheckpointError: a damaged file, or a key that appears in two files.
    """
    index: dict[str, TensorInfo] = {}
    for file in files:
        with open_weights(file) as handle:
            for key, shape in _keys_and_shapes(handle):
                if IGNORED_KEYS.match(key):
                    continue
                if key in index:
                    raise CheckpointError(f"{file}: key {key!r} is also in {index[key].file}")
                index[key] = TensorInfo(file, shape, key)
    return index


# --- loading a model -----------------------------------------------------------------------------


def reconcile_config(config: OwlConfig, index: dict[str, TensorInfo]) -> OwlConfig:
    """Let the weights decide what upstream configs get wrong or don't say.

    The abstractor MLP width is read from the weights (released image configs and the video config disagree
    with their tensors: 2816 vs 4096, docs/upstream.md, Abstractor MLP width); the video modules exist when their
    tensors do.
    """
    if ABSTRACTOR_MLP_KEY in index:
        width = index[ABSTRACTOR_MLP_KEY].shape[0]
        if width != config.abstractor.intermediate_size:
            logger.info("abstractor MLP width %d from the weights (config says %d)", width,
                        config.abstractor.intermediate_size)  # fmt: skip
            config.abstractor.intermediate_size = width
    if "temporal_query_tokens" in index:
        config.video = True
        if TEMPORAL_DOWN_KEY in index:
            config.vision.temporal_hidden_size = index[TEMPORAL_DOWN_KEY].shape[0]
    return config


def expected_tensors(model: nn.Module) -> tuple[dict[str, tuple[int, ...]], dict[str, str]]:
    """The state-dict keys the model needs, with their shapes, and the other names of tied weights.

    Returns:
        `{key: shape}` with one key per tensor, and `{alias: key}` for tied weights (e.g. `lm_head.weight` tied
        to `embed_tokens.weight`): a checkpoint may store a tied tensor under any of its names.
    """
    first: dict[int, str] = {}
    shapes, aliases = {}, {}
    for key, tensor in model.state_dict(keep_vars=True).items():
        if id(tensor) in first:
            aliases[key] = first[id(tensor)]
            continue
        first[id(tensor)] = key
        shapes[key] = tuple(tensor.shape)
    return shapes, aliases


def resolve_aliases(index: dict[str, TensorInfo], aliases: dict[str, str]) -> dict[str, TensorInfo]:
    """Store each tied tensor under the model's first name for it (when both names are stored, the first wins)."""
    out = {}
    for key, info in index.items():
        canonical = aliases.get(key, key)
        if canonical not in out or canonical == key:
            out[canonical] = info
    return out


def check_keys(expected: dict[str, tuple[int, ...]], index: dict[str, TensorInfo], folder: Path) -> None:
    """Raises CheckpointError naming every missing, unexpected or mis-shaped tensor (and its file)."""
    problems = []
    for key in sorted(expected.keys() - index.keys()):
        problems.append(f"missing tensor {key!r} (not in any weight file of {folder})")
    for key in sorted(index.keys() - expected.keys()):
        problems.append(f"{index[key].file.name}: unexpected tensor {key!r}")
    for key in sorted(expected.keys() & index.keys()):
        if expected[key] != index[key].shape:
            problems.append(
                f"{index[key].file.name}: tensor {key!r} has shape {list(index[key].shape)}, "
                f"the model expects {list(expected[key])}"
            )
    if problems:
        shown = "\n  ".join(problems[:20])
        more = f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else ""
        raise CheckpointError(f"checkpoint {folder} does not match the model:\n  {shown}{more}")


def _assign(model: nn.Module, key: str, tensor: torch.Tensor) -> None:
    module_name, _, name = key.rpartition(".")
    module = model.get_submodule(module_name)
    if name in module._parameters:
        module._parameters[name] = nn.Parameter(tensor, requires_grad=module._parameters[name].requires_grad)
    else:
        module._buffers[name] = tensor


def load_model(
    folder: str | Path,
    dtype: torch.dtype | str = torch.float32,
    device: str | torch.device = "cpu",
    device_map: str | dict[str, str | int] | None = None,
    max_memory: dict[str | int, str | int] | None = None,
) -> OwlForConditionalGeneration:
    """Build the model for a checkpoint and fill it; all-or-nothing.

    Args:
        device: where every weight goes, unless `device_map` is given.
        device_map: "auto" (spread over the GPUs, then the CPU, whole layers at a time, by accelerate) or an
            explicit `{module name: device}` map; each tensor is loaded straight onto its device.
        max_memory: per-device budgets for "auto", e.g. `{0: "20GiB", 1: "20GiB", "cpu": "60GiB"}`.

    Raises:
        CheckpointError: a damaged file, an unknown model_type, or tensors that don't fit the model.
    """
    dtype = as_dtype(dtype)
    folder = checkpoint_folder(folder)
    try:
        config = OwlConfig.from_json_file(folder / "config.json")
    except ValueError as err:
        raise CheckpointError(str(err)) from err
    files = weight_files(folder)
    index = read_index(files)
    config = reconcile_config(config, index)
    with init_empty_weights(include_buffers=False):
        model = OwlForConditionalGeneration(config)
    model.language_model.tie_weights()  # tie on the meta device too, so a tied tensor is expected once
    expected, aliases = expected_tensors(model)
    index = resolve_aliases(index, aliases)
    check_keys(expected, index, folder)
    placement = _device_map(model, device_map, max_memory, dtype) if device_map is not None else {"": device}
    for file in files:
        with open_weights(file) as handle:
            for key, info in index.items():
                if info.file == file:
                    tensor = _get(handle, info.name)
                    if tensor.is_floating_point():
                        tensor = tensor.to(dtype)
                    _assign(model, key, tensor.to(_device_of(key, placement)))
    model.language_model.tie_weights()
    if device_map is None:
        model.to(device)  # non-persistent buffers (RoPE frequencies) follow the weights
    else:
        from accelerate import dispatch_model

        model = dispatch_model(model, device_map=placement)  # hooks move activations between devices
    return model.eval()


def _device_map(model: nn.Module, device_map, max_memory, dtype: torch.dtype) -> dict[str, str | int]:
    if device_map != "auto":
        return dict(device_map)
    from accelerate import infer_auto_device_map

    layer_classes = {type(m).__name__ for m in model.modules() if type(m).__name__.endswith(("DecoderLayer", "Block"))}
    no_split = ["VisionLayer", "AbstractorLayer", "VisualAbstractor", *sorted(layer_classes)]
    return infer_auto_device_map(model, max_memory=max_memory, no_split_module_classes=no_split, dtype=dtype)


def _device_of(key: str, placement: dict[str, str | int]) -> str | int | torch.device:
    """The device of the longest module prefix of `key` in the map."""
    for prefix in sorted(placement, key=len, reverse=True):
        if prefix == "" or key == prefix or key.startswith(prefix + "."):
            return placement[prefix]
    raise CheckpointError(f"device_map places no module that holds {key!r}")


# --- saving --------------------------------------------------------------------------------------


def save_model(model: OwlForConditionalGeneration, folder: str | Path, max_shard_size: str | int = "2GB") -> None:
    """Sharded safetensors + `model.safetensors.index.json` + `config.json`, each file written atomically.

    Files are first written into a temporary folder beside the target and then renamed into place, the index
    last, so an interrupted save never leaves a checkpoint that looks complete but isn't.
    """
    from huggingface_hub import save_torch_state_dict

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: storable(v) for k, v in model.state_dict().items()}
    with tempfile.TemporaryDirectory(dir=folder, prefix=".saving-") as tmp:
        save_torch_state_dict(state, tmp, max_shard_size=max_shard_size, safe_serialization=True)
        model.config.to_json_file(Path(tmp) / "config.json")
        written = sorted(os.listdir(tmp), key=lambda name: name in ("config.json", SAFE_INDEX))
        for stale in folder.glob("model*.safetensors"):
            if stale.name not in written:
                stale.unlink()
        (folder / SAFE_INDEX).unlink(missing_ok=True)
        for name in written:
            replace(Path(tmp) / name, folder / name)


def storable(tensor: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """A tensor as a weight file can hold it: detached, on the CPU, contiguous, floating point in `dtype` (when
    given), and copied when it is a view of a larger buffer (DeepSpeed's ZeRO keeps weights in flat ones), which
    safetensors refuses to write and `torch.save` would write whole."""
    tensor = tensor.detach().cpu()
    if dtype is not None and tensor.is_floating_point():
        tensor = tensor.to(dtype)
    tensor = tensor.contiguous()
    return tensor.clone() if tensor.untyped_storage().nbytes() != tensor.nbytes else tensor


def checkpoint_folder(folder: str | Path) -> Path:
    """`folder` itself, once it is known to be a checkpoint folder.

    Raises:
        FileNotFoundError: a path that doesn't exist, or a folder without `config.json`.
    """
    path = Path(folder).expanduser()
    if not path.is_dir() or not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path} is not a checkpoint folder (expected a folder with config.json)")
    return path
