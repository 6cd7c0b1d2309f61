"""Small building blocks shared by the vision encoder and the abstractor."""

from __future__ import annotations

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
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


def run_layers(layers: nn.ModuleList, x: torch.Tensor, *args, checkpointing: bool = False) -> torch.Tensor:
    """`x = layer(x, *args)` through every layer; with `checkpointing`, activations are recomputed in backward."""
    for layer in layers:
        if checkpointing:
            x = torch.utils.checkpoint.checkpoint(layer, x, *args, use_reentrant=False)
        else:
            x = layer(x, *args)
    return x
