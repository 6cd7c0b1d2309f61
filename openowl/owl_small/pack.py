"""Collecting what the recipe's LoRA runs trained into owl-small's shipped weights file (`openowl pack`)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from openowl.checkpoint import read_index, weight_files
from openowl.files import atomic_write, sha256
from openowl.owl_small.assemble import LORA_KEY, TRAINED_WEIGHTS


def pack(exports: list[Path], target: Path = TRAINED_WEIGHTS) -> str:
    """Collect what training changed from the recipe's LoRA runs, in the order they ran (`TrainRecipe.export`
    folders: a checkpoint with the LoRA merged, plus `adapter/`), into one bfloat16 safetensors file: the last
    run's abstractor and queries, and every run's LoRA factors. Runs that adapt the same Linear are joined along
    the rank, each B scaled to the last run's `alpha / r`, so that `B @ A · alpha / r` is the sum of their updates.

    Returns:
        The file's sha256 (to put in `TRAINED_SHA256`).
    """
    if not exports:
        raise ValueError("pack needs at least one export folder")
    tensors = {}
    for key, info in read_index(weight_files(exports[-1])).items():
        if key.startswith("abstractor.") or key == "query_tokens":
            with safe_open(info.file, framework="pt") as f:
                tensors[key] = f.get_tensor(key).float()
    last = json.loads((exports[-1] / "adapter" / "adapter_config.json").read_text())
    last_scale = last["lora_alpha"] / last["r"]
    factors: dict[str, list[torch.Tensor]] = {}
    for export in exports:
        adapter = json.loads((export / "adapter" / "adapter_config.json").read_text())
        scale = adapter["lora_alpha"] / adapter["r"]
        for key, tensor in load_file(export / "adapter" / "adapter_model.safetensors").items():
            # PEFT names: base_model.model.language_model....q_proj.lora_A.weight
            name = key.removeprefix("base_model.model.")
            match = LORA_KEY.fullmatch(name)
            if not match:
                raise ValueError(f"{export}/adapter: a LoRA tensor outside the language model: {key!r}")
            factors.setdefault(name, []).append(tensor.float() * (scale / last_scale if match.group(2) == "B" else 1))
    for name, parts in factors.items():
        tensors[name] = torch.cat(parts, dim=0 if name.endswith("lora_A.weight") else 1)
    tensors = {name: tensor.to(torch.bfloat16).contiguous() for name, tensor in tensors.items()}
    metadata = {"lora_r": str(last["r"]), "lora_alpha": str(last["lora_alpha"]), "format": "pt"}
    atomic_write(target, lambda path: save_file(tensors, path, metadata=metadata))
    return sha256(target)
