"""Small building blocks shared by the vision encoder and the abstractor."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class LayerNormFp32(nn.LayerNorm):
    """LayerNorm computed in float32 and cast back, as every LayerNorm of the upstream model is."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight.float() if self.weight is not None else None
        bias = self.bias.float() if self.bias is not None else None
        return F.layer_norm(x.float(), self.normalized_shape, weight, bias, self.eps).to(x.dtype)


def quick_gelu(x: torch.Tensor) -> torch.Tensor:
    return x * torch.sigmoid(1.702 * x)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout_p: float = 0.0) -> torch.Tensor:
    """Unmasked multi-head attention on `(B, nh, T, hs)` tensors.

    One switch for the fused kernel: `torch.nn.functional.scaled_dot_product_attention` computes exactly
    softmax(q kᵀ / sqrt(hs)) v, the readable formula upstream spells out.
    """
    return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p)
