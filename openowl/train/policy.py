"""Freezing as data: which parts of the owl train, in full or through LoRA, and the presets of the two stages.

The model has three parts (`MODEL_PARTS`). `vision` owns `vision_model.*`; `abstractor` owns `query_tokens`,
`temporal_query_tokens` and `abstractor.*`; `language_model` owns `language_model.*`. A `TrainPolicy` gives each
part a mode: "frozen" (no parameter trains), "full" (every parameter trains) or "lora" (PEFT LoRA layers are
injected on the part's Linear layers named in `LoraSettings.targets`, and only they train).

LoRA targets are matched by a Linear's own name, within the LoRA parts only:

- language_model (LLaMA): `q_proj k_proj v_proj o_proj gate_proj up_proj down_proj`
- vision: `query_key_value dense fc1 fc2`
- abstractor: `query key value out_proj w1 w2 w3 visual_fc` (+ `temporal_visual_fc` in video models)

LoRA layers are injected by `openowl.model.lora`, which keeps the released key names in the state dict.

Frozen parts need no `torch.no_grad()` in the training loop: a part whose weights and inputs don't require grad
records no autograd graph (in stage 2 the vision tower and the abstractor run graph-free on their own). Backprop
still runs *through* a frozen part that sits after a trainable one (stage 1 back-propagates through the frozen LLM
to reach the abstractor); `backward_parts` names those parts, and they are the ones gradient checkpointing is
switched on for. `apply_policy` does not change train/eval modes (upstream trains with every module in train mode).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal, get_args

import torch
from torch import nn

from openowl.model.lora import has_lora, inject_lora, is_lora_parameter

if TYPE_CHECKING:  # peft is imported when LoRA is first used: it is slow to import
    from peft import LoraConfig

Part = Literal["frozen", "full", "lora"]
MODEL_PARTS = ("vision", "abstractor", "language_model")  # in data-flow order
# The top-level attribute names each part owns.
PART_ROOTS = {
    "vision": ("vision_model",),
    "abstractor": ("query_tokens", "temporal_query_tokens", "abstractor"),
    "language_model": ("language_model",),
}


@dataclass(frozen=True)
class LoraSettings:
    """LoRA hyper-parameters; the defaults are upstream's stage 2 (`train_it.sh`).

    Args:
        r: rank of the update `B @ A`.
        alpha: the update is scaled by `alpha / r`.
        dropout: dropout on the LoRA branch's input, in training mode.
        targets: names of the Linear layers to adapt in every LoRA part (see the module docstring).
    """

    r: int = 8
    alpha: int = 32
    dropout: float = 0.05
    targets: tuple[str, ...] = ("q_proj", "v_proj")

    def __post_init__(self) -> None:
        object.__setattr__(self, "targets", tuple(self.targets))  # a list from a YAML file is fine too
        if self.r <= 0:
            raise ValueError(f"LoRA rank must be positive, got {self.r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"LoRA dropout must be in [0, 1), got {self.dropout}")
        if not self.targets:
            raise ValueError("LoRA needs at least one target Linear name")


@dataclass(frozen=True)
class TrainPolicy:
    """What trains, per part: "frozen", "full" or "lora"."""

    vision: Part
    abstractor: Part
    language_model: Part
    lora: LoraSettings = LoraSettings()

    def __post_init__(self) -> None:
        for part in MODEL_PARTS:
            if getattr(self, part) not in get_args(Part):
                raise ValueError(f"{part}: unknown mode {getattr(self, part)!r}; use one of {get_args(Part)}")


POLICIES = {
    # Stage 1 (paper §3.2): the ViT and the abstractor learn, the LLM is frozen.
    "stage1": TrainPolicy(vision="full", abstractor="full", language_model="frozen"),
    # Stage 1 with a frozen, already trained ViT (BLIP-2 / LLaVA style): only the abstractor learns (owl-small).
    "stage1-abstractor": TrainPolicy(vision="frozen", abstractor="full", language_model="frozen"),
    # Stage 2 as the released code trains it: LoRA on the LLM's q/v projections, everything else frozen.
    "stage2": TrainPolicy(vision="frozen", abstractor="frozen", language_model="lora"),
    # Stage 2 as the paper describes it: the abstractor is fine-tuned too.
    "stage2-abstractor": TrainPolicy(vision="frozen", abstractor="full", language_model="lora"),
    # The released full fine-tune (`train_it_wo_lora.sh`): only the LLM trains.
    "full-llm": TrainPolicy(vision="frozen", abstractor="frozen", language_model="full"),
}


def get_policy(name: str) -> TrainPolicy:
    """A preset policy by name.

    Raises:
        KeyError: for an unknown name, listing the known ones.
    """
    if name not in POLICIES:
        raise KeyError(f"unknown policy {name!r}; known policies: {', '.join(POLICIES)}")
    return POLICIES[name]


def trainable_parts(policy: TrainPolicy) -> set[str]:
    """The parts that have trainable parameters (mode "full" or "lora")."""
    return {part for part in MODEL_PARTS if getattr(policy, part) != "frozen"}


def backward_parts(policy: TrainPolicy) -> set[str]:
    """The parts backprop runs through: every part from the first trainable one on, in data-flow order.

    Only these need activations kept for the backward pass; the others run without an autograd graph.
    """
    trainable = trainable_parts(policy)
    first = next((i for i, part in enumerate(MODEL_PARTS) if part in trainable), len(MODEL_PARTS))
    return set(MODEL_PARTS[first:])


def part_of(name: str) -> str:
    """The part that owns a parameter (or module) name of the owl.

    Raises:
        ValueError: for a name outside every part (a new top-level module must be given a part here).
    """
    root = name.split(".", 1)[0]
    for part, roots in PART_ROOTS.items():
        if root in roots:
            return part
    raise ValueError(f"{name!r} belongs to no part of the model (known roots: {PART_ROOTS})")


def apply_policy(model: nn.Module, policy: TrainPolicy, gradient_checkpointing: bool = False) -> nn.Module:
    """Inject the policy's LoRA layers, set `requires_grad` on every parameter, and set gradient checkpointing.

    Args:
        model: an `OwlForConditionalGeneration`; changed in place.
        policy: what trains.
        gradient_checkpointing: recompute activations in the backward pass of every part backprop runs through
            (`backward_parts`); off everywhere when False.

    Returns:
        The same model.

    Raises:
        ValueError: a LoRA part in which no Linear matches the targets, a target that matches nothing, or LoRA
            asked of a model that already has LoRA layers.
    """
    lora_parts = [part for part in MODEL_PARTS if getattr(policy, part) == "lora"]
    if lora_parts:
        if has_lora(model):
            raise ValueError("the model already has LoRA layers; apply a policy to a model without them")
        inject_lora(model, lora_config(model, lora_parts, policy.lora))
    for name, param in model.named_parameters():
        mode = getattr(policy, part_of(name))
        param.requires_grad_(mode == "full" or (mode == "lora" and is_lora_parameter(name)))
    set_gradient_checkpointing(model, backward_parts(policy) if gradient_checkpointing else set())
    return model


def store_frozen_linears(model: nn.Module, dtype: torch.dtype) -> list[str]:
    """Keep frozen Linear weights (and biases) in `dtype` where that loses nothing, e.g. bf16 weights read into
    float32 from a bf16 checkpoint such as the released ones.

    Under autocast in `dtype` a float32 Linear weight is cast again at every call (frozen weights are not in
    autocast's cache); stored in `dtype` it is used as it is, and the product is bit-identical. Weights that
    `dtype` can't hold exactly, and everything trained, stay as they are.

    Returns:
        The names of the converted Linear modules.
    """
    # A weight tied to a non-Linear module (an LM head sharing the embeddings) keeps its dtype: the embeddings
    # start the residual stream, which autocast leaves in float32.
    shared = {id(p) for m in model.modules() if not isinstance(m, nn.Linear) for p in m.parameters(recurse=False)}
    converted = []
    for name, module in model.named_modules():
        params = [p for p in (getattr(module, "weight", None), getattr(module, "bias", None)) if p is not None]
        if not isinstance(module, nn.Linear) or any(p.requires_grad or p.dtype == dtype for p in params):
            continue
        if any(id(p) in shared for p in params):
            continue
        cast = [p.detach().to(dtype) for p in params]
        if all(torch.equal(c.to(p.dtype), p) for c, p in zip(cast, params, strict=True)):
            for p, c in zip(params, cast, strict=True):
                p.data = c
            converted.append(name)
    return converted


def trainable_parameters(model: nn.Module) -> dict[str, int]:
    """`{name: numel}` of every parameter that requires grad."""
    return {name: param.numel() for name, param in model.named_parameters() if param.requires_grad}


def set_gradient_checkpointing(model: nn.Module, parts: set[str]) -> None:
    """Switch activation recomputation on for `parts` and off for the others (it acts in training mode only)."""
    model.abstractor.encoder.gradient_checkpointing = "abstractor" in parts
    # transformers models (the LM; a DINOv2 encoder) switch it through their own API.
    for part, module in (("vision", model.vision_model), ("language_model", model.language_model)):
        if not hasattr(module, "gradient_checkpointing_enable"):
            module.encoder.gradient_checkpointing = part in parts  # the upstream ViT
        elif part in parts:
            # Non-reentrant checkpointing needs no `enable_input_require_grads` trick for frozen embeddings.
            name = _checkpointing_name(module)
            getattr(module, f"{name}_enable")(**{f"{name}_kwargs": {"use_reentrant": False}})
        elif is_checkpointing(module):
            getattr(module, f"{_checkpointing_name(module)}_disable")()


def is_checkpointing(module: nn.Module) -> bool:
    """Whether a transformers model recomputes its activations in training."""
    return bool(getattr(module, f"is_{_checkpointing_name(module)}"))


def _checkpointing_name(module: nn.Module) -> str:
    """What a transformers model calls activation recomputation: `activation_checkpointing` (`..._enable`,
    `is_...`) from transformers 5.20 on, `gradient_checkpointing` before (deprecated since)."""
    return (
        "activation_checkpointing" if hasattr(module, "activation_checkpointing_enable") else "gradient_checkpointing"
    )


# --- LoRA ----------------------------------------------------------------------------------------


def lora_config(model: nn.Module, parts: list[str], settings: LoraSettings) -> LoraConfig:
    """The `peft.LoraConfig` adapting the Linear layers named in `settings.targets` within `parts`.

    `target_modules` is one regex over module names from the model's root, like upstream's
    `.*language_model.*\\.(q_proj|v_proj)`, so a single adapter config describes the whole model.

    Raises:
        ValueError: a part with no matching Linear, or a target name no LoRA part has.
    """
    from peft import LoraConfig

    used: set[str] = set()
    for part in parts:
        names = _linear_names(model, part)
        matched = names & set(settings.targets)
        if not matched:
            raise ValueError(
                f"LoRA on {part}: none of the targets {settings.targets} is a Linear of this part; "
                f"its Linear layers are {sorted(names)}"
            )
        used |= matched
    unused = [t for t in settings.targets if t not in used]
    if unused:
        raise ValueError(f"LoRA targets {unused} match no Linear layer in the LoRA parts {parts}")
    roots = "|".join(re.escape(root) for part in parts for root in PART_ROOTS[part])
    names = "|".join(re.escape(target) for target in settings.targets)
    return LoraConfig(
        r=settings.r,
        lora_alpha=settings.alpha,
        lora_dropout=settings.dropout,
        target_modules=rf"(?:{roots})\.(?:.*\.)?(?:{names})",
        bias="none",
    )


def _linear_names(model: nn.Module, part: str) -> set[str]:
    return {
        name.rsplit(".", 1)[-1]
        for name, module in model.named_modules()
        if name and isinstance(module, nn.Linear) and part_of(name) == part
    }
