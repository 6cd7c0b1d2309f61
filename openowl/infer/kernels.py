"""Faster kernels for decoding, applied to a loaded model from outside (the model files stay plain PyTorch).

Decoding one sequence multiplies one row by each weight, once per token, so the speed at which that product reads
the weights is the speed of decoding. On the CPU, PyTorch sends a bf16 `F.linear` or `torch.mv` to oneDNN, and how
well oneDNN does with one row depends on the CPU. Over many bf16 weights larger than the cache, on the two 2-core
machines this project ran on:

- a Xeon with AMX: oneDNN's `torch.mv` 17 GB/s (about 80 % of the read bandwidth), its `F.linear` 13 GB/s;
- an AMD EPYC without AMX (AVX-512 bf16): oneDNN's `F.linear` 14 GB/s, its `torch.mv` 9 GB/s, and PyTorch's own
  vectorized `torch.mv` (oneDNN switched off) 23-24 GB/s (about 85 % of the read bandwidth; with 2 rows or more
  oneDNN's GEMM is the faster one again).

So one-row products run as `torch.mv`: through oneDNN where the CPU has AMX, through PyTorch's kernel elsewhere.
"""

from __future__ import annotations

import functools

import torch
from torch import nn


class MatvecLinear(nn.Linear):
    """An `nn.Linear` whose one-row products on the CPU run as `matvec`; the same parameters and state dict."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type != "cpu" or x.numel() != x.shape[-1] or is_tensor_subclass(self.weight):
            return super().forward(x)
        y = matvec(self.weight, x.reshape(-1))
        if self.bias is not None:
            y = y + self.bias
        return y.view(*x.shape[:-1], -1)


def matvec(weight: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """`torch.mv(weight, x)`: through oneDNN where the CPU has AMX, through PyTorch's own kernel elsewhere (the faster
    one on each kind of CPU measured, module docstring).

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


@functools.cache  # asked at every one-row product; the CPU doesn't change
def has_amx() -> bool:
    amx = getattr(torch.cpu, "_is_amx_tile_supported", None)
    return bool(amx is not None and amx())


def use_matvec_linears(module: nn.Module) -> int:
    """Turn every bf16 / fp16 `nn.Linear` under `module` into a `MatvecLinear`, in place. Returns how many.

    Only plain `nn.Linear` modules with half-precision weights change (float32 `F.linear` already runs at full
    bandwidth, and quantized or LoRA layers have kernels of their own).
    """
    count = 0
    for m in module.modules():
        half = type(m) is nn.Linear and m.weight.dtype in (torch.bfloat16, torch.float16)
        if half and not is_tensor_subclass(m.weight):
            m.__class__ = MatvecLinear
            count += 1
    return count


def use_plain_linears(module: nn.Module) -> int:
    """Undo `use_matvec_linears` (e.g. to time the stock kernels in the same process). Returns how many."""
    count = 0
    for m in module.modules():
        if type(m) is MatvecLinear:
            m.__class__ = nn.Linear
            count += 1
    return count


def is_tensor_subclass(weight: torch.Tensor) -> bool:
    """A quantized (tensor-subclass) weight, which brings its own kernels."""
    return type(weight.data) is not torch.Tensor
