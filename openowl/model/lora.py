"""LoRA on the owl's Linear layers, through PEFT: inject, test for, and merge.

State-dict keys stay in the released layout: a LoRA-wrapped Linear keeps its weight under `...q_proj.weight` (not
PEFT's `...q_proj.base_layer.weight`), next to `...q_proj.lora_A.default.weight` and `...lora_B.default.weight`.
(`named_parameters()` still shows PEFT's `base_layer` names; only the state dict is renamed, both ways.)
Merging folds each update `(alpha / r) · B @ A` into its Linear, which gives back exactly the released key names.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

if TYPE_CHECKING:  # peft is imported when LoRA is first used: it is slow to import
    from peft import LoraConfig

ADAPTER_NAME = "default"


def is_lora_parameter(name: str) -> bool:
    return ".lora_" in name


def has_lora(model: nn.Module) -> bool:
    from peft.tuners.lora import LoraLayer

    return any(isinstance(module, LoraLayer) for module in model.modules())


def inject_lora(model: nn.Module, config: LoraConfig) -> None:
    """Wrap the Linear layers `config` targets in PEFT LoRA layers, in place, keeping the released key names.

    Adapter weights are float32 whatever the base dtype (PEFT's `autocast_adapter_dtype`); the LoRA forward casts
    its input to them and its output back. PEFT marks only adapter weights trainable; callers set the rest.
    """
    from peft import inject_adapter_in_model
    from peft.tuners.lora import LoraLayer

    inject_adapter_in_model(config, model, adapter_name=ADAPTER_NAME)
    for module in model.modules():
        if isinstance(module, LoraLayer):
            _keep_base_key_names(module)
            for name, param in module.named_parameters():
                if is_lora_parameter("." + name) and param.dtype in (torch.float16, torch.bfloat16):
                    param.data = param.data.float()


def _keep_base_key_names(layer: nn.Module) -> None:
    """State-dict hooks: the wrapped Linear's `base_layer.weight` is saved and loaded as plain `weight`."""
    if getattr(layer, "_openowl_key_hooks", False):
        return
    layer.register_state_dict_post_hook(_drop_base_layer_prefix)
    layer.register_load_state_dict_pre_hook(_add_base_layer_prefix)
    layer._openowl_key_hooks = True


def _drop_base_layer_prefix(module: nn.Module, state_dict: dict, prefix: str, local_metadata: dict) -> None:
    inner = prefix + "base_layer."
    items = list(state_dict.items())  # rebuilt in order, so each weight keeps its place in the dict
    state_dict.clear()
    state_dict.update((prefix + key[len(inner) :] if key.startswith(inner) else key, value) for key, value in items)


def _add_base_layer_prefix(module: nn.Module, state_dict: dict, prefix: str, *args) -> None:
    base = module.get_base_layer()
    for name in [*base._parameters, *base._buffers]:
        if prefix + name in state_dict:
            state_dict[prefix + "base_layer." + name] = state_dict.pop(prefix + name)


def _lora_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    from peft.tuners.lora import LoraLayer

    return [(name, module) for name, module in model.named_modules() if isinstance(module, LoraLayer)]


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every LoRA update into its base Linear and put the plain Linear back, in place.

    Returns:
        The same model, without LoRA layers: its state dict has exactly the released key names.
    """
    for name, layer in _lora_layers(model):
        layer.merge(safe_merge=True)  # computes out of place and checks for NaNs
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, layer.get_base_layer())
    if hasattr(model, "peft_config"):
        del model.peft_config
    return model


def merged_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The state dict `merge_lora` would leave, computed without changing the model.

    Each merged weight is `W + (alpha / r) · B @ A` summed in float32 and cast to W's dtype; LoRA keys are dropped.
    """
    state = {key: value for key, value in model.state_dict().items() if not is_lora_parameter(key)}
    for name, layer in _lora_layers(model):
        weight = layer.get_base_layer().weight
        pending = [a for a in layer.active_adapters if a in layer.lora_A and a not in layer.merged_adapters]
        delta = sum(layer.get_delta_weight(adapter).float() for adapter in pending)
        state[f"{name}.weight"] = (weight.detach().float() + delta).to(weight.dtype)
    return state
