"""Joining owl-small's pretrained parts into a model, and applying the trained weights that the repository ships.

`build_base` reads the ViT and the LM from their packages (`convert` turns their formats into transformers'
layouts) and joins them with a freshly initialised abstractor, seeded; `build` adds the trained weights:
the abstractor and its queries are loaded, and the LoRA factors are merged into the LM through
`openowl.model.lora`, as training's own export merges them.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from openowl.config import get_preset
from openowl.constants import IMAGENET_MEAN, IMAGENET_STD
from openowl.convert import dinov2_from_onnx, llama_from_gguf, tokenizer_from_gguf
from openowl.files import sha256
from openowl.model.lora import inject_lora, merge_lora
from openowl.model.owl import OwlForConditionalGeneration
from openowl.owl_small.pretrained import NAME, part_file
from openowl.processing import OwlProcessor

TRAINED_WEIGHTS = Path(__file__).parent / "weights" / "owl-small.safetensors"
TRAINED_SHA256 = "5511695c9e6fd1fb059ef7e33a5de8f95c37ea9600030944737b44d32d345204"
SEED = 0
LORA_KEY = re.compile(r"(language_model\..+)\.lora_([AB])\.weight")  # a LoRA factor in the shipped file


def build_base() -> tuple[OwlForConditionalGeneration, OwlProcessor]:
    """The pretrained ViT and LM read from their packages, joined by a freshly initialised abstractor (seeded)."""
    vision_state = dinov2_from_onnx(part_file("vision"))
    text_config, lm_state = llama_from_gguf(part_file("language"))
    config = get_preset(NAME)
    config.text_config = text_config
    torch.manual_seed(SEED)
    model = OwlForConditionalGeneration(config)
    init_abstractor(model)
    model.vision_model.load_state_dict(vision_state, strict=True)
    result = model.language_model.load_state_dict(lm_state, strict=False)
    if result.unexpected_keys or set(result.missing_keys) - {"lm_head.weight"}:
        raise ValueError(f"the GGUF LM doesn't fit: missing {result.missing_keys}, unexpected {result.unexpected_keys}")
    model.language_model.tie_weights()
    processor = OwlProcessor(
        tokenizer_from_gguf(part_file("language")),
        image_size=config.vision.image_size,
        image_mean=IMAGENET_MEAN,
        image_std=IMAGENET_STD,
        num_visual_tokens=config.num_visual_tokens,
        prompt_format="chat-template",
    )
    return model.eval(), processor


def init_abstractor(model: OwlForConditionalGeneration, std: float = 0.02) -> None:
    """BERT-style initialisation of a new abstractor: normal(0, std) weights, queries and `vit_eos`; zero biases;
    unit LayerNorms."""
    with torch.no_grad():
        for module in model.abstractor.modules():
            if isinstance(module, nn.Linear):
                module.weight.normal_(0.0, std)
                if module.bias is not None:
                    module.bias.zero_()
            elif isinstance(module, nn.LayerNorm):
                module.weight.fill_(1.0)
                module.bias.zero_()
        model.query_tokens.normal_(0.0, std)
        model.abstractor.vit_eos.normal_(0.0, std)


def build() -> tuple[OwlForConditionalGeneration, OwlProcessor]:
    """owl-small as trained: the base model with the shipped trained weights."""
    model, processor = build_base()
    apply_trained(model, TRAINED_WEIGHTS, TRAINED_SHA256)
    return model, processor


def read_trained(path: Path, expected_sha256: str | None) -> tuple[dict[str, torch.Tensor], float]:
    """The tensors of a trained-weights file and its LoRA scale `alpha / r`, once its checksum is right.

    Raises:
        FileNotFoundError: no trained weights file.
        ValueError: no expected checksum, or one that differs (a damaged or replaced file).
    """
    if not path.is_file():
        raise FileNotFoundError(f"{path}: the trained {NAME} weights are missing (a broken install?)")
    if expected_sha256 is None:
        raise ValueError(f"{NAME} has no trained weights in this version (TRAINED_SHA256 is not set)")
    actual = sha256(path)
    if actual != expected_sha256:
        raise ValueError(f"{path}: sha256 {actual} differs from the expected {expected_sha256}: a damaged file")
    with safe_open(path, framework="pt") as f:
        tensors = {key: f.get_tensor(key) for key in f.keys()}  # noqa: SIM118 (safe_open is not a dict)
        scale = float(f.metadata()["lora_alpha"]) / float(f.metadata()["lora_r"])
    return tensors, scale


def apply_trained(model: OwlForConditionalGeneration, path: Path, expected_sha256: str | None) -> None:
    """Load the trained abstractor and merge the LoRA factors into the LM: `W += alpha / r · B @ A`.

    Raises:
        FileNotFoundError, ValueError: see `read_trained`; also weights that don't cover the whole abstractor or
            name layers the model lacks.
    """
    tensors, scale = read_trained(path, expected_sha256)
    params = dict(model.named_parameters())
    abstractor = {k for k in params if k.startswith("abstractor.") or k == "query_tokens"}
    missing = abstractor - tensors.keys()
    if missing:
        raise ValueError(f"{path}: no weights for {sorted(missing)[:5]}")
    lora: dict[str, dict[str, torch.Tensor]] = {}
    with torch.no_grad():
        for key, tensor in tensors.items():
            match = LORA_KEY.fullmatch(key)
            if match:
                lora.setdefault(match.group(1), {})[match.group(2)] = tensor
            elif key in abstractor:
                params[key].copy_(tensor)
            else:
                raise ValueError(f"{path}: unexpected tensor {key!r}")
    for module, pair in lora.items():
        if module + ".weight" not in params or pair.keys() != {"A", "B"}:
            raise ValueError(f"{path}: LoRA factors for {module!r} don't fit the model")
    if lora:
        _merge_factors(model, lora, scale)


def _merge_factors(model: nn.Module, lora: dict[str, dict[str, torch.Tensor]], scale: float) -> None:
    """Inject LoRA layers of each module's own rank (all scaled by `scale`), fill them, and merge them."""
    from peft import LoraConfig

    ranks = {module: pair["A"].shape[0] for module, pair in lora.items()}
    config = LoraConfig(
        r=min(ranks.values()),
        lora_alpha=min(ranks.values()) * scale,
        target_modules=sorted(lora),
        rank_pattern={re.escape(module): rank for module, rank in ranks.items()},
        alpha_pattern={re.escape(module): rank * scale for module, rank in ranks.items()},
        lora_dropout=0.0,
        bias="none",
    )
    inject_lora(model, config)
    with torch.no_grad():
        for module, pair in lora.items():
            layer = model.get_submodule(module)
            layer.lora_A["default"].weight.copy_(pair["A"])
            layer.lora_B["default"].weight.copy_(pair["B"])
    merge_lora(model)
