"""Plain dataclass configs for mPLUG-Owl, named presets, and the upstream `config.json` reader/writer.

The upstream file (`model_type: "mplug-owl"`) nests `vision_config`, `visual_abstractor_config` and
`text_config` (a transformers LLaMA or BLOOM config). We keep the first two as dataclasses and the text part
as the dict transformers reads, so that any causal LM transformers knows can sit behind the abstractor.
"""

from __future__ import annotations

import copy
import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from transformers import AutoConfig, PretrainedConfig

MODEL_TYPE = "mplug-owl"
VISION_MODEL_TYPE = "mplug_owl_vision_model"
DINOV2_MODEL_TYPE = "dinov2"
ABSTRACTOR_MODEL_TYPE = "mplug_owl_visual_abstract"
NUM_VISUAL_TOKENS_EXTRA = 1  # the learned `vit_eos` appended after the queries


@dataclass
class VisionConfig:
    """The image encoder: upstream's CLIP-style ViT (fused per-head QKV, QuickGELU, pre/post LayerNorm), or with
    `model_type="dinov2"` a DINOv2 ViT (transformers' `Dinov2Model`: LayerScale, GELU, final LayerNorm)."""

    model_type: str = VISION_MODEL_TYPE
    hidden_size: int = 1024
    intermediate_size: int = 4096
    num_hidden_layers: int = 24
    num_attention_heads: int = 16
    num_channels: int = 3
    image_size: int = 224
    patch_size: int = 14
    layer_norm_eps: float = 1e-6
    # Video checkpoints add a temporal adapter to every layer; its width is half the hidden size upstream.
    temporal_hidden_size: int | None = None
    # DINOv2 only: the image size its position grid was trained at (518 px = 37×37 patches). The grid is kept as
    # trained and interpolated (bicubic) to `image_size` at run time, as DINOv2 does.
    pretrained_image_size: int | None = None

    def __post_init__(self) -> None:
        if self.model_type not in (VISION_MODEL_TYPE, DINOV2_MODEL_TYPE):
            known = f"{VISION_MODEL_TYPE!r} or {DINOV2_MODEL_TYPE!r}"
            raise ValueError(f"unknown vision model_type {self.model_type!r} (expected {known})")
        if self.model_type == DINOV2_MODEL_TYPE:
            if self.temporal_hidden_size is not None:
                raise ValueError("the DINOv2 encoder has no temporal adapters (video checkpoints use the upstream ViT)")
            if self.intermediate_size % self.hidden_size:
                raise ValueError("a DINOv2 MLP width must be a whole multiple of its hidden size (its mlp_ratio)")

    def build_dinov2_config(self) -> PretrainedConfig:
        """The transformers `Dinov2Config` of a `model_type="dinov2"` encoder."""
        return AutoConfig.for_model(
            DINOV2_MODEL_TYPE,
            hidden_size=self.hidden_size,
            num_hidden_layers=self.num_hidden_layers,
            num_attention_heads=self.num_attention_heads,
            mlp_ratio=self.intermediate_size // self.hidden_size,
            image_size=self.pretrained_image_size or self.image_size,
            patch_size=self.patch_size,
            num_channels=self.num_channels,
            layer_norm_eps=self.layer_norm_eps,
        )

    @property
    def num_positions(self) -> int:
        return (self.image_size // self.patch_size) ** 2 + 1


@dataclass
class AbstractorConfig:
    """The visual abstractor: learned queries attending to concat(queries, image tokens)."""

    hidden_size: int = 1024
    num_hidden_layers: int = 6
    num_attention_heads: int = 16
    intermediate_size: int = 2816
    encoder_hidden_size: int = 1024
    layer_norm_eps: float = 1e-6
    attention_probs_dropout_prob: float = 0.1


def _llama_text_config(**overrides: Any) -> dict[str, Any]:
    base = dict(
        model_type="llama",
        vocab_size=32000,
        hidden_size=4096,
        intermediate_size=11008,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=32,
        max_position_embeddings=2048,
        rms_norm_eps=1e-6,
        hidden_act="silu",
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
        tie_word_embeddings=False,
        rope_theta=10000.0,
    )
    base.update(overrides)
    return base


@dataclass
class OwlConfig:
    """The whole model: vision encoder, abstractor, and the causal LM behind them."""

    vision: VisionConfig = field(default_factory=VisionConfig)
    abstractor: AbstractorConfig = field(default_factory=AbstractorConfig)
    text_config: dict[str, Any] = field(default_factory=_llama_text_config)
    num_query_tokens: int = 64
    # True for the `-video` checkpoint: temporal adapters, temporal queries and `temporal_visual_fc`.
    video: bool = False

    @property
    def num_visual_tokens(self) -> int:
        """Tokens each image (or video) occupies in the LM sequence: the queries plus `vit_eos`."""
        return self.num_query_tokens + NUM_VISUAL_TOKENS_EXTRA

    def build_text_config(self) -> PretrainedConfig:
        """The transformers config of the language model (LLaMA, BLOOM, ...)."""
        kwargs = {k: v for k, v in self.text_config.items() if k != "model_type"}
        return AutoConfig.for_model(self.text_config["model_type"], **kwargs)

    # --- upstream config.json ------------------------------------------------------------------

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> OwlConfig:
        """Read the upstream `config.json` layout (extra generic fields are ignored).

        Raises:
            ValueError: when `model_type` is not mplug-owl or a required section is missing.
        """
        model_type = data.get("model_type")
        if model_type not in (MODEL_TYPE, "mplug_owl"):
            raise ValueError(f"unknown model_type {model_type!r}: expected {MODEL_TYPE!r} (an mPLUG-Owl checkpoint)")
        for section in ("vision_config", "visual_abstractor_config", "text_config"):
            if not isinstance(data.get(section), dict):
                raise ValueError(f"config has no {section!r} section")
        text = data["text_config"]
        if "model_type" not in text:
            raise ValueError("text_config has no 'model_type' (expected e.g. 'llama' or 'bloom')")
        return cls(
            vision=_pick(VisionConfig, {"model_type": VISION_MODEL_TYPE, **data["vision_config"]}),
            abstractor=_pick(AbstractorConfig, data["visual_abstractor_config"]),
            text_config=_clean_text_config(text),
            num_query_tokens=int(data.get("num_query_tokens", 64)),
            video=bool(data.get("openowl_video", False)),
        )

    def to_dict(self) -> dict[str, Any]:
        """Write the upstream layout, readable by the upstream code and by `from_dict`."""
        vision = {k: v for k, v in dataclasses.asdict(self.vision).items() if v is not None}
        vision["hidden_act"] = "quick_gelu" if self.vision.model_type == VISION_MODEL_TYPE else "gelu"
        text = copy.deepcopy(self.text_config)
        return {
            "architectures": ["MplugOwlForConditionalGeneration"],
            "model_type": MODEL_TYPE,
            "num_query_tokens": self.num_query_tokens,
            "openowl_video": self.video,
            "vision_config": vision,
            "visual_abstractor_config": {"model_type": ABSTRACTOR_MODEL_TYPE, **dataclasses.asdict(self.abstractor)},
            "text_config": text,
            "tie_word_embeddings": bool(text.get("tie_word_embeddings", False)),
            "use_decoder_only_language_model": True,
        }

    @classmethod
    def from_json_file(cls, path: str | Path) -> OwlConfig:
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}: not valid JSON ({err})") from err
        try:
            return cls.from_dict(data)
        except ValueError as err:
            raise ValueError(f"{path}: {err}") from err

    def to_json_file(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n")


# Generic PretrainedConfig fields that upstream's `to_dict` dumps into text_config; they describe generation
# defaults of transformers 4.28, not the architecture, and would only confuse a current transformers.
_GENERIC_TEXT_FIELDS = {
    "_name_or_path", "add_cross_attention", "architectures", "bad_words_ids", "begin_suppress_tokens",
    "chunk_size_feed_forward", "cross_attention_hidden_size", "decoder_start_token_id", "diversity_penalty",
    "do_sample", "early_stopping", "encoder_no_repeat_ngram_size", "exponential_decay_length_penalty",
    "finetuning_task", "forced_bos_token_id", "forced_eos_token_id", "id2label", "is_decoder",
    "is_encoder_decoder", "label2id", "length_penalty", "max_length", "min_length", "no_repeat_ngram_size",
    "num_beam_groups", "num_beams", "num_return_sequences", "output_attentions", "output_hidden_states",
    "output_scores", "prefix", "problem_type", "pruned_heads", "remove_invalid_values", "repetition_penalty",
    "return_dict", "return_dict_in_generate", "sep_token_id", "suppress_tokens", "task_specific_params",
    "temperature", "tf_legacy_loss", "tie_encoder_decoder", "tokenizer_class", "top_k", "top_p", "torch_dtype",
    "torchscript", "transformers_version", "typical_p", "use_bfloat16", "_commit_hash", "__slotnames__",
}  # fmt: skip


def _clean_text_config(text: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in text.items() if k not in _GENERIC_TEXT_FIELDS}


def _pick(cls: type, data: dict[str, Any]) -> Any:
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in data.items() if k in names})


# --- presets -------------------------------------------------------------------------------------


def _preset_7b(video: bool = False) -> OwlConfig:
    return OwlConfig(
        vision=VisionConfig(temporal_hidden_size=512 if video else None),
        abstractor=AbstractorConfig(),
        text_config=_llama_text_config(),
        video=video,
    )


def _preset_tiny(video: bool = False) -> OwlConfig:
    """The shape of the parity fixture: every width 64, two layers, the real 32000-piece vocabulary."""
    return OwlConfig(
        vision=VisionConfig(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            image_size=56,
            temporal_hidden_size=32 if video else None,
        ),
        abstractor=AbstractorConfig(
            hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=176, encoder_hidden_size=64
        ),
        text_config=_llama_text_config(
            hidden_size=64,
            intermediate_size=160,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=4,
            max_position_embeddings=1024,
        ),
        video=video,
    )


def _preset_llama_1b() -> OwlConfig:
    """The 7B vision side with a 1.26 B LLaMA-shaped LM (width 2048, 22 layers): benchmarks at real width."""
    config = _preset_7b()
    config.text_config = _llama_text_config(
        hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32, num_key_value_heads=32
    )
    return config


def smollm2_135m_text_config() -> dict[str, Any]:
    """SmolLM2-135M-Instruct, a LLaMA-architecture LM (GQA 9/3 heads, tied embeddings, ChatML template)."""
    return _llama_text_config(
        vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
        num_key_value_heads=3, head_dim=64, max_position_embeddings=8192, rms_norm_eps=1e-5, rope_theta=100000.0,
        bos_token_id=1, eos_token_id=2, pad_token_id=2, tie_word_embeddings=True,
    )  # fmt: skip


def _preset_owl_small() -> OwlConfig:
    """`owl-small`: a DINOv2 ViT-S/14 and SmolLM2-135M-Instruct joined by a 2-layer abstractor of 32 queries.

    32 queries, as BLIP-2's Q-Former gives a frozen LM: half of upstream's 64, which served a 7B LM reading a ViT-L;
    the LM's cost on a CPU grows with the tokens it reads. The abstractor is as wide as the ViT (384), as upstream's
    (1024) is as wide as its ViT-L.
    """
    return OwlConfig(
        vision=VisionConfig(
            model_type=DINOV2_MODEL_TYPE, hidden_size=384, intermediate_size=1536, num_hidden_layers=12,
            num_attention_heads=6, image_size=224, patch_size=14, layer_norm_eps=1e-6, pretrained_image_size=518,
        ),
        abstractor=AbstractorConfig(
            hidden_size=384, num_hidden_layers=2, num_attention_heads=6, intermediate_size=1024, encoder_hidden_size=384
        ),
        text_config=smollm2_135m_text_config(),
        num_query_tokens=32,
    )  # fmt: skip


PRESETS = {
    "mplug-owl-7b": _preset_7b,
    "mplug-owl-7b-video": lambda: _preset_7b(video=True),
    "llama-1b": _preset_llama_1b,
    "tiny": _preset_tiny,
    "tiny-video": lambda: _preset_tiny(video=True),
    "owl-small": _preset_owl_small,
}


def get_preset(name: str) -> OwlConfig:
    """A fresh config of a named shape.

    Raises:
        KeyError: for an unknown preset name, listing the known ones.
    """
    if name not in PRESETS:
        raise KeyError(f"unknown preset {name!r}; known presets: {', '.join(sorted(PRESETS))}")
    return PRESETS[name]()
