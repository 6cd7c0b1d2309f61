"""Training configs: YAML files of a few flat sections, with `section.key=value` overrides from the command line.

model:  {path: CHECKPOINT or null, preset: tiny, tokenizer: FOLDER, dtype: float32}
data:   {train: FILE, dev: FILE, image_root: null, max_length: 512, image_check: verify, augment: true,
         features: null,   # features: a frozen ViT's cached outputs (`openowl data cache-features`)
         mixture: [{path: SHARDS, weight: 1.0, repeat: 1}, ...], shuffle_buffer: 1000, split: train}  # stream.py
policy: stage2            # stage1 | stage2 | stage2-abstractor | full-llm
lora:   {r: 8, alpha: 32, dropout: 0.05, targets: [q_proj, v_proj]}   # for the policy's LoRA parts
optim:  {lr: 2.0e-5, weight_decay: 1.0e-4, betas: [0.9, 0.999], eps: 1.0e-8, warmup_steps: 50,
         schedule: cosine, max_grad_norm: 1.0}
train:  {micro_batch_size: 4, grad_accum: 1, epochs: 3, max_steps: null, bf16: false, ...}

Every value is checked when the config is read, before anything loads: its type (from the dataclass annotations;
an integer is not a float's place, nor `yes`/`no` a string's), its range and, for named choices, its spelling; an
error names the key, the value and what was expected.
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from openowl.constants import DTYPES
from openowl.train.data import FORMATS, IMAGE_CHECKS
from openowl.train.features import check_cacheable
from openowl.train.policy import POLICIES, LoraSettings

SCHEDULES = ("cosine", "linear", "constant")


@dataclass
class ModelSection:
    path: str | None = None  # a checkpoint folder or hub id to start from
    preset: str | None = None  # or a fresh, randomly initialised model of a named shape
    tokenizer: str | None = None  # processor folder when starting from a preset
    dtype: str = "float32"  # the weights' dtype; bf16 compute comes from train.bf16 (autocast)


@dataclass
class MixtureSource:
    path: str  # tar shards (a glob or folder), Parquet, a `datasets` folder or hub id, or a jsonl file
    weight: float = 1.0  # its share of the stream while every source lasts
    repeat: int = 1  # passes over it per epoch: a small source (text-only answers, say) lasts as long as the others


@dataclass
class DataSection:
    train: str = ""  # a jsonl / JSON file (read into memory), or a stream: tar shards, Parquet, a dataset, a hub id
    dev: str | None = None
    image_root: str | None = None
    format: str = "auto"  # auto | upstream | llava | caption
    max_length: int = 512
    image_check: str = "verify"  # verify (headers, fast) | decode (every image in full, slow) | none
    augment: bool = True  # random crops and flips of training images; false: the deterministic eval transform
    features: str | None = None  # a feature cache folder (train/features.py): cached ViT outputs, not pixels
    mixture: tuple[MixtureSource, ...] = ()  # weighted streams, instead of `train` (`openowl.train.stream`)
    shuffle_buffer: int = 1000  # records a stream is shuffled within (beside its shard order)
    split: str = "train"  # the split of a hub dataset


@dataclass
class OptimSection:
    lr: float = 2e-5
    weight_decay: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    warmup_steps: int = 50
    schedule: str = "cosine"  # cosine | linear | constant
    max_grad_norm: float | None = 1.0  # null or 0: no clipping


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
    cfg = _build(TrainConfig, data, "config")
    check_config(cfg)
    return cfg


def _build(cls: type, data: Any, where: str) -> Any:
    if not isinstance(data, dict):
        raise ValueError(f"{where}: expected a mapping, got {data!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {', '.join(unknown)}; known: {', '.join(fields)}")
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for name, value in data.items():
        if dataclasses.is_dataclass(hints[name]):
            kwargs[name] = _build(hints[name], value, f"{where}.{name}")
        else:
            kwargs[name] = _typed(value, hints[name], f"{where}.{name}".removeprefix("config."))
    try:
        return cls(**kwargs)
    except ValueError as err:  # a section's own checks (e.g. LoRA's rank)
        raise ValueError(f"{where.removeprefix('config.')}: {err}") from None


_PLURALS = {bool: "booleans", str: "strings", int: "integers", float: "numbers"}


def _typed(value: Any, hint: Any, key: str) -> Any:
    """`value` as the annotated type `hint` (str, int, float, bool, `X | None`, `tuple[float, float]`,
    `tuple[str, ...]`), or a ValueError naming the key, the value and the type expected."""
    args = typing.get_args(hint)
    if dataclasses.is_dataclass(hint):
        return _build(hint, value, key)
    if isinstance(hint, types.UnionType) and type(None) in args:
        return None if value is None else _typed(value, next(a for a in args if a is not type(None)), key)
    if typing.get_origin(hint) is tuple:
        if isinstance(value, str) and args[-1] is Ellipsis:
            value = [value]  # `lora.targets=q_proj`: one name, not its letters
        if not isinstance(value, list | tuple) or (args[-1] is not Ellipsis and len(value) != len(args)):
            size = "a list of" if args[-1] is Ellipsis else f"a list of {len(args)}"
            raise ValueError(f"{key}: expected {size} {_PLURALS.get(args[0], 'entries')}, got {value!r}")
        return tuple(_typed(v, args[0], f"{key}[{i}]") for i, v in enumerate(value))
    ok = {bool: isinstance(value, bool), str: isinstance(value, str),
          int: isinstance(value, int) and not isinstance(value, bool),
          float: isinstance(value, int | float) and not isinstance(value, bool)}[hint]  # fmt: skip
    if hint is float and isinstance(value, str):
        try:  # YAML reads "3e-5" (no dot) as a string
            return float(value)
        except ValueError:
            pass
    if not ok:
        names = {bool: "true or false", str: "a string", int: "an integer", float: "a number"}
        raise ValueError(f"{key}: expected {names[hint]}, got {value!r}")
    return float(value) if hint is float else value


def check_config(cfg: TrainConfig) -> None:
    """Ranges and named choices, with an error naming the key and the value.

    Raises:
        ValueError: the first value out of its range or not among its choices.
    """
    t, o, d = cfg.train, cfg.optim, cfg.data
    choices = {"policy": (cfg.policy, tuple(POLICIES)), "optim.schedule": (o.schedule, SCHEDULES),
               "data.format": (d.format, FORMATS), "data.image_check": (d.image_check, IMAGE_CHECKS),
               "model.dtype": (cfg.model.dtype, tuple(DTYPES))}  # fmt: skip
    for key, (value, known) in choices.items():
        if value not in known:
            raise ValueError(f"{key}: {value!r} is not one of {', '.join(known)}")
    at_least = {"train.micro_batch_size": (t.micro_batch_size, 1), "train.grad_accum": (t.grad_accum, 1),
                "train.epochs": (t.epochs, 1), "train.max_steps": (t.max_steps, 1), "train.log_every": (t.log_every, 1),
                "train.eval_every": (t.eval_every, 0), "train.save_every": (t.save_every, 0),
                "train.keep_last": (t.keep_last, 0), "train.num_workers": (t.num_workers, 0),
                "data.max_length": (d.max_length, 1), "optim.warmup_steps": (o.warmup_steps, 0),
                "data.shuffle_buffer": (d.shuffle_buffer, 0)}  # fmt: skip
    for key, (value, low) in at_least.items():
        if value is not None and value < low:
            raise ValueError(f"{key}: expected an integer of at least {low}, got {value!r}")
    for key, value in {"optim.lr": o.lr, "optim.eps": o.eps}.items():
        if not value > 0:
            raise ValueError(f"{key}: expected a positive number, got {value!r}")
    for key, value in {"optim.weight_decay": o.weight_decay, "optim.max_grad_norm": o.max_grad_norm or 0}.items():
        if not value >= 0:
            raise ValueError(f"{key}: expected a number of at least 0, got {value!r}")
    if d.mixture and d.train:
        raise ValueError("data.train and data.mixture: set one (a mixture lists every source, with its weight)")
    if not all(m.weight > 0 for m in d.mixture):
        raise ValueError(f"data.mixture: weights must be positive, got {[m.weight for m in d.mixture]}")
    if not all(isinstance(m.repeat, int) and m.repeat >= 1 for m in d.mixture):
        raise ValueError(f"data.mixture: repeat must be a whole number >= 1, got {[m.repeat for m in d.mixture]}")
    if not all(0 <= b < 1 for b in o.betas):
        raise ValueError(f"optim.betas: expected two numbers in [0, 1), got {list(o.betas)}")
    if d.features:
        try:
            check_cacheable(POLICIES[cfg.policy], d.augment)
        except ValueError as err:
            raise ValueError(f"data.features: {err}") from None


def split_resume(resume: str | None, overrides: list[str]) -> tuple[str | None, list[str]]:
    """`openowl train --resume KEY=VALUE ...`: argparse gives `--resume` the override that follows it as its folder.
    A `--resume` value of the form `section.key=value` that is no existing path is an override: it is put back
    first among the overrides (it came before those that follow), and `--resume` means the run's own newest
    checkpoint ("").

    Returns:
        `(resume, overrides)`.
    """
    if resume and re.fullmatch(r"[A-Za-z_][\w.]*=.*", resume, re.DOTALL) and not Path(resume).exists():
        return "", [resume, *overrides]
    return resume, list(overrides)
