"""Preparing a model for inference, as one explicit step at the call site, and loading an engine.

`prepare_for_inference` changes the model in place, in this order:
1. weight-only quantization of the language model (`quantize.py`), when asked;
2. fused q/k/v and gate/up projections (`fuse.py`; the state dict keeps the released keys);
3. the CPU's decoding kernels (`kernels.py`, chosen by the CPU's kind), or PyTorch's stock kernels under
   `torch.compile`, whose inductor brings GEMMs of its own;
4. on a CPU with AMX, the vision side's bf16 weights packed once for oneDNN's GEMM (`kernels.pack_weights`: an
   image is hundreds of rows, and the vision side never decodes), at the cost of those weights' memory again;
and returns the decode step the engine runs: eager, or compiled with static KV caches. `Engine` itself never
changes its model; `load_engine` is the one place that goes from a model name to a ready engine.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path

import torch

from openowl import loading
from openowl.constants import as_dtype
from openowl.infer.engine import Engine
from openowl.infer.fuse import fuse_projections
from openowl.infer.generate import EAGER_STEP, DecodeStep, decode_one_token
from openowl.infer.kernels import (
    can_pack,
    is_tensor_subclass,
    pack_weights,
    use_decode_kernels,
    use_stock_kernels,
)
from openowl.infer.quantize import quantize as quantize_weights
from openowl.model.owl import OwlForConditionalGeneration


def prepare_for_inference(
    model: OwlForConditionalGeneration, quantize: str | None = None, compile: bool = False
) -> DecodeStep:
    """Quantize (when `quantize` is "int8" or "int4"), fuse the projections and choose the kernels, in place.

    Args:
        compile: decode with a static KV cache through `torch.compile`: CUDA graphs on GPUs; on a CPU, frozen
            weights and inductor's own GEMM kernels (see `compiled_decode`). The first request of each batch size
            and length bucket pays for compiling; later ones run fast.

    Returns:
        The decode step to give `Engine`.
    """
    if quantize:
        quantize_weights(model, quantize)
    fuse_projections(model.language_model)  # one product for q/k/v and one for gate/up
    if model.device.type == "cpu":  # under torch.compile, inductor's own GEMMs and PyTorch's attention
        (use_stock_kernels if compile else use_decode_kernels)(model.language_model)
    if model.device.type == "cpu" and can_pack():  # the vision side runs eagerly either way
        pack_weights(model.vision_model)
        pack_weights(model.abstractor)
    return DecodeStep(compiled_decode(model), static_cache=True) if compile else EAGER_STEP


def compiled_decode(model: OwlForConditionalGeneration) -> Callable:
    """`decode_one_token` through `torch.compile`, set for the model's device.

    On CUDA: CUDA graphs ("reduce-overhead"). On a CPU: max-autotune with frozen weights, so that inductor
    pre-packs every weight for its own GEMM kernels (AMX for bf16; int8 weight-only too, see `quantize`).
    PyTorch's kernels are left out of the choice unless a weight needs them (a torchao tensor: int4): timed on one
    cache-warm weight, as autotuning does, they sometimes win, yet they are the slower ones on weights streamed
    from memory. The frozen weights are copies: the model must not change afterwards, and its language model's
    weights are held twice.
    """
    if model.device.type == "cuda":
        return torch.compile(decode_one_token, mode="reduce-overhead", dynamic=False)
    import torch._inductor.config as inductor_config

    aten = any(is_tensor_subclass(p) for p in model.language_model.parameters())
    options = {"max_autotune": True, "max_autotune_gemm_backends": "CPP,ATEN" if aten else "CPP"}
    compiled = torch.compile(decode_one_token, options=options, dynamic=False)

    def decode(*args: object) -> torch.Tensor:
        # Read when inductor compiles a graph, outside the scope of `options`, so it is set around every call.
        with inductor_config.patch(freezing=True):
            return compiled(*args)

    return decode


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """ "auto": CUDA when a GPU is present, else the CPU; any other name is checked before anything loads.

    Raises:
        ValueError: an unknown device name, or a CUDA device this machine doesn't have (one line, no traceback).
    """
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise ValueError(f"unknown device {str(device)!r}: use auto, cpu, cuda or cuda:N") from err
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ValueError(f"device {str(device)!r}: no CUDA GPU is available here; use --device cpu (or auto)")
        if device.index is not None and device.index >= count:
            raise ValueError(f"device {str(device)!r}: only cuda:0 to cuda:{count - 1} are here")
    return device


def resolve_dtype(dtype: torch.dtype | str, device: torch.device) -> torch.dtype:
    """ "auto": bfloat16 on a GPU, float32 on a CPU; otherwise the dtype named."""
    if str(dtype) == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return as_dtype(dtype)


def load_engine(
    model: str | Path,
    dtype: torch.dtype | str = "auto",
    device: str | torch.device = "auto",
    quantize: str | None = None,
    compile: bool = False,
) -> Engine:
    """A ready engine for a checkpoint folder, built-in model or hub id: loaded, prepared, wrapped.

    Args:
        dtype: a dtype or its name; "auto" is bfloat16 on a GPU, float32 on a CPU.
        device: a torch device or its name; "auto" is CUDA when present, else the CPU.

    Raises:
        FileNotFoundError, OSError, CheckpointError, ValueError: from loading (see `openowl.loading`), or a device
            this machine doesn't have.
    """
    device = resolve_device(device)
    loaded, processor = loading.load_pretrained(model, dtype=resolve_dtype(dtype, device), device=device)
    return Engine(loaded, processor, step=prepare_for_inference(loaded, quantize=quantize, compile=compile))


def engine_settings(
    model: str | Path,
    dtype: torch.dtype | str = "auto",
    device: str | torch.device = "auto",
    quantize: str | None = None,
    compile: bool = False,
) -> dict:
    """What the answers of `load_engine(...)` with these arguments depend on, without loading the model: the
    resolved checkpoint folder and a digest of its files' names, sizes and modification times (weights, config,
    tokenizer, chat template), the dtype and device as resolved, quantization and compile. Cached answers are kept
    only while these are the same (`infer.answering.check_settings`)."""
    device = resolve_device(device)
    folder = loading.resolve_checkpoint(model)
    stamps = sorted((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in folder.iterdir() if p.is_file())
    return {
        "model": str(model),
        "model_folder": str(folder.resolve()),
        "model_files": hashlib.sha256(json.dumps(stamps).encode()).hexdigest()[:16],
        "dtype": str(resolve_dtype(dtype, device)).removeprefix("torch."),
        "device": device.type,
        "quantize": quantize,
        "compile": bool(compile),
    }
