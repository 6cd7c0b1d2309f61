"""After training: save or load the adapter alone, or write the upstream layout.

- Merging LoRA into the base weights is `openowl.model.lora.merge_lora`: the model then has exactly the released
  key names, so `model.save_pretrained(folder)` (sharded safetensors) is the safetensors export.
- `save_adapter` / `load_adapter`: the LoRA weights, in PEFT's format (`adapter_model.safetensors` with
  `base_model.model.`-prefixed keys, `adapter_config.json`), as upstream's PEFT training wrote them; and, when the
  policy also trained a part in full (stage2-abstractor's abstractor), that part's weights whole beside them
  (`trained_weights.safetensors`, released key names), so that base + adapter is the trained model. PEFT's own
  loader reads only the LoRA part.
- `save_upstream`: one `pytorch_model.bin` (bfloat16, like the released files) + `config.json`, LoRA merged.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from openowl.checkpoint import BIN_INDEX, SAFE_INDEX, CheckpointError, storable
from openowl.files import atomic_write
from openowl.model.lora import ADAPTER_NAME, has_lora, inject_lora, is_lora_parameter, merged_state_dict

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
FULL_WEIGHTS = "trained_weights.safetensors"  # the weights a policy trained in full, beside the LoRA ones
PEFT_PREFIX = "base_model.model."  # what PeftModel puts before every key of the wrapped model


# --- the adapter alone ---------------------------------------------------------------------------


def save_adapter(
    model: nn.Module, folder: str | Path, base_model: str | None = None, full: dict[str, torch.Tensor] | None = None
) -> None:
    """Write the LoRA weights (`adapter_model.safetensors`) and their `adapter_config.json`, which names
    `base_model` (the checkpoint or hub id they apply to) as `base_model_name_or_path`; and `full`, the weights
    that were trained in full (by their names in the model), as `trained_weights.safetensors`.

    Raises:
        ValueError: when the model has no LoRA layers.
    """
    from peft import get_peft_model_state_dict

    if not has_lora(model):
        raise ValueError("the model has no LoRA layers to save (apply a policy with a 'lora' part first)")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = get_peft_model_state_dict(model, adapter_name=ADAPTER_NAME, save_embedding_layers=False)
    state = {PEFT_PREFIX + key: value.detach().contiguous() for key, value in state.items()}
    save_file(state, folder / ADAPTER_WEIGHTS, metadata={"format": "pt"})
    config = copy.copy(model.peft_config[ADAPTER_NAME])
    config.base_model_name_or_path = base_model
    config.save_pretrained(folder)
    (folder / FULL_WEIGHTS).unlink(missing_ok=True)
    if full:
        save_file({k: v.detach().to("cpu").contiguous() for k, v in full.items()}, folder / FULL_WEIGHTS)


def load_adapter(model: nn.Module, folder: str | Path) -> nn.Module:
    """Load a LoRA adapter written by `save_adapter` (or by PEFT) into the model, in place.

    A model without LoRA layers gets them from `adapter_config.json` (the other parameters keep their
    `requires_grad`); a model that already has them (to resume training) gets their weights replaced. Weights
    trained in full (`trained_weights.safetensors`, when there) replace the model's.

    Returns:
        The same model.

    Raises:
        CheckpointError: a missing file, or adapter weights that don't fit the model's LoRA layers.
    """
    from peft import LoraConfig, set_peft_model_state_dict

    folder = Path(folder)
    for name in (ADAPTER_WEIGHTS, ADAPTER_CONFIG):
        if not (folder / name).is_file():
            raise CheckpointError(f"{folder}: no {name} (not an adapter folder)")
    state = {key.removeprefix(PEFT_PREFIX): value for key, value in load_file(folder / ADAPTER_WEIGHTS).items()}
    if not has_lora(model):
        flags = {name: param.requires_grad for name, param in model.named_parameters()}
        inject_lora(model, LoraConfig.from_pretrained(folder))
        for name, param in model.named_parameters():
            if not is_lora_parameter(name):
                param.requires_grad_(flags[name.replace(".base_layer.", ".")])
    try:
        result = set_peft_model_state_dict(model, state, adapter_name=ADAPTER_NAME)
    except RuntimeError as err:  # size mismatches
        raise CheckpointError(f"{folder / ADAPTER_WEIGHTS}: does not fit the model's LoRA layers ({err})") from err
    missing = [key for key in result.missing_keys if is_lora_parameter(key)]
    if result.unexpected_keys or missing:
        raise CheckpointError(
            f"{folder / ADAPTER_WEIGHTS} does not match the model's LoRA layers: "
            f"unexpected {sorted(result.unexpected_keys)[:5]}, missing {sorted(missing)[:5]}"
        )
    if (folder / FULL_WEIGHTS).is_file():
        _load_full(model, folder / FULL_WEIGHTS)
    return model


def _load_full(model: nn.Module, path: Path) -> None:
    """Copy whole weights into the model's parameters of the same names, every name and shape checked first."""
    saved = load_file(path)
    params = dict(model.named_parameters())
    wrong = [k for k, v in saved.items() if k not in params or params[k].shape != v.shape]
    if wrong:
        raise CheckpointError(f"{path}: weights the model has no parameter of that name and shape for: {wrong[:5]}")
    with torch.no_grad():
        for key, value in saved.items():
            params[key].copy_(value)


# --- the upstream layout -------------------------------------------------------------------------


def save_upstream(model: nn.Module, folder: str | Path, dtype: torch.dtype = torch.bfloat16) -> None:
    """Write the released layout: one `pytorch_model.bin` (LoRA merged, released key names) and `config.json`.

    The model is not changed. Weight files of another layout already in the folder (safetensors, a sharded
    index) are removed, since a loader would prefer them to `pytorch_model.bin`.

    Args:
        dtype: the dtype floating-point tensors are stored in (the released files are bfloat16).
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    stored: dict[tuple, torch.Tensor] = {}  # tied weights stay one tensor under two names
    state = {}
    for key, value in merged_state_dict(model).items():
        ident = (value.device, value.data_ptr(), value.dtype, tuple(value.shape))
        if ident not in stored:
            stored[ident] = storable(value, dtype)
        state[key] = stored[ident]
    atomic_write(folder / "config.json", model.config.to_json_file)
    for stale in [*folder.glob("model*.safetensors"), *folder.glob("pytorch_model-*.bin")]:
        stale.unlink()
    for index in (SAFE_INDEX, BIN_INDEX):
        (folder / index).unlink(missing_ok=True)
    atomic_write(folder / "pytorch_model.bin", lambda path: torch.save(state, path))
