"""openowl inside vLLM: mPLUG-Owl checkpoints (the released v1 layout and owl-small's) served by vLLM's engine.

vLLM finds the plugin through the `vllm.general_plugins` entry point (pyproject.toml) and calls `register` in every
process it starts. The modules, one job each:
- `config`: the transformers config class of `model_type: mplug-owl`, which vLLM reads `config.json` through;
- `tokenizer`: the checkpoint's tokenizer, tokenizing prompts as openowl does (chunk by chunk around each
  `<image>`, which becomes one image token), with the prompt format's chat template (`--tokenizer-mode openowl`);
- `renderer`: vLLM's transformers renderer, refusing an `<image>` tag that no image fills;
- `model`: the multimodal processor (each image token grows into the image's visual tokens) and the model: openowl's
  ViT and abstractor in front of vLLM's own implementation of the language model.

docs/serving.md ("vLLM") tells how to install and run it.
"""

from __future__ import annotations

ARCHITECTURE = "MplugOwlForConditionalGeneration"
TOKENIZER_MODE = "openowl"


def register() -> None:
    """Register the config class, the model and the tokenizer mode with transformers and vLLM (idempotent: vLLM
    may call it more than once in a process)."""
    from vllm import ModelRegistry
    from vllm.renderers.registry import RENDERER_REGISTRY
    from vllm.tokenizers.registry import TokenizerRegistry

    from openowl.vllm.config import register_config

    register_config()
    if ARCHITECTURE not in ModelRegistry.get_supported_archs():
        ModelRegistry.register_model(ARCHITECTURE, "openowl.vllm.model:MplugOwlForConditionalGeneration")
    if TOKENIZER_MODE not in TokenizerRegistry.tokenizers:
        TokenizerRegistry.register(TOKENIZER_MODE, "openowl.vllm.tokenizer", "OwlTokenizer")
    if TOKENIZER_MODE not in RENDERER_REGISTRY.renderers:
        RENDERER_REGISTRY.register(TOKENIZER_MODE, "openowl.vllm.renderer", "OwlRenderer")
