"""A tiny mPLUG-Owl in the released v1 layout whose language model has head size 64, which vLLM's CPU attention takes
(the parity fixture's 16 it does not): built from a seed, in the upstream files (`config.json` of model_type
`mplug-owl`, one bfloat16 `pytorch_model.bin`, upstream's RoPE buffers included) with the parity fixture's LLaMA
tokenizer and preprocessing (56 px images)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from openowl.config import AbstractorConfig, OwlConfig, VisionConfig
from openowl.model.owl import OwlForConditionalGeneration

PARITY = Path(__file__).parent / "fixtures" / "parity-v1" / "checkpoint"
COPIED = ("tokenizer.model", "tokenizer_config.json", "special_tokens_map.json", "preprocessor_config.json",
          "generation_config.json")  # fmt: skip
SEED = 0


def head64_config() -> OwlConfig:
    text = dict(model_type="llama", vocab_size=32000, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=1024, rms_norm_eps=1e-6,
                hidden_act="silu", bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=False,
                rope_theta=10000.0)  # fmt: skip
    return OwlConfig(
        vision=VisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                            image_size=56, patch_size=14),
        abstractor=AbstractorConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=176,
                                    encoder_hidden_size=64),
        text_config=text,
    )  # fmt: skip


def build(folder: Path) -> Path:
    """Write the checkpoint into `folder` (created) and return it."""
    torch.manual_seed(SEED)
    config = head64_config()
    model = OwlForConditionalGeneration(config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.dim() >= 2 or name.endswith("query_tokens"):
                param.normal_(0.0, 0.3 if "lm_head" in name or "embed_tokens" in name else 0.08)
    state = {k: v.to(torch.bfloat16).contiguous() for k, v in model.state_dict().items()}
    head_dim = config.text_config["hidden_size"] // config.text_config["num_attention_heads"]
    inv_freq = 1.0 / (10000.0 ** (torch.arange(0, head_dim, 2).float() / head_dim))
    for layer in range(config.text_config["num_hidden_layers"]):  # as transformers 4.28 wrote them
        state[f"language_model.model.layers.{layer}.self_attn.rotary_emb.inv_freq"] = inv_freq
    folder.mkdir(parents=True, exist_ok=True)
    torch.save(state, folder / "pytorch_model.bin")
    upstream = config.to_dict()
    upstream.pop("openowl_video")
    upstream["torch_dtype"] = "bfloat16"
    (folder / "config.json").write_text(json.dumps(upstream, indent=2) + "\n")
    for name in COPIED:
        shutil.copy(PARITY / name, folder / name)
    return folder
