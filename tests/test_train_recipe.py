"""The training recipe on the parity fixture: configs, a whole run, atomic checkpoints, exact resume after SIGKILL,
export, and two processes (gloo) matching one."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import CHECKPOINT, IMAGES
from safetensors.torch import load_file

from openowl import OwlForConditionalGeneration
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


def test_incomplete_checkpoints_are_never_used(tmp_path):
    (tmp_path / ".tmp-step-000009").mkdir()
    (tmp_path / "step-000004").mkdir()
    assert [p.name for p in checkpoints(tmp_path)] == ["step-000004"]


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
    read = lambda run: [json.loads(x)["loss"] for x in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]  # noqa: E731
    torch.testing.assert_close(torch.tensor(read("two")), torch.tensor(read("one")), rtol=1e-5, atol=1e-6)


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


def test_fsdp_two_processes_match_one(tmp_path):
    """FSDP2 (accelerate, two CPU processes) takes the same steps and ends with the same weights as one process."""
    common = {"train.max_steps": 3, "train.grad_accum": 1, "policy": "full-llm", "optim.warmup_steps": 0}
    one = _config(tmp_path, **common, **{"train.micro_batch_size": 2, "train.output_dir": str(tmp_path / "one")})
    assert _train_cli(one).wait(timeout=600) == 0
    sharded = [a.replace("train.micro_batch_size=2", "train.micro_batch_size=1") for a in one]
    sharded = [a.replace(str(tmp_path / "one"), str(tmp_path / "fsdp")) for a in sharded]
    config = ROOT / "configs" / "accelerate" / "fsdp_cpu_2proc.yaml"
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config),
                "-m", "openowl", "train", *sharded]  # fmt: skip
    env = {**os.environ, "TQDM_DISABLE": "1", "OMP_NUM_THREADS": "1"}
    subprocess.run(launcher, env=env, cwd=ROOT, check=True, timeout=600)
    read = lambda run: [json.loads(x)["loss"] for x in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]  # noqa: E731
    torch.testing.assert_close(torch.tensor(read("fsdp")), torch.tensor(read("one")), rtol=1e-5, atol=1e-6)
    final = {run: load_file(checkpoints(tmp_path / run)[-1] / "trainable.safetensors") for run in ("one", "fsdp")}
    assert final["one"].keys() == final["fsdp"].keys()
    for key, value in final["one"].items():
        torch.testing.assert_close(final["fsdp"][key], value, rtol=0, atol=1e-5)
