"""The loss curve of a run as a PNG, drawn with PIL from the run's `metrics.jsonl` (no plotting library needed)."""

from __future__ import annotations

import json
from pathlib import Path


def plot_losses(metrics: Path, target: Path, size: tuple[int, int] = (640, 400)) -> None:
    """A loss-curve PNG from the metrics log (training loss, and dev loss points where logged)."""
    from PIL import Image, ImageDraw

    rows = [json.loads(line) for line in metrics.read_text().splitlines()] if metrics.exists() else []
    train = [(r["step"], r["loss"]) for r in rows if "loss" in r]
    dev = [(r["step"], r["dev_loss"]) for r in rows if "dev_loss" in r]
    image = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(image)
    points = train + dev
    if points:
        (x0, x1), (y0, y1) = _span([p[0] for p in points]), _span([p[1] for p in points])
        w, h, m = size[0], size[1], 40

        def xy(step, loss):
            return m + (step - x0) / (x1 - x0) * (w - 2 * m), h - m - (loss - y0) / (y1 - y0) * (h - 2 * m)

        draw.line([(m, m), (m, h - m), (w - m, h - m)], fill="black")
        draw.text((m, 10), f"loss {y0:.3f} .. {y1:.3f}, steps {x0:g} .. {x1:g}", fill="black")
        if len(train) > 1:
            draw.line([xy(*p) for p in train], fill="steelblue", width=2)
        for p in dev:
            x, y = xy(*p)
            draw.ellipse([x - 3, y - 3, x + 3, y + 3], fill="darkorange")
    image.save(target)


def _span(values: list[float]) -> tuple[float, float]:
    low, high = min(values), max(values)
    return (low, high) if high > low else (low - 1, high + 1)
