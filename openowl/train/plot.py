"""The loss curve of a run as a PNG, drawn with PIL from the run's `metrics.jsonl` (no plotting library needed):
axes with ticks and labels (optimizer step, loss), a title and a legend."""

from __future__ import annotations

import json
import math
from pathlib import Path

X_LABEL, Y_LABEL, TITLE = "optimizer step", "loss", "training loss"
MARGINS = (70, 40, 20, 50)  # left, top, right, bottom (pixels)


def plot_losses(metrics: Path, target: Path, size: tuple[int, int] = (640, 400)) -> dict:
    """A loss-curve PNG from the metrics log (training loss, and dev loss points where logged).

    Returns:
        What was drawn: `title`, `x_label`, `y_label`, `x_ticks` and `y_ticks` (the values labelled on each axis)
        and `series` (name -> its points). The PNG carries the same labels as text chunks (`Image.open(...).text`).
    """
    from PIL import Image, ImageDraw
    from PIL.PngImagePlugin import PngInfo

    rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()] if metrics.exists() else []
    series = {"train": [(r["step"], r["loss"]) for r in rows if "loss" in r],
              "dev": [(r["step"], r["dev_loss"]) for r in rows if "dev_loss" in r]}  # fmt: skip
    points = series["train"] + series["dev"]
    image = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(image)
    drawn = {"title": TITLE, "x_label": X_LABEL, "y_label": Y_LABEL, "x_ticks": [], "y_ticks": [], "series": series}
    if points:
        (x0, x1), (y0, y1) = _span([p[0] for p in points]), _span([p[1] for p in points])
        drawn["x_ticks"], drawn["y_ticks"] = _ticks(x0, x1, whole=True), _ticks(y0, y1)
        _draw_axes(image, draw, drawn, (x0, x1, y0, y1))
        xy = _mapping(size, (x0, x1, y0, y1))
        if len(series["train"]) > 1:
            draw.line([xy(*p) for p in series["train"]], fill="steelblue", width=2)
        for p in series["dev"]:
            x, y = xy(*p)
            draw.ellipse([x - 3, y - 3, x + 3, y + 3], fill="darkorange")
        _legend(draw, size, bool(series["dev"]))
    info = PngInfo()
    for key in ("title", "x_label", "y_label"):
        info.add_text(key, drawn[key])
    image.save(target, pnginfo=info)
    return drawn


def _mapping(size: tuple[int, int], span: tuple[float, float, float, float]):
    """(step, loss) -> pixel coordinates inside the margins."""
    (w, h), (left, top, right, bottom), (x0, x1, y0, y1) = size, MARGINS, span

    def xy(step: float, loss: float) -> tuple[float, float]:
        return (left + (step - x0) / (x1 - x0) * (w - left - right),
                h - bottom - (loss - y0) / (y1 - y0) * (h - top - bottom))  # fmt: skip

    return xy


def _draw_axes(image, draw, drawn: dict, span: tuple[float, float, float, float]) -> None:
    """The two axes with their ticks and tick labels, the axis labels (the y label turned upright) and the title."""
    from PIL import Image, ImageDraw

    (w, h), (left, top, right, bottom) = image.size, MARGINS
    xy = _mapping(image.size, span)
    draw.line([(left, top), (left, h - bottom), (w - right, h - bottom)], fill="black")
    for value in drawn["x_ticks"]:
        x, _ = xy(value, span[2])
        draw.line([(x, h - bottom), (x, h - bottom + 5)], fill="black")
        draw.text((x, h - bottom + 8), f"{value:g}", fill="black", anchor="mt")
    for value in drawn["y_ticks"]:
        _, y = xy(span[0], value)
        draw.line([(left - 5, y), (left, y)], fill="black")
        draw.text((left - 8, y), f"{value:.4g}", fill="black", anchor="rm")
    draw.text(((left + w - right) / 2, h - 12), drawn["x_label"], fill="black", anchor="mm")
    draw.text(((left + w - right) / 2, 14), drawn["title"], fill="black", anchor="mm")
    label = Image.new("RGB", (80, 14), "white")
    ImageDraw.Draw(label).text((40, 7), drawn["y_label"], fill="black", anchor="mm")
    rotated = label.rotate(90, expand=True)
    image.paste(rotated, (4, (top + h - bottom) // 2 - rotated.height // 2))


def _legend(draw, size: tuple[int, int], dev: bool) -> None:
    x, y = size[0] - MARGINS[2] - 110, MARGINS[1] + 4
    draw.line([(x, y + 6), (x + 20, y + 6)], fill="steelblue", width=2)
    draw.text((x + 26, y), "train loss", fill="black")
    if dev:
        draw.ellipse([x + 7, y + 19, x + 13, y + 25], fill="darkorange")
        draw.text((x + 26, y + 16), "dev loss", fill="black")


def _ticks(low: float, high: float, count: int = 5, whole: bool = False) -> list[float]:
    """About `count` round values (1, 2 or 5 times a power of ten apart) within [low, high]; whole numbers only
    with `whole` (steps)."""
    raw = (high - low) / count
    power = 10 ** math.floor(math.log10(raw))
    step = next(m * power for m in (1, 2, 5, 10) if m * power >= raw)
    step = max(step, 1) if whole else step
    first = math.ceil(low / step) * step
    return [round(first + i * step, 10) for i in range(int((high - first) / step + 1e-9) + 1)]


def _span(values: list[float]) -> tuple[float, float]:
    low, high = min(values), max(values)
    return (low, high) if high > low else (low - 1, high + 1)
