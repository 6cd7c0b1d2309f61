"""Decoding kernels for a CPU, applied to a loaded model from outside (the model files stay plain PyTorch).

A decoding step multiplies one row per sequence by every weight and attends one query per sequence to its KV
cache, so its speed is the speed at which those products stream the weights and the cache from memory. How well
PyTorch's own kernels do with so few rows depends on the CPU (`benchmarks/bench_kernels.py` measures them; the
figures for the kinds of CPU this project ran on: docs/performance.md, Kernel choice by CPU, Runs F, G, H and J):

- with AVX-512 BF16 and no AMX (AMD EPYC), oneDNN's products read the weights well below the bandwidth with one
  row or eight, PyTorch's own `torch.mv` reads them near it with one row but its GEMM far below it with eight, and
  PyTorch's attention for a few one-token queries takes several times as long as reading their keys and values.
- with AMX (Intel Xeon), oneDNN's products read bf16 weights below the bandwidth with 1-4 rows (50-80 % of it in
  run J) and its AMX GEMM is the faster from 5 rows on; PyTorch's int8 kernel reads int8 weights at half of it.

So, where the CPU has AVX-512 BF16: `cpu_kernels.cpp`, built on first use (needs a C++ compiler, as
`torch.compile` does; the build is cached by PyTorch): a few-row product that streams each weight from memory once
for up to 8 rows (4 with bf16 weights where the CPU has AMX), bf16 weights or int8 ones with a scale per output
feature for `quantize`'s int8, and a one-query attention that reads each cached key and value once. bf16 weights
with 5-8 rows take two passes over each block of weight rows, the second while the block is still in the cache
(`cpu_kernels.cpp`: `small_linear_pass`); int8 weights are multiplied as they are, by the rows in fixed point,
with AVX-512 VNNI (`cpu_kernels.cpp`: `to_fixed`), which costs less than converting every weight, or for 5-8
rows on AMX-INT8 tiles where the CPU has them (the same sums). In a decoding
step a row's products and attention get the same bits alone and in a batch of up to 8 (left padding included),
except bf16 products on an AMX CPU, which take oneDNN's GEMM from 5 rows on. The kernels have no backward: what
autograd follows takes PyTorch's kernels.

Elsewhere (or where the kernels can't be built, or `OPENOWL_CPU_KERNELS=0`): one-row products through `torch.mv`,
oneDNN's where the CPU has AMX and PyTorch's own otherwise; other products and attention are PyTorch's.
"""

from __future__ import annotations

import functools
import logging
import os
from pathlib import Path

import torch
from torch import nn

logger = logging.getLogger(__name__)

MAX_ROWS = 8  # beyond one pass of the kernel's rows over the weight, oneDNN's GEMM is the faster
AMX_BF16_ROWS = 4  # with AMX, oneDNN's AMX GEMM reads bf16 weights faster than the kernel from 5 rows on
PACK_ROWS = 128  # the row count oneDNN lays packed weights out for: about an image's tokens, or a prompt's
ATTENTION = "openowl_decode"  # the name the one-query attention is registered under with transformers


class DecodeLinear(nn.Linear):
    """An `nn.Linear` whose few-row products on the CPU run on the decoding kernels; the same parameters and state
    dict."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type != "cpu" or is_tensor_subclass(self.weight) or needs_grad(x, self.weight):
            return super().forward(x)  # (DecodeLinears only exist outside torch.compile: `Engine`)
        rows = x.numel() // x.shape[-1]
        if rows <= bf16_rows() and fits_small_linear(self.weight, x):
            y = torch.ops.openowl.small_linear(x.reshape(rows, -1).contiguous(), self.weight)
        elif rows == 1:
            y = matvec(self.weight, x.reshape(-1))
        else:
            return super().forward(x)
        if self.bias is not None:
            y = y + self.bias
        return y.view(*x.shape[:-1], -1)


class PackedLinear(nn.Linear):
    """An `nn.Linear` whose products run through oneDNN's GEMM on a copy of its weight laid out for it once
    (`pack_weights`), where oneDNN would otherwise lay the weight out again at every call; the same parameters
    and state dict. oneDNN's packed tensor can't be copied or pickled: a copy packs its own weight again."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        packed = packed_product(self, x)
        return super().forward(x) if packed is None else packed

    def __getstate__(self) -> dict:
        state = super().__getstate__()
        packed = state.pop("_packed", None)
        if packed is not None:
            state["_pack_rows"] = packed[3]
        return state

    def __setstate__(self, state: dict) -> None:
        rows = state.pop("_pack_rows", None)
        super().__setstate__(state)
        if rows is not None:
            pack_weights(self, rows)


def can_pack() -> bool:
    """Whether `pack_weights` applies here: a CPU with AMX (where it was measured: docs/performance.md, Run J),
    PyTorch's oneDNN switched on, and `OPENOWL_PACK_WEIGHTS` not 0."""
    return (
        has_amx() and torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled
        and os.environ.get("OPENOWL_PACK_WEIGHTS", "1") != "0"
    )  # fmt: skip


def pack_weights(module: nn.Module, rows: int = PACK_ROWS) -> int:
    """Give every plain bf16 Linear of `module` a copy of its weight packed for oneDNN's GEMM with about `rows` rows,
    in place: they become `PackedLinear`s. Returns how many. The copies cost the
    weights' memory once more. Left as they are: weights on another device or in another dtype, quantized ones,
    and the parts of a fused projection (their weights are views of the fused one, whose product runs instead).
    A packed copy is dropped, and PyTorch's product runs, once the weight has been changed or replaced."""
    count = 0
    for m in module.modules():
        if type(m) not in (nn.Linear, PackedLinear) or m.weight.device.type != "cpu":
            continue
        weight = m.weight.detach()
        part = weight.untyped_storage().nbytes() != weight.numel() * weight.element_size()  # a view of a fused one
        if weight.dtype != torch.bfloat16 or is_tensor_subclass(m.weight) or part or m.weight.is_inference():
            continue  # (an inference-mode tensor keeps no version to tell a changed weight by)
        packed = torch.ops.mkldnn._reorder_linear_weight(weight, rows)
        m.__dict__["_packed"] = (weight.data_ptr(), m.weight._version, packed, rows)
        if type(m) is nn.Linear:
            m.__class__ = PackedLinear
        count += 1
    return count


def unpack_weights(module: nn.Module) -> int:
    """Undo `pack_weights`. Returns how many Linears held a packed copy."""
    count = 0
    for m in module.modules():
        if m.__dict__.pop("_packed", None) is not None:
            count += 1
        if type(m) is PackedLinear:
            m.__class__ = nn.Linear
    return count


def packed_product(module: nn.Linear, x: torch.Tensor) -> torch.Tensor | None:
    """`module(x)` on the module's packed weight, or None where that doesn't apply: no packed copy (or one of a
    weight changed since), another dtype or device, something for autograd to follow, `torch.compile`."""
    packed = module.__dict__.get("_packed")
    if (
        packed is None or x.device.type != "cpu" or x.dtype != module.weight.dtype
        or needs_grad(x, module.weight) or torch.compiler.is_compiling()
    ):  # fmt: skip
        return None
    ptr, version, weight, _ = packed
    if module.weight.data_ptr() != ptr or module.weight._version != version:  # loaded into, or replaced
        del module.__dict__["_packed"]
        return None
    y = torch.ops.mkldnn._linear_pointwise(x.reshape(-1, x.shape[-1]), weight, module.bias, "none", [], "")
    return y.view(*x.shape[:-1], -1)


def bf16_rows() -> int:
    """The most rows a product with bf16 weights takes on `small_linear` on this CPU."""
    return AMX_BF16_ROWS if has_amx() else MAX_ROWS


def needs_grad(*tensors: torch.Tensor) -> bool:
    """Whether autograd follows a product of these. The kernels have no backward: such products take PyTorch's."""
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def fits_small_linear(weight: torch.Tensor, x: torch.Tensor) -> bool:
    """`small_linear` (bf16 weights) or `small_linear_int8` can take these: bf16 rows, an inner size that is a
    multiple of 32, nothing for autograd or `torch.compile` to follow, and kernels on this CPU."""
    return (
        x.dtype == torch.bfloat16 and weight.dtype in (torch.bfloat16, torch.int8) and weight.is_contiguous()
        and x.shape[-1] % 32 == 0 and not needs_grad(x, weight) and not torch.compiler.is_compiling()
        and cpu_kernels()
    )  # fmt: skip


def matvec(weight: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """`torch.mv(weight, x)`: through oneDNN where the CPU has AMX, through PyTorch's own kernel elsewhere (the faster
    one on each kind of CPU measured: module docstring, docs/performance.md, Kernel choice by CPU).

    oneDNN is switched off by a process-wide flag, for the length of this one call: a GEMM that another thread runs
    at the same moment may take PyTorch's slower kernel, with the same result.
    """
    if has_amx():
        return torch.mv(weight, x)
    enabled = torch.backends.mkldnn.enabled
    torch.backends.mkldnn.enabled = False
    try:
        return torch.mv(weight, x)
    finally:
        torch.backends.mkldnn.enabled = enabled


def decode_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """transformers' attention interface: one-token queries on the kernel, everything else through SDPA."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if (
        query.shape[2] == 1 and query.device.type == "cpu" and not needs_grad(query, key, value)
        and query.dtype == key.dtype == value.dtype == torch.bfloat16 and query.shape[-1] % 32 == 0
        and query.shape[-1] <= 256 and (attention_mask is None or _fits_mask(attention_mask, key))
        and not any(kwargs.get(k) is not None for k in ("softcap", "position_bias", "sliding_window", "sinks"))
        and not kwargs.get("output_attentions") and cpu_kernels()
    ):  # fmt: skip
        scale = scaling if scaling is not None else query.shape[-1] ** -0.5
        return torch.ops.openowl.decode_attention(query, key, value, attention_mask, scale), None
    return sdpa_attention_forward(module, query, key, value, attention_mask, dropout, scaling, **kwargs)


def _fits_mask(mask: torch.Tensor, key: torch.Tensor) -> bool:
    return mask.dtype == torch.bool and mask.dim() == 4 and mask.shape[1:3] == (1, 1) and mask.shape[3] == key.shape[2]


@functools.cache
def cpu_kernels() -> bool:
    """Build (once per source version, cached by PyTorch) and load `cpu_kernels.cpp`. False where they don't apply:
    a CPU without AVX-512 BF16, `OPENOWL_CPU_KERNELS=0`, or no working C++ compiler (logged)."""
    if os.environ.get("OPENOWL_CPU_KERNELS", "1") == "0" or not has_avx512_bf16():
        return False
    from torch.utils.cpp_extension import load

    flags = ["-O3", "-mavx512f", "-mavx512bw", "-mavx512bf16", "-mavx512vnni", "-fopenmp"]
    try:
        load(
            name="openowl_cpu_kernels", sources=[str(Path(__file__).with_name("cpu_kernels.cpp"))],
            extra_cflags=flags, extra_ldflags=["-fopenmp"], is_python_module=False,
        )  # fmt: skip
    except Exception as e:  # no compiler, no headers: PyTorch's kernels still work
        logger.warning("openowl's CPU decoding kernels could not be built, PyTorch's kernels run instead: %s", e)
        return False
    return True


def kernel_choice() -> str:
    """Which kernels the eager engine decodes with on this CPU, in words."""
    int8 = "int8 weights on VNNI in fixed point" if has_avx512_vnni() else "int8 weights converted to bf16"
    if cpu_kernels() and has_amx():
        packed = "; vision side on packed weights" if can_pack() else ""
        return (
            f"openowl's AVX-512 kernels for 1-{AMX_BF16_ROWS} bf16 rows and 1-{MAX_ROWS} int8 rows ({int8}; "
            f"5-{MAX_ROWS} rows on AMX-INT8 tiles), oneDNN's AMX GEMM beyond; openowl's one-query attention{packed}"
        )
    if cpu_kernels():
        return f"openowl's AVX-512 BF16 kernels (1-{MAX_ROWS} rows, {int8}; one-query attention)"
    if has_amx():
        return "oneDNN torch.mv for one row (AMX); PyTorch's GEMM and attention"
    return "PyTorch torch.mv for one row; PyTorch's GEMM and attention"


@functools.cache  # the CPU doesn't change
def has_amx() -> bool:
    amx = getattr(torch.cpu, "_is_amx_tile_supported", None)
    return bool(amx is not None and amx())


@functools.cache
def has_avx512_vnni() -> bool:
    """As `cpu_kernels.cpp` decides between its two int8 paths (the CPU's own answer; PyTorch has no probe for it)."""
    try:
        return " avx512_vnni " in Path("/proc/cpuinfo").read_text().replace("\n", " ")
    except OSError:
        return False


@functools.cache
def has_avx512_bf16() -> bool:
    check = getattr(torch.cpu, "_is_avx512_bf16_supported", None)
    return bool(check is not None and check())


def use_decode_kernels(lm: nn.Module) -> int:
    """Put the decoding kernels into a language model, in place: every bf16 / fp16 `nn.Linear` becomes a
    `DecodeLinear`, and a bf16 SDPA model's attention goes through `decode_attention` where the kernels run (this
    builds them). Returns how many Linears.

    Only plain `nn.Linear` modules with half-precision weights change (float32 `F.linear` already runs at full
    bandwidth, and quantized or LoRA layers have kernels of their own).
    """
    count = 0
    for m in lm.modules():
        half = type(m) is nn.Linear and m.weight.dtype in (torch.bfloat16, torch.float16)
        if half and not is_tensor_subclass(m.weight):
            m.__class__ = DecodeLinear
            count += 1
    bf16 = any(p.dtype == torch.bfloat16 for p in lm.parameters())
    if _attention(lm) == "sdpa" and lm._can_set_attn_implementation() and bf16 and cpu_kernels():
        _register_attention()
        lm.set_attn_implementation(ATTENTION)
    return count


def use_stock_kernels(lm: nn.Module) -> int:
    """Undo `use_decode_kernels` (e.g. to time the stock kernels in the same process). Returns how many Linears."""
    count = 0
    for m in lm.modules():
        if type(m) is DecodeLinear:
            m.__class__ = nn.Linear
            count += 1
    if _attention(lm) == ATTENTION:
        lm.set_attn_implementation("sdpa")
    return count


def _attention(lm: nn.Module) -> str | None:
    """A transformers model's attention implementation (None for other modules)."""
    return getattr(getattr(lm, "config", None), "_attn_implementation", None)


@functools.cache
def _register_attention() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(ATTENTION, decode_attention)
    AttentionMaskInterface.register(ATTENTION, sdpa_mask)


def is_tensor_subclass(weight: torch.Tensor) -> bool:
    """A quantized (tensor-subclass) weight, which brings its own kernels."""
    return type(weight.data) is not torch.Tensor
