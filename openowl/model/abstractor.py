"""The visual abstractor: a few learned queries summarise the image tokens into the LM's width.

Each layer: the normed queries attend to concat(normed queries, normed image tokens); the residual starts from
the *normed* query; then a SwiGLU MLP with a LayerNorm before its output projection. No final LayerNorm.
"""

from __future__ import annotations

import torch
from torch import nn

from openowl.config import AbstractorConfig
from openowl.model.layers import LayerNormFp32, attention, run_layers


class AbstractorAttention(nn.Module):
    def __init__(self, config: AbstractorConfig):
        super().__init__()
        c, ce = config.hidden_size, config.encoder_hidden_size
        self.num_heads = config.num_attention_heads
        self.dropout = config.attention_probs_dropout_prob
        self.query = nn.Linear(c, c)
        self.key = nn.Linear(ce, c)
        self.value = nn.Linear(ce, c)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        return x.view(B, T, self.num_heads, C // self.num_heads).transpose(1, 2)  # (B, nh, T, hs)

    def forward(self, queries: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        q, k, v = self._heads(self.query(queries)), self._heads(self.key(context)), self._heads(self.value(context))
        y = attention(q, k, v, dropout_p=self.dropout if self.training else 0.0)  # (B, nh, Q, hs)
        return y.transpose(1, 2).flatten(2)  # (B, Q, C)


class SwiGLUWithNorm(nn.Module):
    """`w2(ffn_ln(silu(w1 x) * w3 x))`."""

    def __init__(self, hidden_size: int, intermediate_size: int, eps: float):
        super().__init__()
        self.w1 = nn.Linear(hidden_size, intermediate_size)
        self.w2 = nn.Linear(intermediate_size, hidden_size)
        self.w3 = nn.Linear(hidden_size, intermediate_size)
        self.ffn_ln = LayerNormFp32(intermediate_size, eps=eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(self.ffn_ln(nn.functional.silu(self.w1(x)) * self.w3(x)))


class AbstractorOutput(nn.Module):
    def __init__(self, config: AbstractorConfig):
        super().__init__()
        self.out_proj = nn.Linear(config.hidden_size, config.hidden_size)
        self.norm2 = LayerNormFp32(config.hidden_size)  # eps 1e-5: upstream does not pass the config eps here
        self.mlp = SwiGLUWithNorm(config.hidden_size, config.intermediate_size, config.layer_norm_eps)

    def forward(self, context: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        h = residual + self.out_proj(context)
        return h + self.mlp(self.norm2(h))


class AbstractorCrossAttention(nn.Module):
    def __init__(self, config: AbstractorConfig):
        super().__init__()
        self.norm1 = LayerNormFp32(config.hidden_size)  # eps 1e-5, as upstream
        self.normk = LayerNormFp32(config.encoder_hidden_size)  # eps 1e-5, as upstream
        self.attention = AbstractorAttention(config)
        self.output = AbstractorOutput(config)

    def forward(self, queries: torch.Tensor, image_tokens: torch.Tensor) -> torch.Tensor:
        qn = self.norm1(queries)
        context = torch.cat([qn, self.normk(image_tokens)], dim=1)  # (B, Q + N, C)
        return self.output(self.attention(qn, context), residual=qn)


class AbstractorLayer(nn.Module):
    def __init__(self, config: AbstractorConfig):
        super().__init__()
        self.crossattention = AbstractorCrossAttention(config)

    def forward(self, queries: torch.Tensor, image_tokens: torch.Tensor) -> torch.Tensor:
        return self.crossattention(queries, image_tokens)


class AbstractorEncoder(nn.Module):
    def __init__(self, config: AbstractorConfig):
        super().__init__()
        self.layers = nn.ModuleList(AbstractorLayer(config) for _ in range(config.num_hidden_layers))
        self.gradient_checkpointing = False

    def forward(self, queries: torch.Tensor, image_tokens: torch.Tensor) -> torch.Tensor:
        checkpointing = self.gradient_checkpointing and self.training
        return run_layers(self.layers, queries, image_tokens, checkpointing=checkpointing)


class VisualAbstractor(nn.Module):
    """`(queries (B, Q, C), image tokens (B, N, Ce)) -> (B, Q' + 1, D)` visual tokens in the LM's width D.

    For images Q' = Q. For videos the temporal queries follow the ordinary ones; their two halves are projected
    by `visual_fc` and `temporal_visual_fc` and summed, so a video also yields Q + 1 tokens.
    """

    def __init__(self, config: AbstractorConfig, text_hidden_size: int, video: bool = False):
        super().__init__()
        self.encoder = AbstractorEncoder(config)
        self.visual_fc = nn.Linear(config.hidden_size, text_hidden_size)
        if video:
            self.temporal_visual_fc = nn.Linear(config.hidden_size, text_hidden_size)
        self.vit_eos = nn.Parameter(torch.zeros(1, 1, text_hidden_size))

    def forward(self, queries: torch.Tensor, image_tokens: torch.Tensor, temporal: bool = False) -> torch.Tensor:
        q = self.encoder(queries, image_tokens)
        if temporal:
            spatial, temporal_q = q.chunk(2, dim=1)
            out = self.visual_fc(spatial) + self.temporal_visual_fc(temporal_q)
        else:
            out = self.visual_fc(q)
        eos = self.vit_eos.expand(out.shape[0], -1, -1).to(out.dtype)
        return torch.cat([out, eos], dim=1)  # (B, Q + 1, D)
