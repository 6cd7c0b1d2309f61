"""The mPLUG-Owl vision encoder: a CLIP ViT-L/14 with per-head interleaved fused QKV, and the video
checkpoint's temporal adapters; or, for modular models such as `owl-small`, a DINOv2 ViT from transformers.

Output (`forward_features`) is the post-LayerNorm of the last layer on all tokens, CLS included: `(B, N, C)`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers import Dinov2Model

from openowl.config import VisionConfig
from openowl.model.layers import LayerNormFp32, attention, quick_gelu, run_layers


class VisionEmbeddings(nn.Module):
    def __init__(self, config: VisionConfig):
        super().__init__()
        c = config.hidden_size
        self.cls_token = nn.Parameter(torch.zeros(1, 1, c))
        self.patch_embed = nn.Conv2d(config.num_channels, c, config.patch_size, stride=config.patch_size, bias=False)
        self.position_embedding = nn.Parameter(torch.zeros(1, config.num_positions, c))
        self.pre_layernorm = LayerNormFp32(c, eps=config.layer_norm_eps)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(pixel_values.to(self.cls_token.dtype))  # (B, C, h, w)
        x = x.flatten(2).transpose(1, 2)  # (B, h*w, C), row-major patches
        cls = self.cls_token.expand(x.shape[0], -1, -1)
        x = torch.cat([cls, x], dim=1)  # (B, N, C)
        x = x + self.position_embedding[:, : x.shape[1]]
        return self.pre_layernorm(x)


class VisionAttention(nn.Module):
    """Fused QKV whose 3·C outputs are laid out per head as [nh][q, k, v][hs] (Megatron style)."""

    def __init__(self, config: VisionConfig):
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.query_key_value = nn.Linear(config.hidden_size, 3 * config.hidden_size)
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        qkv = self.query_key_value(x).view(B, T, self.num_heads, 3, C // self.num_heads)  # (B, T, nh, 3, hs)
        q, k, v = qkv.permute(3, 0, 2, 1, 4).unbind(0)  # each (B, nh, T, hs)
        y = attention(q, k, v)
        y = y.transpose(1, 2).reshape(B, T, C)
        return self.dense(y)


class VisionMLP(nn.Module):
    def __init__(self, config: VisionConfig):
        super().__init__()
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(quick_gelu(self.fc1(x)))  # QuickGELU regardless of the config's hidden_act


class TemporalAdapter(nn.Module):
    """Depthwise temporal convolution over the patch tokens of the T frames of each video."""

    def __init__(self, hidden_size: int, temporal_hidden_size: int):
        super().__init__()
        self.ln = LayerNormFp32(hidden_size, eps=1e-5)
        self.down_proj = nn.Conv3d(hidden_size, temporal_hidden_size, kernel_size=1)
        self.conv = nn.Conv3d(
            temporal_hidden_size,
            temporal_hidden_size,
            kernel_size=(3, 1, 1),
            padding=(1, 0, 0),
            groups=temporal_hidden_size,
        )
        self.up_proj = nn.Conv3d(temporal_hidden_size, hidden_size, kernel_size=1)

    def forward(self, x: torch.Tensor, num_frames: int) -> torch.Tensor:
        BT, N, C = x.shape
        B, side = BT // num_frames, int((N - 1) ** 0.5)
        cls, patches = x[:, :1], x[:, 1:]
        h = self.ln(patches).view(B, num_frames, side, side, C).permute(0, 4, 1, 2, 3)  # (B, C, T, h, w)
        h = self.down_proj(h)
        if h.dtype == torch.bfloat16:
            # Upstream runs the depthwise conv in float16 when the weights are bfloat16; keep its rounding.
            conv = self.conv
            h = F.conv3d(
                h.half(), conv.weight.half(), conv.bias.half(), padding=conv.padding, groups=conv.groups
            ).bfloat16()
        else:
            h = self.conv(h)
        h = self.up_proj(quick_gelu(h))  # (B, C, T, h, w)
        h = h.permute(0, 2, 3, 4, 1).reshape(BT, N - 1, C)
        # Upstream returns the ORIGINAL cls token in this tensor, and the caller adds it to x: the CLS token is
        # therefore doubled at every layer when T > 1. The released -video weights were trained that way.
        return torch.cat([cls, h], dim=1)


class VisionLayer(nn.Module):
    def __init__(self, config: VisionConfig):
        super().__init__()
        self.input_layernorm = LayerNormFp32(config.hidden_size, eps=config.layer_norm_eps)
        self.self_attn = VisionAttention(config)
        self.post_attention_layernorm = LayerNormFp32(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = VisionMLP(config)
        if config.temporal_hidden_size:
            self.temporal = TemporalAdapter(config.hidden_size, config.temporal_hidden_size)

    def forward(self, x: torch.Tensor, num_frames: int = 1) -> torch.Tensor:
        if num_frames > 1:
            x = x + self.temporal(x, num_frames)
        x = x + self.self_attn(self.input_layernorm(x))
        return x + self.mlp(self.post_attention_layernorm(x))


class VisionEncoder(nn.Module):
    def __init__(self, config: VisionConfig):
        super().__init__()
        self.layers = nn.ModuleList(VisionLayer(config) for _ in range(config.num_hidden_layers))
        self.gradient_checkpointing = False

    def forward(self, x: torch.Tensor, num_frames: int = 1) -> torch.Tensor:
        return run_layers(self.layers, x, num_frames, checkpointing=self.gradient_checkpointing and self.training)


class VisionModel(nn.Module):
    """`forward_features(pixels (B, 3, H, W)) -> (B, N, C)`; videos pass `(B·T, 3, H, W)` and `num_frames=T`."""

    def __init__(self, config: VisionConfig):
        super().__init__()
        self.config = config
        self.embeddings = VisionEmbeddings(config)
        self.encoder = VisionEncoder(config)
        self.post_layernorm = LayerNormFp32(config.hidden_size, eps=config.layer_norm_eps)

    def forward_features(self, pixel_values: torch.Tensor, num_frames: int = 1) -> torch.Tensor:
        x = self.embeddings(pixel_values)
        x = self.encoder(x, num_frames)
        return self.post_layernorm(x)

    forward = forward_features


class Dinov2VisionModel(Dinov2Model):
    """A DINOv2 ViT as the image encoder: `forward(pixels (B, 3, H, W)) -> (B, 1 + H·W/14², C)`, the final
    LayerNorm's output (CLS first). Its position grid is interpolated to the input size, as DINOv2 does.

    Parameter names are transformers' `Dinov2Model` names under `vision_model.`.
    """

    def __init__(self, config):
        super().__init__(config)
        self.encoder.gradient_checkpointing = False

    def forward(self, pixel_values: torch.Tensor, num_frames: int = 1) -> torch.Tensor:
        if num_frames != 1:
            raise ValueError("the DINOv2 encoder has no temporal modules; it cannot encode multi-frame videos")
        dtype = self.embeddings.patch_embeddings.projection.weight.dtype
        return super().forward(pixel_values=pixel_values.to(dtype)).last_hidden_state
