"""One product where a LLaMA layer has several on the same input: q/k/v in attention, gate/up in the MLP.

Applied to a loaded model from outside, for inference (the engine does it; the model files stay plain), to plain
Linears and to `quantize`'s int8 ones (their scales side by side too). A decoding
step reads every weight once per token through small products, and on a GPU one wide product streams its weight
better than three narrow ones, so a step's matmuls take less time fused (`benchmarks/decode_breakdown.py`;
measured: docs/performance.md, GPU: an H100). On a CPU, openowl's kernels read the fused weights at the speed of
the separate ones (docs/performance.md, Run H).

The parts keep their parameters as views of the fused weight, so the state dict keeps its keys and values,
`save_pretrained` writes the same files, and `load_state_dict` (which copies in place) updates the fused product.
Whatever replaces a part's weight instead (quantization) must undo the fusion first: `unfuse_projections`.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
from torch import nn
from transformers.models.llama.modeling_llama import (
    ALL_ATTENTION_FUNCTIONS,
    LlamaAttention,
    LlamaMLP,
    apply_rotary_pos_emb,
    eager_attention_forward,
)

from openowl.infer.kernels import is_tensor_subclass


class FusedLlamaAttention(LlamaAttention):
    """`LlamaAttention` with q, k and v from one product, `qkv_proj`; the rest is transformers' forward."""

    qkv_proj: nn.Linear

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
        attention_mask: torch.Tensor | None = None,
        cache=None,
        past_key_values=None,  # the cache's name before transformers 5.20
        **kwargs,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        cache = cache if cache is not None else past_key_values
        input_shape = hidden_states.shape[:-1]
        hidden_shape = (*input_shape, -1, self.head_dim)
        sizes = (self.q_proj.out_features, self.k_proj.out_features, self.v_proj.out_features)
        query, key, value = (
            t.view(hidden_shape).transpose(1, 2)  # (B, heads, T, head_dim)
            for t in self.qkv_proj(hidden_states).split(sizes, dim=-1)
        )
        cos, sin = position_embeddings
        query, key = apply_rotary_pos_emb(query, key, cos, sin)
        if cache is not None:
            key, value = cache.update(key, value, self.layer_idx, kwargs=kwargs)
        attention: Callable = ALL_ATTENTION_FUNCTIONS.get_interface(
            self.config._attn_implementation, eager_attention_forward
        )
        dropout = 0.0 if not self.training else self.attention_dropout
        out, weights = attention(
            self, query, key, value, attention_mask, dropout=dropout, scaling=self.scaling, **kwargs
        )  # out: (B, T, heads, head_dim)
        return self.o_proj(out.reshape(*input_shape, -1).contiguous()), weights


class FusedLlamaMLP(LlamaMLP):
    """`LlamaMLP` with gate and up from one product, `gate_up_proj`."""

    gate_up_proj: nn.Linear

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(self.act_fn(gate) * up)


def fuse_projections(lm: nn.Module) -> int:
    """Fuse, in place, the q/k/v and gate/up projections of every LLaMA layer whose parts are plain Linears of one
    dtype and device (quantized, LoRA, offloaded or otherwise wrapped parts are left as they are). Returns how many
    modules run fused now. Move the model before fusing: moving it afterwards gives the parts copies of their own."""
    count = 0
    for module in list(lm.modules()):
        if type(module) is LlamaAttention and _fusable(module.q_proj, module.k_proj, module.v_proj):
            _fuse(module, ("q_proj", "k_proj", "v_proj"), "qkv_proj")
            module.__class__ = FusedLlamaAttention
        elif type(module) is LlamaMLP and _fusable(module.gate_proj, module.up_proj):
            _fuse(module, ("gate_proj", "up_proj"), "gate_up_proj")
            module.__class__ = FusedLlamaMLP
        elif type(module) not in _STOCK:
            continue
        count += 1
    return count


def unfuse_projections(lm: nn.Module, keep: bool = False) -> int:
    """Give the fused modules transformers' forward again. Returns how many.

    Args:
        keep: keep the fused Linears, which share the parts' memory, so that `fuse_projections` switches back at no
            cost (to time the stock model in the same process); otherwise they go, as they must before anything
            replaces the parts' weights. The parts' weights stay views of one tensor until replaced.
    """
    count = 0
    for module in list(lm.modules()):
        stock = _STOCK.get(type(module))
        if stock is not None:
            module.__class__ = stock
            count += 1
        if not keep and hasattr(module, "_fusion"):
            name, hook = module._fusion
            del module._modules[name]
            hook.remove()
            del module._fusion
    return count


_STOCK = {FusedLlamaAttention: LlamaAttention, FusedLlamaMLP: LlamaMLP}


def _fusable(*parts: nn.Module) -> bool:
    """Plain Linears, or Linears that build their fused selves (`fused_from`: `quantize`'s int8 ones, whose scales
    go side by side too), alike in all but their output widths."""
    first = parts[0]
    return (type(first) is nn.Linear or hasattr(type(first), "fused_from")) and all(
        type(p) is type(first) and not hasattr(p, "_hf_hook") and not is_tensor_subclass(p.weight)
        and p.weight.device.type != "meta" and p.weight.device == first.weight.device
        and p.weight.dtype == first.weight.dtype and p.in_features == first.in_features
        and (p.bias is None) == (first.bias is None)
        and getattr(p, "scale", first.weight).dtype == getattr(first, "scale", first.weight).dtype
        for p in parts
    )  # fmt: skip


_FUSED = ("weight", "scale", "bias")  # the parameters that fuse side by side, where a Linear has them


def _fuse(owner: nn.Module, names: tuple[str, ...], fused_name: str) -> None:
    """Give `owner` a Linear `fused_name` whose output is its parts' (`names`) side by side. The parts' parameters
    become views of the fused ones, and the fused Linear stays out of the state dict: saving gives the parts, and
    loading builds the fused values from the parts' entries. A fused Linear kept by `unfuse_projections(keep=True)`
    is used again while the parts are still views of it."""
    parts = [owner.get_submodule(n) for n in names]
    kept = owner._modules.get(fused_name)
    if kept is not None:
        storage = kept.weight.untyped_storage().data_ptr()
        if all(p.weight.untyped_storage().data_ptr() == storage for p in parts):
            return
        unfuse_projections(owner)  # the parts' weights were replaced since: build it again
    values = {
        name: torch.cat([getattr(p, name).detach() for p in parts])  # (sum of out_features, ...)
        for name in _FUSED
        if getattr(parts[0], name, None) is not None
    }
    fused = _fused_like(parts[0], values, grad=any(p.weight.requires_grad for p in parts))
    start = 0
    for p in parts:
        end = start + p.out_features
        for name, value in values.items():
            setattr(p, name, nn.Parameter(value[start:end], requires_grad=getattr(p, name).requires_grad))
        start = end
    fused.register_state_dict_post_hook(_leave_out)
    setattr(owner, fused_name, fused)
    hook = functools.partial(_from_parts, names=names, fused_name=fused_name)
    owner._fusion = (fused_name, owner.register_load_state_dict_pre_hook(hook))


def _fused_like(part: nn.Module, values: dict[str, torch.Tensor], grad: bool) -> nn.Module:
    """A module of the part's kind over the fused values (`grad`: a plain Linear's parameters require grad)."""
    if type(part) is not nn.Linear:
        return type(part).fused_from(values)
    weight, bias = values["weight"], values.get("bias")
    fused = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device="meta")
    fused.weight = nn.Parameter(weight, requires_grad=grad)
    fused.bias = None if bias is None else nn.Parameter(bias, requires_grad=grad)
    return fused


def _leave_out(module: nn.Module, state_dict: dict, prefix: str, local_metadata: dict) -> None:
    for name, _ in module.named_parameters(recurse=False):
        state_dict.pop(prefix + name, None)


def _from_parts(owner: nn.Module, state_dict: dict, prefix: str, *args, names: tuple[str, ...], fused_name: str):
    """Add the fused entries that the parts' entries make to a state dict being loaded into `owner`."""
    for name in _FUSED:
        keys = [f"{prefix}{part}.{name}" for part in names]
        if all(k in state_dict for k in keys):
            state_dict[f"{prefix}{fused_name}.{name}"] = torch.cat([state_dict[k] for k in keys])
