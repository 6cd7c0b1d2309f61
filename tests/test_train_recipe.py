"""The training recipe on the parity fixture: configs, a whole run, atomic checkpoints, exact resume after SIGKILL,
export, and two processes (gloo: DDP, DeepSpeed ZeRO-2/3) matching one."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from conftest import CHECKPOINT, IMAGES
from safetensors.torch import load_file
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from openowl import OwlForConditionalGeneration, OwlProcessor
from openowl.model.abstractor import AbstractorAttention
from openowl.train.config import TrainConfig, load_config
from openowl.train.recipe import TrainRecipe, checkpoints

ROOT = Path(__file__).resolve().parents[1]


def _write_data(folder: Path, n: int = 16) -> Path:
    """Upstream-format jsonl: conversations with 0 or 1 image, different lengths."""
    system = "The following is a conversation between a curious human and AI assistant."
    lines = []
    for i in range(n):
        image = IMAGES / f"image{i % 3}.jpg"
        question = "What is in the picture?" + " Please be precise." * (i % 4)
        if i % 4 == 3:  # text-only samples mixed in
            lines.append({"text": f"{system}\nHuman: Name a bird.\nAI: An owl number {i}.", "task_type": "llava_sft"})
        else:
            text = f"{system}\nHuman: <image>\nHuman: {question}\nAI: A photo, number {i}."
            lines.append({"text": text, "image": [str(image)], "task_type": "llava_sft"})
    path = folder / "train.jsonl"
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    return path


def _config(tmp_path: Path, **train) -> list[str]:
    data = _write_data(tmp_path)
    settings = {
        "model.path": str(CHECKPOINT), "data.train": str(data), "data.max_length": 160, "policy": "stage2",
        "optim.lr": 1e-3, "optim.warmup_steps": 2, "train.micro_batch_size": 2, "train.grad_accum": 2,
        "train.epochs": 1, "train.output_dir": str(tmp_path / "run"), "train.seed": 3,
    }  # fmt: skip
    settings.update(train)
    return [f"{k}={v}" for k, v in settings.items()]


def test_config_overrides_and_errors(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("policy: stage1\noptim:\n  lr: 1.0e-4\n  betas: [0.9, 0.98]\ntrain:\n  epochs: 2\n")
    cfg = load_config(path, ["train.epochs=5", "optim.lr=3e-5", "data.dev=null", "model.preset=tiny"])
    assert isinstance(cfg, TrainConfig)
    assert cfg.policy == "stage1" and cfg.train.epochs == 5 and cfg.optim.lr == 3e-5
    assert cfg.optim.betas == (0.9, 0.98) and cfg.data.dev is None and cfg.model.preset == "tiny"
    with pytest.raises(ValueError, match="unknown key"):
        load_config(path, ["train.epoch=5"])
    with pytest.raises(ValueError, match="section.key=value"):
        load_config(path, ["train.epochs"])
    for shipped in sorted((ROOT / "configs").rglob("*.yaml")):
        if shipped.parent.name != "accelerate":
            load_config(shipped)  # every shipped recipe config parses


def test_the_lora_section_sets_the_policys_lora_layers(tmp_path):
    cfg = load_config(None, _config(tmp_path, **{"lora.r": 4, "lora.alpha": 8, "lora.targets": "[o_proj,down_proj]"}))
    recipe = TrainRecipe(cfg)
    recipe.setup()
    assert recipe.policy.lora.r == 4 and recipe.policy.lora.alpha == 8
    adapted = {name.split(".lora_")[0].rsplit(".", 1)[-1] for name in recipe.trainable}
    assert adapted == {"o_proj", "down_proj"}
    assert all(p.shape[0] == 4 for name, p in recipe.trainable.items() if ".lora_A." in name)


def test_a_whole_run_logs_checkpoints_and_exports(tmp_path):
    cfg = load_config(None, _config(tmp_path, **{"train.save_every": 2, "train.keep_last": 2}))
    recipe = TrainRecipe(cfg)
    recipe.setup()
    metrics = recipe.train()
    out = Path(cfg.train.output_dir)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if "loss" in r]
    assert len(losses) == recipe.total_steps and all(map(torch.isfinite, torch.tensor(losses)))
    assert metrics["step"] == recipe.total_steps
    assert (out / "loss.png").is_file()
    logged = EventAccumulator(str(out / "tensorboard")).Reload()  # the same losses, in TensorBoard's event files
    assert [e.step for e in logged.Scalars("loss")] == [r["step"] for r in rows if "loss" in r]
    assert [e.value for e in logged.Scalars("loss")] == pytest.approx(losses)  # stored as float32
    assert {"loss", "lr", "tokens_per_s"} <= set(logged.Tags()["scalars"])
    kept = checkpoints(out)
    assert len(kept) == 2 and kept[-1].name == f"step-{recipe.total_steps:06d}"  # the last N, the final one included
    assert sorted(p.name for p in kept[-1].iterdir()) == sorted(
        ["trainable.safetensors", "optimizer.pt", "scheduler.pt", "rng.json", "rng.safetensors", "state.json"]
    )
    folder = recipe.export(tmp_path / "final")
    merged = OwlForConditionalGeneration.from_pretrained(folder)
    base = OwlForConditionalGeneration.from_pretrained(CHECKPOINT)
    assert merged.state_dict().keys() == base.state_dict().keys()  # the released layout, LoRA merged
    changed = [k for k, v in merged.state_dict().items() if not torch.equal(v, base.state_dict()[k])]
    assert changed and all(k.endswith(("q_proj.weight", "v_proj.weight")) for k in changed)


def test_bf16_training_keeps_frozen_linears_in_bf16_and_exports_in_the_models_dtype(tmp_path):
    """With weights bf16 holds exactly (like the released checkpoints), bf16 training keeps the frozen Linears in
    bf16; the export is all float32 again, LoRA merged into the float32 weights."""
    rounded = tmp_path / "bf16-valued"
    model = OwlForConditionalGeneration.from_pretrained(CHECKPOINT).to(torch.bfloat16).float()
    model.save_pretrained(rounded)
    OwlProcessor.from_pretrained(CHECKPOINT).save_pretrained(rounded)
    args = _config(tmp_path, **{"model.path": str(rounded), "train.bf16": True, "train.max_steps": 2})
    recipe = TrainRecipe(load_config(None, args))
    recipe.setup()
    q_proj = recipe.accelerator.unwrap_model(recipe.model).language_model.model.layers[0].self_attn.q_proj
    assert q_proj.base_layer.weight.dtype == torch.bfloat16 and q_proj.lora_A["default"].weight.dtype == torch.float32
    recipe.train()
    folder = recipe.export(tmp_path / "final")
    stored = {}
    for file in folder.glob("*.safetensors"):
        stored.update(load_file(file))
    assert {value.dtype for value in stored.values()} == {torch.float32}  # as written, not cast by the loader
    merged = OwlForConditionalGeneration.from_pretrained(folder).state_dict()
    base = model.state_dict()
    changed = [k for k, v in merged.items() if not torch.equal(v, base[k])]
    assert changed and all(k.endswith(("q_proj.weight", "v_proj.weight")) for k in changed)


@pytest.mark.parametrize("checkpointing", [False, True])
def test_compiled_layers_train_like_eager_ones(tmp_path, checkpointing):
    """`train.compile` compiles every layer of the three stacks and gives the eager run's gradients and losses: the
    abstractor trained in full, LoRA on the LLM, the ViT frozen in front; batches of several lengths, some
    text-only; with and without gradient checkpointing."""
    from torch._dynamo.utils import counters

    from openowl.train.recipe import _checkpointing_compiles

    if checkpointing and not _checkpointing_compiles():  # transformers < 5.20: refused, nothing would compile
        args = _config(tmp_path, **{"train.compile": True, "train.gradient_checkpointing": True})
        with pytest.raises(ValueError, match="needs transformers 5.20"):
            TrainRecipe(load_config(None, args)).setup()
        return
    runs = {}
    for compiled in (False, True):
        settings = {"policy": "stage2-abstractor", "lora.dropout": 0.0, "train.max_steps": 3, "train.save_every": 0,
                    "train.compile": compiled, "train.gradient_checkpointing": checkpointing,
                    "train.output_dir": str(tmp_path / f"run-{compiled}")}  # fmt: skip
        (tmp_path / str(compiled)).mkdir()
        recipe = TrainRecipe(load_config(None, _config(tmp_path / str(compiled), **settings)))
        torch._dynamo.reset()  # code compiled by an earlier test would be reused, and no graph counted here
        counters.clear()
        recipe.setup()
        for module in recipe.model.modules():
            if isinstance(module, AbstractorAttention):
                module.dropout = 0.0  # the same random draws can't be asked of the compiled code
        recipe._loss_sum(next(recipe._batches())).backward()
        grads = {name: param.grad.clone() for name, param in recipe.trainable.items()}
        recipe.optimizer.zero_grad(set_to_none=True)
        recipe.batch_in_epoch = 0  # train from the first batch again
        recipe.train()
        model = recipe.accelerator.unwrap_model(recipe.model)
        layers = [*model.vision_model.encoder.layers, *model.abstractor.encoder.layers,
                  *model.language_model.model.layers]  # fmt: skip
        assert all((layer._compiled_call_impl is not None) == compiled for layer in layers)
        assert (counters["stats"]["unique_graphs"] > 0) == compiled  # dynamo really captured graphs
        runs[compiled] = grads, _losses(Path(recipe.cfg.train.output_dir))
    (eager_grads, eager_losses), (grads, losses) = runs[False], runs[True]
    assert grads.keys() == eager_grads.keys()  # the same parameter names: checkpoints don't change
    for name, grad in grads.items():  # float32 rounding, measured at 5e-7 of each tensor's largest value
        scale = eager_grads[name].abs().max().item()  # about 0 for a key bias: softmax ignores a shift
        torch.testing.assert_close(grad, eager_grads[name], rtol=0, atol=1e-5 * scale + 1e-8, msg=name)
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(eager_losses), rtol=1e-4, atol=0)


def test_compile_is_refused_with_sharding(tmp_path, monkeypatch):
    from accelerate.state import AcceleratorState

    deepspeed = {"ACCELERATE_USE_DEEPSPEED": "true", "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1",
                 "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29561"}  # a one-process DeepSpeed launch  # fmt: skip
    for key, value in deepspeed.items():
        monkeypatch.setenv(key, value)
    AcceleratorState._reset_state(reset_partial_state=True)  # accelerate keeps one state per process
    recipe = TrainRecipe(load_config(None, _config(tmp_path, **{"train.compile": True})))
    try:
        with pytest.raises(ValueError, match="train.compile works in one process or under DDP"):
            recipe.setup()
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def test_incomplete_checkpoints_are_never_used(tmp_path):
    (tmp_path / ".tmp-step-000009").mkdir()
    (tmp_path / "step-000004").mkdir()
    assert [p.name for p in checkpoints(tmp_path)] == ["step-000004"]


def _losses(run: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]


def _train_cli(args: list[str], **popen) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "TQDM_DISABLE": "1"}
    return subprocess.Popen([sys.executable, "-m", "openowl", "train", *args], env=env, cwd=ROOT, **popen)


def test_sigkill_then_resume_is_bit_identical(tmp_path):
    """Kill -9 a run after a checkpoint, resume it, and end with exactly the weights of an uninterrupted run."""
    steps = {"train.max_steps": 24, "train.save_every": 2, "train.keep_last": 2, "train.grad_accum": 1}
    (tmp_path / "a").mkdir()
    whole = _config(tmp_path / "a", **steps, **{"train.output_dir": str(tmp_path / "whole")})
    assert _train_cli(whole).wait(timeout=600) == 0

    (tmp_path / "b").mkdir()
    out = tmp_path / "killed"
    interrupted = _config(tmp_path / "b", **steps, **{"train.output_dir": str(out)})
    proc = _train_cli(interrupted)
    deadline = time.time() + 300
    while not any(int(p.name[5:]) >= 6 for p in checkpoints(out)) and time.time() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait(timeout=60) == -signal.SIGKILL  # it was really killed mid-run
    last = checkpoints(out)[-1]
    assert int(last.name[5:]) < 24
    assert _train_cli([*interrupted, "--resume"]).wait(timeout=600) == 0

    final_whole = load_file(checkpoints(tmp_path / "whole")[-1] / "trainable.safetensors")
    final_resumed = load_file(checkpoints(out)[-1] / "trainable.safetensors")
    assert final_whole.keys() == final_resumed.keys()
    for key in final_whole:
        assert torch.equal(final_whole[key], final_resumed[key]), key


def test_two_processes_match_one(tmp_path):
    """Two gloo processes with micro-batch 1 take the same steps as one process with micro-batch 2 (full-LLM
    training: no dropout in the trained part, so the split of a batch can't change the random draws)."""
    common = {"train.max_steps": 4, "train.grad_accum": 1, "train.save_every": 0, "policy": "full-llm"}
    one = _config(tmp_path, **common, **{"train.micro_batch_size": 2, "train.output_dir": str(tmp_path / "one")})
    assert _train_cli(one).wait(timeout=600) == 0
    two = [a.replace("train.micro_batch_size=2", "train.micro_batch_size=1") for a in one]
    two = [a.replace(str(tmp_path / "one"), str(tmp_path / "two")) for a in two]
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", "29533",
                "-m", "openowl", "train", *two]  # fmt: skip
    env = {**os.environ, "TQDM_DISABLE": "1", "OMP_NUM_THREADS": "1"}
    subprocess.run(launcher, env=env, cwd=ROOT, check=True, timeout=600)
    torch.testing.assert_close(
        torch.tensor(_losses(tmp_path / "two")), torch.tensor(_losses(tmp_path / "one")), rtol=1e-5, atol=1e-6
    )


def test_two_processes_with_image_and_text_only_halves_do_not_hang(tmp_path):
    """Stage 1 (vision + abstractor trained) when one process gets an image sample and the other a text-only one:
    the text-only side runs the visual parts on a dummy image, so both reduce the same gradients."""
    system = "The following is a conversation between a curious human and AI assistant."
    rows = [
        {"text": f"{system}\nHuman: <image>\nAI: A photo.", "image": [str(IMAGES / "image0.jpg")]},
        {"text": f"{system}\nHuman: Name a bird.\nAI: An owl."},
    ]
    data = tmp_path / "mixed.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    args = [f"model.path={CHECKPOINT}", f"data.train={data}", "policy=stage1", "train.micro_batch_size=1",
            "train.max_steps=3", f"train.output_dir={tmp_path / 'run'}", "optim.warmup_steps=0"]  # fmt: skip
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", "29534",
                "-m", "openowl", "train", *args]  # fmt: skip
    env = {**os.environ, "TQDM_DISABLE": "1", "OMP_NUM_THREADS": "1"}
    subprocess.run(launcher, env=env, cwd=ROOT, check=True, timeout=300)
    losses = [json.loads(x)["loss"] for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == 3 and all(map(torch.isfinite, torch.tensor(losses)))


def _deepspeed_launch(tmp_path: Path, stage: int, args: list[str], port: int) -> None:
    """`accelerate launch` with the shipped ZeRO config, turned into two CPU processes in full precision."""
    config = yaml.safe_load((ROOT / "configs" / "accelerate" / f"deepspeed_zero{stage}.yaml").read_text())
    config.update(num_processes=2, mixed_precision="no", main_process_ip="127.0.0.1", main_process_port=port)
    path = tmp_path / f"zero{stage}.yaml"
    path.write_text(yaml.safe_dump(config))
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(path),
                "-m", "openowl", "train", *args]  # fmt: skip
    env = {**os.environ, "TQDM_DISABLE": "1", "OMP_NUM_THREADS": "1"}
    subprocess.run(launcher, env=env, cwd=ROOT, check=True, timeout=600)


@pytest.mark.parametrize("stage", [2, 3])
def test_deepspeed_two_processes_match_one(tmp_path, stage):
    """DeepSpeed ZeRO-2 / ZeRO-3 (two CPU processes, gradient accumulation) take the same steps as one process;
    the checkpoint holds whole weights (ZeRO-3 shards them) and the export loads."""
    common = {"train.max_steps": 3, "train.grad_accum": 2, "policy": "full-llm", "optim.warmup_steps": 0}
    one = _config(tmp_path, **common, **{"train.micro_batch_size": 2, "train.output_dir": str(tmp_path / "one")})
    assert _train_cli(one).wait(timeout=600) == 0
    sharded = [a.replace("train.micro_batch_size=2", "train.micro_batch_size=1") for a in one]
    sharded = [a.replace(str(tmp_path / "one"), str(tmp_path / "zero")) for a in sharded]
    _deepspeed_launch(tmp_path, stage, sharded, port=29550 + stage)
    torch.testing.assert_close(
        torch.tensor(_losses(tmp_path / "zero")), torch.tensor(_losses(tmp_path / "one")), rtol=1e-5, atol=1e-6
    )
    last = checkpoints(tmp_path / "zero")[-1]
    assert (last / "deepspeed").is_dir() and not (last / "optimizer.pt").exists()  # the optimizer state is sharded
    final = {run: load_file(checkpoints(tmp_path / run)[-1] / "trainable.safetensors") for run in ("one", "zero")}
    assert final["one"].keys() == final["zero"].keys()
    for key, value in final["one"].items():
        torch.testing.assert_close(final["zero"][key], value, rtol=0, atol=1e-5)
    exported = OwlForConditionalGeneration.from_pretrained(tmp_path / "zero" / "final").state_dict()
    for key, value in OwlForConditionalGeneration.from_pretrained(tmp_path / "one" / "final").state_dict().items():
        torch.testing.assert_close(exported[key], value, rtol=0, atol=1e-5)


def test_deepspeed_zero3_resume_is_bit_identical(tmp_path):
    """ZeRO-3 with LoRA dropout: resuming from the step-2 checkpoint (each process's optimizer shard and RNG)
    ends with exactly the weights of the uninterrupted run."""
    steps = {"train.max_steps": 4, "train.save_every": 2, "train.keep_last": 2, "train.micro_batch_size": 1}
    whole = _config(tmp_path, **steps, **{"train.output_dir": str(tmp_path / "whole")})
    _deepspeed_launch(tmp_path, 3, whole, port=29556)
    shutil.copytree(tmp_path / "whole" / "step-000002", tmp_path / "resumed" / "step-000002")
    resumed = [a.replace(str(tmp_path / "whole"), str(tmp_path / "resumed")) for a in whole]
    _deepspeed_launch(tmp_path, 3, [*resumed, "--resume"], port=29557)
    assert _losses(tmp_path / "resumed") == _losses(tmp_path / "whole")[2:]
    final = {run: load_file(tmp_path / run / "step-000004" / "trainable.safetensors") for run in ("whole", "resumed")}
    assert final["whole"].keys() == final["resumed"].keys() and any(".lora_A." in k for k in final["whole"])
    for key, value in final["whole"].items():
        assert torch.equal(final["resumed"][key], value), key
    merged = OwlForConditionalGeneration.from_pretrained(tmp_path / "whole" / "final").state_dict()
    base = OwlForConditionalGeneration.from_pretrained(CHECKPOINT).state_dict()
    changed = [k for k, v in merged.items() if not torch.equal(v, base[k])]
    assert changed and all(k.endswith(("q_proj.weight", "v_proj.weight")) for k in changed)  # LoRA merged


def test_fsdp2_checkpoints_hold_whole_weights_and_resume_exactly(tmp_path):
    """The checkpoint helpers under FSDP2 (torch's `fully_shard` over two CPU processes; accelerate itself runs
    FSDP only on GPUs): whole weights and a whole optimizer state are saved, and a sharded model restored from
    them takes exactly the steps the original takes."""
    worker = Path(__file__).parent / "fsdp_checkpoint_worker.py"
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", "29538",
                str(worker), str(tmp_path)]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parent)}
    subprocess.run(launcher, env=env, cwd=ROOT, check=True, timeout=300)
    saved = load_file(tmp_path / "trainable.safetensors")
    base = OwlForConditionalGeneration.from_pretrained(CHECKPOINT).state_dict()
    assert saved.keys() == {k for k in base if k.startswith("language_model.")}
    assert all(saved[k].shape == base[k].shape for k in saved)  # whole weights, not one process's shard
    uninterrupted, resumed = (
        load_file(tmp_path / "uninterrupted.safetensors"),
        load_file(tmp_path / "resumed.safetensors"),
    )
    assert uninterrupted.keys() == resumed.keys() == saved.keys()
    for key, value in uninterrupted.items():
        assert torch.equal(resumed[key], value), key
    assert any(not torch.equal(uninterrupted[k], saved[k]) for k in saved)  # the last two steps did train


# --- issue 22: config values, resume, data problems, accumulation, exports, launch configs ----------------------


def test_config_values_are_checked_before_anything_loads(tmp_path):
    """Each bad value is refused by `load_config` (before a model loads), naming the key, the value and the type."""
    bad = {"train.micro_batch_size=four": "train.micro_batch_size: expected an integer, got 'four'",
           "train.bf16=maybe": "train.bf16: expected true or false, got 'maybe'",
           "train.epochs=1.5": "train.epochs: expected an integer, got 1.5",
           "train.grad_accum=0": "train.grad_accum: expected an integer of at least 1, got 0",
           "optim.lr=fast": "optim.lr: expected a number, got 'fast'", "optim.betas=[0.9]": "optim.betas",
           "lora.targets=[1, 2]": "lora.targets\\[0\\]: expected a string, got 1", "policy=stage3": "policy: 'stage3'",
           "data.image_check=full": "data.image_check: 'full' is not one of verify, decode, none",
           "model.dtype=int8": "model.dtype: 'int8'",
           "data.max_length=null": "data.max_length: expected an integer"}  # fmt: skip
    for override, message in bad.items():
        with pytest.raises(ValueError, match=message):
            load_config(None, [override])
    cfg = load_config(None, ["lora.targets=q_proj", "optim.lr=3e-5", "train.max_steps=null", "data.image_check=none"])
    assert cfg.lora.targets == ("q_proj",)  # one target, not its letters
    assert cfg.optim.lr == 3e-5 and cfg.train.max_steps is None and cfg.data.image_check == "none"


def test_resume_takes_a_following_override_as_an_override(tmp_path):
    from openowl.cli import build_parser
    from openowl.train.config import split_resume

    args = build_parser().parse_args(["train", "--config", "c.yaml", "--resume", "train.epochs=2", "train.seed=1"])
    assert split_resume(args.resume, args.overrides) == ("", ["train.epochs=2", "train.seed=1"])
    args = build_parser().parse_args(["train", "--resume", str(tmp_path), "train.seed=1"])
    assert split_resume(args.resume, args.overrides) == (str(tmp_path), ["train.seed=1"])
    args = build_parser().parse_args(["train", "train.seed=1", "--resume"])
    assert split_resume(args.resume, args.overrides) == ("", ["train.seed=1"])


def test_resume_refuses_other_settings_and_continues_once_logged(tmp_path, capsys, monkeypatch):
    """A checkpoint records the settings it means something under: a resume under others is refused, naming each
    key, before the model loads. A resume under the same ones says so, and re-trained steps are logged once."""
    args = _config(tmp_path, **{"train.max_steps": 4, "train.save_every": 2, "train.keep_last": 3})
    whole = TrainRecipe(load_config(None, args))
    whole.setup()
    whole.train()
    out = Path(whole.cfg.train.output_dir)
    logged = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logged] == [1, 2, 3, 4]
    state = json.loads((out / "step-000002" / "state.json").read_text())
    assert state["settings"]["train.micro_batch_size"] == 2 and state["settings"]["processes"] == 1

    other = {"train.micro_batch_size": 1, "train.epochs": 2, "optim.schedule": "linear", "train.seed": 4}
    refused = TrainRecipe(load_config(None, _config(tmp_path, **{**other, "train.max_steps": 4})))
    monkeypatch.setattr(TrainRecipe, "_load_model", lambda self: pytest.fail("the model loaded"))
    with pytest.raises(ValueError, match="settings differ") as err:
        refused.setup(resume=out / "step-000002")
    for key in other:
        assert f"{key}: checkpoint" in str(err.value)
    monkeypatch.undo()

    capsys.readouterr()
    resumed = TrainRecipe(load_config(None, args))
    resumed.setup(resume=out / "step-000002")
    said = capsys.readouterr().err
    assert f"resuming from {out / 'step-000002'} at step 2 of 4" in said
    resumed.train()
    again = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in again] == [1, 2, 3, 4]  # steps 3 and 4 once, not twice
    assert [r["loss"] for r in again] == [r["loss"] for r in logged]  # and trained again exactly
    tensorboard = EventAccumulator(str(out / "tensorboard")).Reload()
    assert [e.step for e in tensorboard.Scalars("loss")] == [1, 2, 3, 4]


def test_an_image_that_fails_to_load_is_skipped_not_fatal(tmp_path):
    """A truncated JPEG passes the default check ("verify"); the run still ends, with a checkpoint, and names the
    sample in its final metrics. With `data.image_check=decode` it is skipped before training."""
    truncated = tmp_path / "truncated.jpg"
    truncated.write_bytes((IMAGES / "image0.jpg").read_bytes()[:5000])
    (tmp_path / "data").mkdir()
    data = _write_data(tmp_path / "data")
    system = "The following is a conversation between a curious human and AI assistant."
    bad = {"id": "cut-jpeg", "text": f"{system}\nHuman: <image>\nAI: A photo.", "image": [str(truncated)]}
    data.write_text(json.dumps(bad) + "\n" + data.read_text())
    losses = {}
    for check, workers in (("verify", 0), ("verify", 2), ("decode", 0)):  # with workers: noted from their batches
        out = tmp_path / f"run-{check}-{workers}"
        args = _config(tmp_path, **{"data.train": str(data), "train.max_steps": 8, "train.grad_accum": 1,
                                    "data.image_check": check, "train.output_dir": str(out),
                                    "train.num_workers": workers})  # fmt: skip
        recipe = TrainRecipe(load_config(None, args))
        recipe.setup()
        metrics = recipe.train()
        assert checkpoints(out) and metrics["step"] == 8
        assert metrics["data"]["skipped_ids"] == ["cut-jpeg"] and metrics["data"]["samples"] == 17
        assert metrics["data"]["failed_to_load"] == (["cut-jpeg"] if check == "verify" else [])
        assert "cut-jpeg" in recipe.dataset.report()
        losses[check, workers] = _losses(out)
    assert losses["verify", 2] == losses["verify", 0]  # DataLoader workers load the same batches


def test_accumulation_splits_of_one_global_batch_take_the_same_steps(tmp_path):
    """Micro-batch 2 × accumulation 2 and micro-batch 4 × accumulation 1: the sampler groups samples per optimizer
    step, so both see the same global batches and take the same steps (full-LLM training: no dropout)."""
    runs = {}
    for micro, accum in ((2, 2), (4, 1)):
        (tmp_path / str(micro)).mkdir()
        settings = {"policy": "full-llm", "train.max_steps": 3, "optim.warmup_steps": 0,
                    "train.micro_batch_size": micro, "train.grad_accum": accum}  # fmt: skip
        args = _config(tmp_path / str(micro), **settings)
        recipe = TrainRecipe(load_config(None, args))
        recipe.setup()
        recipe.train()
        runs[micro] = (
            _losses(Path(recipe.cfg.train.output_dir)),
            {k: v.detach().clone() for k, v in recipe.trainable.items()},
        )
    torch.testing.assert_close(torch.tensor(runs[2][0]), torch.tensor(runs[4][0]), rtol=1e-5, atol=1e-6)
    for key, value in runs[4][1].items():
        torch.testing.assert_close(runs[2][1][key], value, rtol=0, atol=1e-5, msg=key)


def test_the_loss_plot_has_axes_labels_and_ticks(tmp_path):
    from PIL import Image

    from openowl.train.plot import plot_losses

    rows = [{"step": s, "loss": 3.0 - 0.1 * s} for s in range(1, 11)] + [{"step": 10, "dev_loss": 2.2}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    drawn = plot_losses(tmp_path / "metrics.jsonl", tmp_path / "loss.png")
    assert drawn["x_label"] == "optimizer step" and drawn["y_label"] == "loss" and drawn["title"]
    assert drawn["x_ticks"][0] >= 1 and drawn["x_ticks"][-1] <= 10 and len(drawn["x_ticks"]) >= 3
    assert all(2.0 <= y <= 2.9 for y in drawn["y_ticks"]) and len(drawn["y_ticks"]) >= 3
    image = Image.open(tmp_path / "loss.png")
    assert image.text == {"title": drawn["title"], "x_label": "optimizer step", "y_label": "loss"}
    gray = image.convert("L")
    below_axis = gray.crop((70, 400 - 50 + 2, 620, 400)).getextrema()  # tick labels and the x label
    left_of_axis = gray.crop((0, 40, 70 - 2, 350)).getextrema()  # tick labels and the y label
    assert below_axis[0] < 100 and left_of_axis[0] < 100  # dark text drawn there


@pytest.mark.parametrize("policy", ["stage2", "stage2-abstractor"])
def test_the_adapter_on_its_base_is_the_trained_model(tmp_path, policy):
    """`final/adapter` names its base, and base + adapter gives the trained (merged) model's logits: for
    stage2-abstractor the trained abstractor goes with the LoRA weights (base + LoRA alone was another model)."""
    from openowl.train.export import FULL_WEIGHTS, load_adapter

    recipe = TrainRecipe(load_config(None, _config(tmp_path, **{"policy": policy, "train.max_steps": 2})))
    recipe.setup()
    recipe.train()
    folder = recipe.export(tmp_path / "final")
    config = json.loads((folder / "adapter" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(CHECKPOINT)
    assert (folder / "adapter" / FULL_WEIGHTS).is_file() == (policy == "stage2-abstractor")
    base = OwlForConditionalGeneration.from_pretrained(config["base_model_name_or_path"]).eval()
    adapted = load_adapter(base, folder / "adapter").eval()
    merged = OwlForConditionalGeneration.from_pretrained(folder).eval()
    from openowl.train.data import collate

    batch = collate([recipe.dataset[i] for i in range(4)], recipe.processor.tokenizer.pad_token_id)  # 3 with images
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"],
              "pixel_values": batch["pixel_values"]}  # fmt: skip
    assert inputs["pixel_values"] is not None  # the abstractor takes part
    with torch.no_grad():
        torch.testing.assert_close(adapted(**inputs).logits, merged(**inputs).logits, rtol=0, atol=1e-4)


def test_fsdp_asked_for_on_a_cpu_says_it_runs_ddp(monkeypatch, caplog):
    from accelerate.state import AcceleratorState
    from accelerate.utils import DistributedType

    from openowl.train.distributed import make_accelerator

    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    AcceleratorState._reset_state(reset_partial_state=True)
    try:
        with caplog.at_level("WARNING", logger="openowl.train.distributed"):
            distributed_type = make_accelerator(1).distributed_type
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
    if torch.cuda.is_available():
        pytest.skip("FSDP runs on a GPU")
    assert distributed_type != DistributedType.FSDP
    assert "FSDP was asked for, but accelerate runs FSDP only on GPUs: this run is plain DDP" in caplog.text


def test_the_shipped_cpu_2proc_config_starts_two_processes(tmp_path):
    """`accelerate launch --config_file configs/accelerate/cpu_2proc.yaml` really runs 2 processes: each writes its
    own RNG state, and the checkpoint records 2 processes (a global batch of 2 × the micro-batch)."""
    args = _config(tmp_path, **{"train.max_steps": 2, "train.micro_batch_size": 1, "train.grad_accum": 1})
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                str(ROOT / "configs" / "accelerate" / "cpu_2proc.yaml"), "--main_process_port", "29541",
                "-m", "openowl", "train", *args]  # fmt: skip
    env = {**os.environ, "TQDM_DISABLE": "1", "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    subprocess.run(launcher, env=env, cwd=ROOT, check=True, timeout=600)
    last = checkpoints(tmp_path / "run")[-1]
    assert (last / "rng-0.json").is_file() and (last / "rng-1.json").is_file()
    assert json.loads((last / "state.json").read_text())["settings"]["processes"] == 2
    assert len(_losses(tmp_path / "run")) == 2
