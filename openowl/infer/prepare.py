"""Preparing a model for inference, as one explicit step at the call site, and loading an engine.

`prepare_for_inference` changes the model in place, in this order:
1. weight-only quantization of the language model (`quantize.py`), when asked;
2. fused q/k/v and gate/up projections (`fuse.py`; the state dict keeps the released keys);
3. the CPU's decoding kernels (`kernels.py`, chosen by the CPU's kind), or PyTorch's stock kernels under
   `torch.compile`, whose inductor brings GEMMs of its own;
and returns the decode step the engine runs: eager, or compiled with static KV caches. `Engine` itself never
changes its model; `load_engine` is the one place that goes from a model name to a ready engine.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

from openowl import loading
from openowl.constants import as_dtype
from openowl.infer.engine import Engine
from openowl.infer.fuse import fuse_projections
from openowl.infer.generate import EAGER_STEP, DecodeStep, decode_one_token
from openowl.infer.kernels import is_tensor_subclass, use_decode_kernels, use_stock_kernels
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


def load_engine(
    model: str | Path,
    dtype: torch.dtype | str = torch.float32,
    device: str | torch.device = "cpu",
    quantize: str | None = None,
    compile: bool = False,
) -> Engine:
    """A ready engine for a checkpoint folder, built-in model or hub id: loaded, prepared, wrapped.

    Raises:
        FileNotFoundError, OSError, CheckpointError, ValueError: from loading (see `openowl.loading`).
    """
    loaded, processor = loading.load_pretrained(model, dtype=as_dtype(dtype), device=device)
    return Engine(loaded, processor, step=prepare_for_inference(loaded, quantize=quantize, compile=compile))
