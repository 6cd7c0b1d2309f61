"""Proof that the recipes learn: a tiny owl from random weights, stage 1 on captions of coloured shapes, stage 2 on
questions about them, then held-out images answered well above chance."""

from __future__ import annotations

import json
import random
from pathlib import Path

import torch
from conftest import CHECKPOINT
from PIL import Image, ImageDraw

from openowl import OwlForConditionalGeneration, OwlProcessor
from openowl.infer.engine import Engine, Request
from openowl.infer.sampling import SamplingParams
from openowl.prompts import DEFAULT_SYSTEM
from openowl.train.config import load_config
from openowl.train.recipe import TrainRecipe

COLOURS = {"red": (220, 30, 30), "green": (30, 180, 30), "blue": (30, 60, 220)}
QUESTION = "What colour is the shape?"


def _shapes(folder: Path, n_train: int = 200, n_test: int = 45) -> tuple[Path, Path, list[tuple[Path, str]]]:
    """Squares and circles of three colours at random places and sizes, 56×56 (the tiny preset's resolution)."""
    rng = random.Random(0)
    folder.mkdir(parents=True, exist_ok=True)
    captions, questions, test = [], [], []
    for i in range(n_train + n_test):
        colour, shape = rng.choice(sorted(COLOURS)), rng.choice(["square", "circle"])
        image = Image.new("RGB", (56, 56), "white")
        side = rng.randint(18, 34)
        x, y = rng.randint(2, 54 - side), rng.randint(2, 54 - side)
        draw = ImageDraw.Draw(image)
        (draw.rectangle if shape == "square" else draw.ellipse)([x, y, x + side, y + side], fill=COLOURS[colour])
        path = folder / f"{i}.png"
        image.save(path)
        if i < n_train:
            captions.append({"image": path.name, "caption": f"a {colour} {shape}"})
            text = f"{DEFAULT_SYSTEM}\nHuman: <image>\nHuman: {QUESTION}\nAI: {colour}"
            questions.append({"text": text, "image": [path.name]})
        else:
            test.append((path, colour))
    for name, rows in (("captions.jsonl", captions), ("questions.jsonl", questions)):
        (folder / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder / "captions.jsonl", folder / "questions.jsonl", test


def _run(overrides: list[str]) -> list[float]:
    cfg = load_config(None, overrides)
    recipe = TrainRecipe(cfg)
    recipe.setup()
    recipe.train()
    recipe.export(Path(cfg.train.output_dir) / "final")
    rows = (Path(cfg.train.output_dir) / "metrics.jsonl").read_text().splitlines()
    return [json.loads(r)["loss"] for r in rows if "loss" in json.loads(r)]


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


def test_two_stages_learn_coloured_shapes(tmp_path):
    captions, questions, test = _shapes(tmp_path / "data")
    common = ["optim.warmup_steps=5", "train.micro_batch_size=16", "data.max_length=128", "train.seed=0"]
    stage1 = _run([
        "model.preset=tiny", f"model.tokenizer={CHECKPOINT}", f"data.train={captions}", "data.format=caption",
        "policy=stage1", "optim.lr=2e-3", "train.max_steps=40", f"train.output_dir={tmp_path / 's1'}", *common,
    ])  # fmt: skip
    stage2 = _run([
        f"model.path={tmp_path / 's1' / 'final'}", f"data.train={questions}", "policy=stage2-abstractor",
        "optim.lr=5e-3", "train.max_steps=60", f"train.output_dir={tmp_path / 's2'}", *common,
    ])  # fmt: skip
    assert _mean(stage1[-5:]) < _mean(stage1[:5]) - 0.1
    assert _mean(stage2[-5:]) < _mean(stage2[:5]) - 0.3

    folder = tmp_path / "s2" / "final"
    engine = Engine(OwlForConditionalGeneration.from_pretrained(folder), OwlProcessor.from_pretrained(folder))
    prompt = engine.processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]}]
    )
    answers = engine.generate([Request(prompt, [path]) for path, _ in test], SamplingParams(max_new_tokens=3))
    accuracy = _mean([float(a.text.strip().startswith(colour)) for a, (_, colour) in zip(answers, test, strict=True)])
    assert accuracy >= 0.6, accuracy  # chance is 1/3
    assert torch.isfinite(torch.tensor(stage1 + stage2)).all()
