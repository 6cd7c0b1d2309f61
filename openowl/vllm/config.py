"""The transformers config class of `model_type: mplug-owl`, so that `AutoConfig` (and so vLLM) reads an mPLUG-Owl
`config.json`: the vision and abstractor sections stay dicts (openowl's `OwlConfig` reads them), and `text_config`
becomes the language model's own transformers config, from which vLLM picks its implementation of the LM."""

from __future__ import annotations

from typing import Any

from transformers import AutoConfig, PretrainedConfig
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

from openowl.config import MODEL_TYPE, OwlConfig


class MplugOwlConfig(PretrainedConfig):
    """An mPLUG-Owl checkpoint's config.json, as released (`MAGAer13/mplug-owl-llama-7b`) or as openowl writes it."""

    model_type = MODEL_TYPE

    def __init__(
        self,
        vision_config: dict[str, Any] | None = None,
        visual_abstractor_config: dict[str, Any] | None = None,
        text_config: dict[str, Any] | PretrainedConfig | None = None,
        num_query_tokens: int = 64,
        **kwargs: Any,
    ):
        self.vision_config = dict(vision_config or {})
        self.visual_abstractor_config = dict(visual_abstractor_config or {})
        self.num_query_tokens = num_query_tokens
        self.text_config = _text_config(text_config or {"model_type": "llama"})
        super().__init__(**kwargs)

    def owl_config(self) -> OwlConfig:
        """openowl's config of the same checkpoint."""
        return OwlConfig.from_dict(self.to_dict())


def _text_config(text: dict[str, Any] | PretrainedConfig) -> PretrainedConfig:
    """The LM's transformers config; released files leave its `architectures` empty, which vLLM needs to pick the LM
    (e.g. `LlamaForCausalLM` for `model_type: llama`)."""
    if isinstance(text, dict):
        text = AutoConfig.for_model(**text)
    if not text.architectures and text.model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        text.architectures = [MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[text.model_type]]
    return text


def register_config() -> None:
    """Make `AutoConfig` read `model_type: mplug-owl` (idempotent)."""
    AutoConfig.register(MODEL_TYPE, MplugOwlConfig, exist_ok=True)
