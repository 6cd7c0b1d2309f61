"""The drawn scenes (`openowl.data.scenes`) and the held-out `scenes` eval task: seeded, drawn as described, answers
true to the picture, every kind present, the test fonts apart from the training ones."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
from conftest import CHECKPOINT

from openowl.cli import main
from openowl.data import scenes
from openowl.eval import runner, tasks
from openowl.infer.engine import Engine
from openowl.infer.sampling import SamplingParams


def drawn(seed: int, **kwargs) -> tuple[scenes.Scene, np.ndarray]:
    rng = random.Random(seed)
    scene = scenes.random_scene(rng, scenes.available_fonts(scenes.TRAIN_FONTS), **kwargs)
    return scene, np.asarray(scenes.draw(scene))


def test_a_seed_gives_the_same_scenes_and_pixels():
    first, second = scenes.question_set(3, 7, scenes.TEST_FONTS), scenes.question_set(3, 7, scenes.TEST_FONTS)
    assert first == second
    assert first != scenes.question_set(3, 8, scenes.TEST_FONTS)
    image = [np.asarray(scenes.draw(q.scenes[0], random.Random(1))) for q in (first[0], second[0])]
    assert np.array_equal(*image)


@pytest.mark.parametrize("seed", range(30))
def test_scenes_are_drawn_as_described(seed):
    scene, pixels = drawn(seed, number=seed % 2 == 0)
    assert pixels.shape == (224, 224, 3) and min(scene.background) >= 205
    assert 0 <= len(scene.shapes) <= 4
    boxes = [s.box for s in scene.shapes] + ([scene.number_box] if scene.number is not None else [])
    for a in range(len(boxes)):
        for b in range(a + 1, len(boxes)):  # no two things overlap
            one, two = boxes[a], boxes[b]
            assert one[2] <= two[0] or two[2] <= one[0] or one[3] <= two[1] or two[3] <= one[1]
    for shape in scene.shapes:
        left, top, right, bottom = shape.box
        assert 25 <= right - left <= 70 and 25 <= bottom - top <= 70
        x, y = shape.centre
        y = y if shape.kind != "triangle" else (top + 2 * bottom) / 3  # a triangle's centroid is inside it
        assert tuple(pixels[int(y), int(x)]) == scenes.COLOURS[shape.colour]
    if scene.number is not None:
        assert 0 <= scene.number <= 99
        ink = np.argwhere((pixels < 60).all(axis=-1) & ~_shape_mask(scene))
        height = ink[:, 0].max() - ink[:, 0].min() + 1
        assert 22 <= height <= 50  # 24–48 px asked, antialiasing aside


def test_a_full_scene_is_drawn_again_until_it_fits():
    rng, fonts = random.Random(0), scenes.available_fonts(scenes.TRAIN_FONTS)
    full = [scenes.random_scene(rng, fonts, shapes=4, number=True) for _ in range(300)]
    assert all(len(s.shapes) == 4 and s.number is not None for s in full)


def _shape_mask(scene: scenes.Scene) -> np.ndarray:
    mask = np.zeros((224, 224), bool)
    for shape in scene.shapes:
        left, top, right, bottom = shape.box
        mask[top : bottom + 1, left : right + 1] = True
    return mask


def test_answers_follow_the_scene():
    scene = scenes.Scene(
        (230, 230, 230),
        (scenes.Shape("circle", "red", (10, 10, 50, 50)), scenes.Shape("triangle", "blue", (150, 20, 200, 70)),
         scenes.Shape("rectangle", "red", (100, 150, 140, 190))),
        number=42, number_box=(10, 150, 60, 190), font="pillow", number_height=30,
    )  # fmt: skip
    asked = {q: a for _, q, a in scenes.questions(scene)}
    assert asked["How many shapes are there?"] == "3"
    assert asked["How many red shapes are there?"] == "2" and asked["How many teal shapes are there?"] == "0"
    assert asked["What number is written in the image?"] == "42"
    assert asked["What color is the triangle?"] == "blue" and "What shape is the red one?" not in asked
    assert asked["Is the red circle to the left of the blue triangle?"] == "yes"
    assert asked["Is the blue triangle to the left of the red circle?"] == "no"
    assert asked["Is the red circle above the red rectangle?"] == "yes"
    assert "Is the red circle above the blue triangle?" not in asked  # centres 15 px apart: too close to ask
    one = scenes.Scene((240, 240, 240), (scenes.Shape("circle", "green", (10, 10, 40, 40)),))
    two = scenes.Scene((240, 240, 240), (scenes.Shape("circle", "gray", (10, 10, 40, 40)),))
    assert scenes.two_image_questions(one, two) == [
        ("which-colour", "What color is the shape in the first image?", "green"),
        ("which-colour", "What color is the shape in the second image?", "gray"),
    ]
    assert scenes.two_image_questions(scene, one)[0] == (
        "more", "Which image has more shapes, the first or the second?", "first")  # fmt: skip


def test_the_held_out_set_has_every_kind_in_fonts_never_trained_on():
    assert not set(scenes.TEST_FONTS) & set(scenes.TRAIN_FONTS)
    items = tasks.get_task("scenes").load("4")
    kinds = [it.meta["category"] for it in items]
    assert {k: kinds.count(k) for k in (*scenes.KINDS, "two-turn-first")} == dict.fromkeys(
        (*scenes.KINDS, "two-turn-first"), 4)  # fmt: skip
    assert {len(it.images) for it in items if it.meta["category"] in ("more", "which-colour")} == {2}
    for first, second in zip(items, items[1:], strict=False):  # a second turn follows its first, with no image
        if second.meta["category"] == "two-turn":
            assert first.conversation == second.conversation and first.images and not second.images
    assert {q.scenes[0].font for q in scenes.question_set(20, 1, scenes.TEST_FONTS) if q.scenes} <= set(
        scenes.TEST_FONTS)  # fmt: skip


def test_the_scenes_task_runs_end_to_end(model, processor, tmp_path):
    task = tasks.get_task("scenes")
    items = task.load("1")
    result = runner.evaluate(lambda: Engine(model, processor), task, items, tmp_path, SamplingParams(max_new_tokens=3),
                             batch_size=4, show_progress=False, model=str(CHECKPOINT))  # fmt: skip
    assert set(result["breakdown"]) >= {*scenes.KINDS, "two-turn-first"} and result["n"] == len(items)
    assert (tmp_path / "results.md").is_file()


def test_training_files_read_back_as_the_recipes_samples(tmp_path, capsys):
    from openowl.train.data import read_samples

    assert main(["data", "scenes", str(tmp_path), "--images", "12", "--seed", "3"]) == 0
    counts = json.loads(capsys.readouterr().out)
    assert counts["images"] == 12 == len(list((tmp_path / "images").glob("*.png")))
    captions = read_samples(tmp_path / "captions_train.jsonl")
    conversations = read_samples(tmp_path / "questions_train.jsonl")
    assert len(captions) == 12 and len(conversations) == counts["questions_train.jsonl"]
    kinds = {s.id.split("-")[0] for s in conversations}
    assert kinds == {"q", "two", "pair"}  # one-image questions, two-turn conversations, two-image questions
    pair = next(s for s in conversations if s.id.startswith("pair-"))
    assert len(pair.images) == 2
    again = tmp_path / "again"
    scenes.write_training_data(again, images=12, seed=3)
    assert (again / "questions_train.jsonl").read_text().replace(str(again), str(tmp_path)) == (
        tmp_path / "questions_train.jsonl").read_text()  # fmt: skip
    assert scenes.caption(scenes.Scene((250, 250, 250), ())) == "0 shapes."
    two = scenes.Scene((250, 250, 250), (scenes.Shape("circle", "red", (120, 10, 150, 40)),
                                         scenes.Shape("triangle", "blue", (10, 10, 40, 40))), number=7)  # fmt: skip
    assert scenes.caption(two) == "2 shapes: a blue triangle, a red circle. The number 7."
