"""Where the scenes' information is lost between the pixels and the answer (docs/owl-small.md, Scenes):

- `features`: linear probes on the frozen ViT's cached outputs of the training scenes (`openowl data scenes` +
  `openowl data cache-features`): the colour of each patch inside a shape, and each digit of a two-digit number
  (the mean of the patches over its left / right half). Trained on the first 3/4 of the scenes, scored on the rest,
  next to the majority class. High here and low in the model's answers means training, not the ViT, is short.
- `captions CHECKPOINT`: a stage-1 model's captions of held-out scenes (the test fonts, another seed), scored on
  the count, the shapes and colours, and the number.

Usage:
    python benchmarks/scenes_probe.py features --cache cache/scenes --data data/scenes [--scenes 3000]
    python benchmarks/scenes_probe.py captions runs/owl_small/scenes/stage1/final [--scenes 48]

Each ends with one JSON line.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import re
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors import safe_open

from openowl.data import scenes

PATCH, GRID = 14, 16  # the ViT-S/14 at 224 px: 16 x 16 patches after the CLS token


def read_cache(folder: Path) -> dict[str, torch.Tensor]:
    features = {}
    for shard in sorted(folder.glob("features-*.safetensors")):
        with safe_open(str(shard), "pt") as f:
            features.update({key: f.get_tensor(key) for key in f.keys()})  # noqa: SIM118 (safe_open has no items)
    return features


def training_scenes(count: int, seed: int = 0):
    """The first `count` scenes `write_training_data(seed=seed)` drew, in order (the same draws, shade jitter too)."""
    rng, fonts = random.Random(seed), scenes.available_fonts(scenes.TRAIN_FONTS)
    for _ in range(count):
        scene = scenes.random_scene(rng, fonts)
        scenes.draw(scene, rng)
        yield scene


def probe_rows(cache: Path, data: Path, count: int):
    """(patch feature, colour index, scene) for patches whose centre is a shape's colour, and (half-number
    feature, digit, scene) for two-digit numbers."""
    features, palette = read_cache(cache), np.array(list(scenes.COLOURS.values()), dtype=float)
    colours, digits = [], []
    for n, scene in enumerate(training_scenes(count)):
        path = data / "images" / f"{n:06d}.png"
        grid = features[hashlib.sha256(path.read_bytes()).hexdigest()][1:].reshape(GRID, GRID, -1)
        pixels = np.asarray(Image.open(path).convert("RGB"), dtype=float)
        for r in range(GRID):
            for c in range(GRID):
                centre = pixels[r * PATCH + PATCH // 2, c * PATCH + PATCH // 2]
                distance = np.abs(palette - centre).sum(1)
                if distance.min() < 70 and np.abs(centre - np.array(scene.background)).sum() > 30:
                    colours.append((grid[r, c], int(distance.argmin()), n))
        if scene.number is not None and scene.number >= 10:
            left, top, right, bottom = scene.number_box
            mid, rows = (left + right) // 2, range(top // PATCH, min(GRID, bottom // PATCH + 1))
            for digit, cols in ((scene.number // 10, range(left // PATCH, mid // PATCH + 1)),
                                (scene.number % 10, range(mid // PATCH, min(GRID, right // PATCH + 1)))):  # fmt: skip
                digits.append((torch.stack([grid[r, c] for r in rows for c in cols]).mean(0), digit, n))
    return colours, digits


def linear_probe(rows, classes: int, held_out_from: int, steps: int = 300) -> dict:
    x = torch.stack([r[0] for r in rows]).float()
    y, scene = torch.tensor([r[1] for r in rows]), torch.tensor([r[2] for r in rows])
    train, test = scene < held_out_from, scene >= held_out_from
    x = (x - x[train].mean(0)) / (x[train].std(0) + 1e-6)
    torch.manual_seed(0)
    layer = torch.nn.Linear(x.shape[1], classes)
    optimizer = torch.optim.Adam(layer.parameters(), lr=1e-2, weight_decay=1e-4)
    for _ in range(steps):
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(layer(x[train]), y[train]).backward()
        optimizer.step()
    with torch.no_grad():
        right = layer(x).argmax(1) == y
    return {
        "train_n": int(train.sum()),
        "test_n": int(test.sum()),
        "train_acc": round(right[train].float().mean().item(), 3),
        "test_acc": round(right[test].float().mean().item(), 3),
        "majority": round(torch.bincount(y[test]).max().item() / int(test.sum()), 3),
    }


def caption_scores(checkpoint: str, count: int) -> dict:
    from openowl.infer.engine import Engine, Request
    from openowl.infer.sampling import SamplingParams
    from openowl.loading import load_pretrained

    model, processor = load_pretrained(checkpoint)
    rng, fonts = random.Random(123), scenes.available_fonts(scenes.TEST_FONTS)
    drawn = [scenes.random_scene(rng, fonts) for _ in range(count)]
    prompt = processor.apply_chat_template([{"role": "user", "content": [{"type": "image"}]}])
    requests = [Request(prompt, [scenes.draw(s, random.Random(n))]) for n, s in enumerate(drawn)]
    engine = Engine(model.eval(), processor)
    said = [c.text.strip() for c in engine.generate(requests, SamplingParams(max_new_tokens=48))]
    pairs = list(zip(drawn, said, strict=True))
    numbered = [(s, t) for s, t in pairs if s.number is not None]
    return {
        "scenes": count,
        "exact": sum(t == scenes.caption(s) for s, t in pairs) / count,
        "count": sum(t.split(" ")[0] == str(len(s.shapes)) for s, t in pairs) / count,
        "shapes_and_colours": sum(_named(t) == sorted((x.colour, x.kind) for x in s.shapes) for s, t in pairs) / count,
        "number": sum(f"The number {s.number}." in t for s, t in numbered) / max(1, len(numbered)),
        "examples": [[scenes.caption(s), t] for s, t in pairs[:4]],
    }


def _named(caption: str) -> list[tuple[str, str]]:
    return sorted(re.findall(r"a (\w+) (\w+)", caption))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    jobs = parser.add_subparsers(dest="job", required=True)
    features = jobs.add_parser("features")
    features.add_argument("--cache", default="cache/scenes")
    features.add_argument("--data", default="data/scenes")
    features.add_argument("--scenes", type=int, default=3000)
    captions = jobs.add_parser("captions")
    captions.add_argument("checkpoint")
    captions.add_argument("--scenes", type=int, default=48)
    args = parser.parse_args()
    if args.job == "captions":
        print(json.dumps(caption_scores(args.checkpoint, args.scenes)))
        return
    colours, digits = probe_rows(Path(args.cache), Path(args.data), args.scenes)
    held_out = args.scenes * 3 // 4
    print(json.dumps({"patch_colour": linear_probe(colours, len(scenes.COLOURS), held_out),
                      "digit": linear_probe(digits, 10, held_out)}))  # fmt: skip


if __name__ == "__main__":
    main()
