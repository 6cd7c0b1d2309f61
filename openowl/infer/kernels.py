"""Faster kernels for decoding, applied to a loaded model from outside (the model files stay plain PyTorch).

On the CPU, a bf16 / fp16 `F.linear` on a single row dispatches to a GEMM that reads weights at about 60-65 % of
the machine's memory bandwidth; `torch.mv` on the same weight reads at about 75-80 % (measured by
`benchmarks/bench_inference.py`). Decoding one sequence is exactly that case, once per weight per token.
"""

from __future__ import annotations

import torch
from torch import nn


class MatvecLinear(nn.Linear):
    """An `nn.Linear` whose one-row products on the CPU run as `torch.mv`; the same parameters and state dict."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type != "cpu" or x.numel() != x.shape[-1] or is_tensor_subclass(self.weight):
            return super().forward(x)
        y = torch.mv(self.weight, x.reshape(-1))
        if self.bias is not None:
            y = y + self.bias
        return y.view(*x.shape[:-1], -1)


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
