"""Training configs: YAML files of a few flat sections, with `section.key=value` overrides from the command line.

model:  {path: CHECKPOINT or null, preset: tiny, tokenizer: FOLDER, dtype: float32}
data:   {train: FILE, dev: FILE, image_root: null, max_length: 512}
policy: stage2            # stage1 | stage2 | stage2-abstractor | full-llm
lora:   {r: 8, alpha: 32, dropout: 0.05, targets: [q_proj, v_proj]}   # for the policy's LoRA parts
optim:  {lr: 2.0e-5, weight_decay: 1.0e-4, betas: [0.9, 0.999], eps: 1.0e-8, warmup_steps: 50,
         schedule: cosine, max_grad_norm: 1.0}
train:  {micro_batch_size: 4, grad_accum: 1, epochs: 3, max_steps: null, bf16: false, ...}
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from openowl.train.policy import LoraSettings


@dataclass
class ModelSection:
    path: str | None = None  # a checkpoint folder or hub id to start from
    preset: str | None = None  # or a fresh, randomly initialised model of a named shape
    tokenizer: str | None = None  # processor folder when starting from a preset
    dtype: str = "float32"  # the weights' dtype; bf16 compute comes from train.bf16 (autocast)


@dataclass
class DataSection:
    train: str = ""
    dev: str | None = None
    image_root: str | None = None
    format: str = "auto"  # auto | upstream | llava | caption
    max_length: int = 512


@dataclass
class OptimSection:
    lr: float = 2e-5
    weight_decay: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    warmup_steps: int = 50
    schedule: str = "cosine"  # cosine | linear | constant
    max_grad_norm: float = 1.0


@dataclass
class TrainSection:
    output_dir: str = "runs/owl"
    micro_batch_size: int = 4
    grad_accum: int = 1
    epochs: int = 1
    max_steps: int | None = None  # optimizer steps; default: whole epochs
    bf16: bool = False  # autocast matmuls to bfloat16
    gradient_checkpointing: bool = False
    compile: bool = False  # torch.compile each layer (`recipe.compile_layers`); one process or DDP
    seed: int = 0
    log_every: int = 1
    eval_every: int = 0  # 0 = only at the end
    save_every: int = 0  # 0 = only at the end
    keep_last: int = 3
    num_workers: int = 0


@dataclass
class TrainConfig:
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    policy: str = "stage2"
    lora: LoraSettings = field(default_factory=LoraSettings)  # the policy's LoRA layers
    optim: OptimSection = field(default_factory=OptimSection)
    train: TrainSection = field(default_factory=TrainSection)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def load_config(path: str | Path | None, overrides: list[str] = ()) -> TrainConfig:
    """Read a YAML config and apply `section.key=value` overrides (values parsed as YAML: `3`, `1e-4`, `null`).

    Raises:
        ValueError: an unknown section or key, a malformed override, or a value of the wrong kind.
    """
    data: dict[str, Any] = {}
    if path is not None:
        loaded = yaml.safe_load(Path(path).read_text()) or {}
        if not isinstance(loaded, dict):
            raise ValueError(f"{path}: expected a mapping of sections")
        data = loaded
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ValueError(f"override {item!r} is not of the form section.key=value")
        *parents, leaf = key.split(".")
        node = data
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ValueError(f"override {item!r}: {part!r} is not a section")
        node[leaf] = yaml.safe_load(raw)
    return _build(TrainConfig, data, "config")


def _build(cls: type, data: Any, where: str) -> Any:
    if not isinstance(data, dict):
        raise ValueError(f"{where}: expected a mapping, got {data!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {', '.join(unknown)}; known: {', '.join(fields)}")
    kwargs = {}
    for name, value in data.items():
        default = getattr(cls(), name) if name in fields else None
        if dataclasses.is_dataclass(default):
            kwargs[name] = _build(type(default), value, f"{where}.{name}")
        elif isinstance(default, tuple) and all(isinstance(v, float) for v in default):
            kwargs[name] = tuple(float(v) for v in value)
        elif isinstance(default, float) and isinstance(value, str | int) and not isinstance(value, bool):
            try:  # YAML reads "3e-5" (no dot) as a string
                kwargs[name] = float(value)
            except ValueError:
                raise ValueError(f"{where}.{name}: expected a number, got {value!r}") from None
        else:
            kwargs[name] = value
    return cls(**kwargs)
