"""Scenes the repository draws itself, and the questions asked about them: counting, reading a number, colours and
shapes, positions, two images (the abilities the paper claims, at laptop scale; docs/owl-small.md).

A scene is 224×224 RGB: a uniform light background; 0–4 non-overlapping shapes (circle, rectangle, triangle) in
easy-vqa's 8 colours, each 25–70 px; and sometimes a number from 0 to 99 in black, 24–48 px tall, in a sans-serif
font. Everything is drawn from a seeded `random.Random`, so a seed gives the same scenes; the colours' shades, the
background and the number's font and size vary, and the held-out fonts (`TEST_FONTS`) are not among the training
ones (`TRAIN_FONTS`). Each question has a kind (`KINDS`), the breakdown of `openowl eval scenes`.
"""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

SIZE = 224
COLOURS = {"red": (215, 35, 35), "green": (40, 160, 60), "blue": (40, 70, 210), "yellow": (235, 205, 30),
           "teal": (20, 150, 150), "brown": (135, 85, 35), "black": (20, 20, 20), "gray": (128, 128, 128)}  # fmt: skip
SHAPES = ("circle", "rectangle", "triangle")
KINDS = ("count", "count-colour", "number", "colour", "shape", "left", "above", "more", "which-colour", "two-turn")
FONT_DIRS = (Path("/usr/share/fonts/truetype/dejavu"), Path("/usr/share/fonts/truetype/liberation"))
TRAIN_FONTS = ("pillow", "DejaVuSans.ttf", "DejaVuSans-Bold.ttf", "LiberationSans-Regular.ttf",
               "LiberationSans-Bold.ttf", "DejaVuSansMono.ttf")  # fmt: skip
TEST_FONTS = ("DejaVuSansCondensed.ttf", "LiberationSansNarrow-Regular.ttf", "DejaVuSans-Oblique.ttf")
MIN_APART = 30  # px between two shapes' centres along the axis a left / above question asks about


@dataclass(frozen=True)
class Shape:
    kind: str
    colour: str
    box: tuple[int, int, int, int]  # left, top, right, bottom

    @property
    def centre(self) -> tuple[float, float]:
        return (self.box[0] + self.box[2]) / 2, (self.box[1] + self.box[3]) / 2


@dataclass(frozen=True)
class Scene:
    background: tuple[int, int, int]
    shapes: tuple[Shape, ...]
    number: int | None = None
    number_box: tuple[int, int, int, int] | None = None
    font: str = "pillow"
    number_height: int = 0


def available_fonts(names: Sequence[str]) -> list[str]:
    """The fonts of `names` found on this machine ("pillow", Pillow's own font, always is)."""
    found = [n for n in names if n == "pillow" or any((d / n).is_file() for d in FONT_DIRS)]
    return found or ["pillow"]


def load_font(name: str, height: int) -> ImageFont.FreeTypeFont:
    """A font whose digits are about `height` px tall."""
    path = next((d / name for d in FONT_DIRS if (d / name).is_file()), None)
    font = ImageFont.load_default(size=height) if path is None else ImageFont.truetype(str(path), height)
    top, bottom = font.getbbox("0123456789")[1::2]
    size = round(height * height / max(bottom - top, 1))  # a font's size is more than its digits' height
    return ImageFont.load_default(size=size) if path is None else ImageFont.truetype(str(path), size)


def random_scene(rng: random.Random, fonts: Sequence[str], shapes: int | None = None, number: bool | None = None):
    """A scene with `shapes` shapes (0–4 at random by default) and a number or not (at random by default). Sizes and
    places are drawn again until everything fits without overlapping."""
    background = tuple(rng.randint(205, 255) for _ in range(3))
    count = rng.randint(0, 4) if shapes is None else shapes
    written = rng.random() < 0.5 if number is None else number
    for _ in range(100):
        try:
            return _fill(rng, background, fonts, count, written)
        except _NoRoomError:
            continue
    raise ValueError(f"{count} shapes and a number don't fit in a {SIZE} px scene")


class _NoRoomError(Exception):
    pass


def _fill(rng: random.Random, background, fonts: Sequence[str], count: int, written: bool) -> Scene:
    boxes: list[tuple[int, int, int, int]] = []
    drawn_number, number_box, font, height = None, None, rng.choice(list(fonts)), rng.randint(24, 48)
    if written:
        drawn_number = rng.randint(0, 99)
        left, top, right, bottom = load_font(font, height).getbbox(str(drawn_number))
        number_box = _place(rng, right - left, bottom - top, boxes)
        boxes.append(number_box)
    placed = []
    for _ in range(count):
        side = rng.randint(25, 70)
        box = _place(rng, side, side if rng.random() < 0.5 else rng.randint(25, 70), boxes)
        boxes.append(box)
        placed.append(Shape(rng.choice(SHAPES), rng.choice(list(COLOURS)), box))
    return Scene(background, tuple(placed), drawn_number, number_box, font, height)  # type: ignore[arg-type]


def _place(rng: random.Random, width: int, height: int, taken: list[tuple[int, int, int, int]]):
    """A box of that size inside the scene, 4 px clear of every box taken (tried at 200 places, then `_NoRoomError`)."""
    for _ in range(200):
        x, y = rng.randint(4, SIZE - 4 - width), rng.randint(4, SIZE - 4 - height)
        box = (x, y, x + width, y + height)
        if all(box[2] + 4 <= t[0] or t[2] + 4 <= box[0] or box[3] + 4 <= t[1] or t[3] + 4 <= box[1] for t in taken):
            return box
    raise _NoRoomError


def draw(scene: Scene, rng: random.Random | None = None) -> Image.Image:
    """The scene as a 224×224 RGB image; with `rng`, each shape's colour shade is jittered (±20 per channel)."""
    image = Image.new("RGB", (SIZE, SIZE), scene.background)
    pen = ImageDraw.Draw(image)
    for shape in scene.shapes:
        fill = tuple(max(0, min(255, c + (rng.randint(-20, 20) if rng else 0))) for c in COLOURS[shape.colour])
        left, top, right, bottom = shape.box
        if shape.kind == "circle":
            pen.ellipse(shape.box, fill=fill)
        elif shape.kind == "rectangle":
            pen.rectangle(shape.box, fill=fill)
        else:
            pen.polygon([((left + right) / 2, top), (right, bottom), (left, bottom)], fill=fill)
    if scene.number is not None:
        font = load_font(scene.font, scene.number_height)
        left, top = font.getbbox(str(scene.number))[:2]
        pen.text((scene.number_box[0] - left, scene.number_box[1] - top), str(scene.number), fill=(0, 0, 0), font=font)
    return image


def questions(scene: Scene) -> list[tuple[str, str, str]]:
    """Every question of one image about the scene, as `(kind, question, answer)`."""
    out = [("count", "How many shapes are there?", str(len(scene.shapes)))]
    out += [("count-colour", f"How many {c} shapes are there?", str(sum(s.colour == c for s in scene.shapes)))
            for c in COLOURS]  # fmt: skip
    if scene.number is not None:
        out.append(("number", "What number is written in the image?", str(scene.number)))
    for kind in SHAPES:
        found = [s for s in scene.shapes if s.kind == kind]
        if len(found) == 1:
            out.append(("colour", f"What color is the {kind}?", found[0].colour))
    for colour in COLOURS:
        found = [s for s in scene.shapes if s.colour == colour]
        if len(found) == 1:
            out.append(("shape", f"What shape is the {colour} one?", found[0].kind))
    named = [s for s in scene.shapes if sum(t.kind == s.kind and t.colour == s.colour for t in scene.shapes) == 1]
    for a in named:
        for b in named:
            if a is b:
                continue
            (ax, ay), (bx, by) = a.centre, b.centre
            if abs(ax - bx) >= MIN_APART:
                out.append(("left", f"Is the {a.colour} {a.kind} to the left of the {b.colour} {b.kind}?",
                            "yes" if ax < bx else "no"))  # fmt: skip
            if abs(ay - by) >= MIN_APART:
                out.append(("above", f"Is the {a.colour} {a.kind} above the {b.colour} {b.kind}?",
                            "yes" if ay < by else "no"))  # fmt: skip
    return out


def two_image_questions(first: Scene, second: Scene) -> list[tuple[str, str, str]]:
    """The questions about two images in one message: which has more shapes (when they differ), and the colour of
    the shape in each (when each has exactly one)."""
    out = []
    if len(first.shapes) != len(second.shapes):
        more = "first" if len(first.shapes) > len(second.shapes) else "second"
        out.append(("more", "Which image has more shapes, the first or the second?", more))
    if len(first.shapes) == 1 and len(second.shapes) == 1:
        for which, scene in (("first", first), ("second", second)):
            out.append(("which-colour", f"What color is the shape in the {which} image?", scene.shapes[0].colour))
    return out


@dataclass(frozen=True)
class Question:
    """One question of a scene set: its kind, text and answer, the scenes it shows (one or two), and for a second
    turn the conversation it continues."""

    id: str
    kind: str
    question: str
    answer: str
    scenes: tuple[Scene, ...]
    conversation: str | None = None


def question_set(per_kind: int, seed: int, fonts: Sequence[str]) -> list[Question]:
    """`per_kind` questions of every kind in `KINDS` (a two-turn conversation counts once, its second turn), drawn
    with `seed` from scenes in `fonts`; kinds take turns, so a set's first questions cover every kind."""
    rng = random.Random(seed)
    fonts = available_fonts(fonts)
    out: list[Question] = []
    counts = dict.fromkeys(KINDS, 0)
    while min(counts.values()) < per_kind:
        for kind in KINDS:
            if counts[kind] < per_kind:
                picked = _question_of_kind(rng, fonts, kind, f"{seed}-{len(out)}")
                out += picked
                counts[kind] += 1
    return out


def _question_of_kind(rng: random.Random, fonts: Sequence[str], kind: str, key: str) -> list[Question]:
    for _ in range(1000):  # scenes are drawn until one has a question of the kind
        if kind in ("more", "which-colour"):
            count = 1 if kind == "which-colour" else None
            pair = (random_scene(rng, fonts, shapes=count), random_scene(rng, fonts, shapes=count))
            found = [q for q in two_image_questions(*pair) if q[0] == kind]
            scenes = pair
        else:
            scene = random_scene(rng, fonts, number=True if kind in ("number", "two-turn") else None)
            found = [q for q in questions(scene) if q[0] == ("number" if kind == "two-turn" else kind)]
            scenes = (scene,)
        if not found:
            continue
        _, text, answer = rng.choice(found)
        if kind != "two-turn":
            return [Question(f"scenes-{key}", kind, text, answer, scenes)]
        first = Question(f"scenes-{key}-a", "two-turn-first", "How many shapes are there?",
                         str(len(scene.shapes)), scenes, conversation=key)  # fmt: skip
        return [first, Question(f"scenes-{key}-b", kind, text, answer, (), conversation=key)]
    raise ValueError(f"no scene with a {kind!r} question in 1000 draws")


# --- training files -------------------------------------------------------------------------------


def caption(scene: Scene) -> str:
    """What a scene shows, for stage 1: its shapes left to right, then its number ("2 shapes: a red circle, a blue
    triangle. The number 42.")."""
    shapes = sorted(scene.shapes, key=lambda s: s.centre[0])
    said = ", ".join(f"a {s.colour} {s.kind}" for s in shapes)
    text = f"{len(shapes)} shape{'s' if len(shapes) != 1 else ''}" + (f": {said}." if shapes else ".")
    return text + (f" The number {scene.number}." if scene.number is not None else "")


def write_training_data(out: Path, images: int, seed: int = 0, questions_per_image: int = 4) -> dict[str, int]:
    """Scene training files under `out`, drawn with `seed` in `TRAIN_FONTS` (never the held-out set's seed or fonts):

    - `images/NNNNNN.png`: `images` scenes (shade jitter on);
    - `captions_train.jsonl` (stage 1): one caption per scene (`caption`);
    - `questions_train.jsonl` (stage 2, LLaVA conversations): `questions_per_image` one-image questions per scene,
      kinds taking turns among those the scene has; a two-turn conversation (count, then the number) for each
      scene with a number; "which has more shapes" on each pair of consecutive scenes whose counts differ; and
      both "what color is the shape in the first / second image" on pairs of the one-shape scenes.

    Returns:
        the number of records of each file.
    """
    rng = random.Random(seed)
    fonts = available_fonts(TRAIN_FONTS)
    (out / "images").mkdir(parents=True, exist_ok=True)
    drawn: list[tuple[Scene, str]] = []
    for n in range(images):
        scene = random_scene(rng, fonts)
        path = f"images/{n:06d}.png"  # relative to the files' folder, where training looks for it
        draw(scene, rng).save(out / path)
        drawn.append((scene, path))
    with open(out / "captions_train.jsonl", "w") as f:
        for n, (scene, path) in enumerate(drawn):
            f.write(json.dumps({"id": f"caption-{n}", "image": path, "caption": caption(scene)}) + "\n")
    records = []
    for n, (scene, path) in enumerate(drawn):
        by_kind: dict[str, list[tuple[str, str]]] = {}
        for kind, text, answer in questions(scene):
            by_kind.setdefault(kind, []).append((text, answer))
        kinds = rng.sample(sorted(by_kind), min(questions_per_image, len(by_kind)))
        records += [_turns(f"q-{n}-{k}", path, [rng.choice(by_kind[k])]) for k in kinds]
        if scene.number is not None:
            turns = [("How many shapes are there?", str(len(scene.shapes))),
                     ("What number is written in the image?", str(scene.number))]  # fmt: skip
            records.append(_turns(f"two-turn-{n}", path, turns))
    for n in range(len(drawn) - 1):
        (first, a), (second, b) = drawn[n], drawn[n + 1]
        found = [q for q in two_image_questions(first, second) if q[0] == "more"]
        if found:
            records.append(_turns(f"pair-{n}", [a, b], [found[0][1:]]))
    single = [n for n, (scene, _) in enumerate(drawn) if len(scene.shapes) == 1]
    rng.shuffle(single)
    for n, m in zip(single[::2], single[1::2], strict=False):  # a fifth of the scenes have one shape: pair those
        for _, text, answer in two_image_questions(drawn[n][0], drawn[m][0]):
            records.append(_turns(f"pair-{n}-{m}-{text.split()[-2]}", [drawn[n][1], drawn[m][1]], [(text, answer)]))
    rng.shuffle(records)
    with open(out / "questions_train.jsonl", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)
    return {"images": len(drawn), "captions_train.jsonl": len(drawn), "questions_train.jsonl": len(records)}


def _turns(sample_id: str, image: str | list[str], turns: list[tuple[str, str]]) -> dict:
    """A LLaVA conversation: the images' tags before the first question, then question / answer turns."""
    tags = "<image>\n" * (1 if isinstance(image, str) else len(image))
    conversation = []
    for n, (question, answer) in enumerate(turns):
        conversation += [
            {"from": "human", "value": (tags if n == 0 else "") + question},
            {"from": "gpt", "value": answer},
        ]
    return {"id": sample_id, "image": image, "conversations": conversation}
