"""The drawn scenes (`openowl.data.scenes`) and the held-out `scenes` eval task: seeded, drawn as described, answers
true to the picture, every kind present, the test fonts apart from the training ones."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
from conftest import CHECKPOINT

from openowl.cli import main
from openowl.data import scenes
from openowl.eval import runner, tasks
from openowl.infer.engine import Engine, Request
from openowl.infer.sampling import SamplingParams
from openowl.loading import load_pretrained


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


def test_two_image_training_questions_pair_one_shape_scenes_and_follow_them(tmp_path):
    scenes.write_training_data(tmp_path, images=60, seed=5)
    captions = {json.loads(line)["image"]: json.loads(line)["caption"]
                for line in (tmp_path / "captions_train.jsonl").read_text().splitlines()}  # fmt: skip
    asked = {"more": 0, "first": 0, "second": 0}
    for line in (tmp_path / "questions_train.jsonl").read_text().splitlines():
        row = json.loads(line)
        if not isinstance(row["image"], list):
            continue
        question, answer = (turn["value"] for turn in row["conversations"])
        first, second = (captions[path] for path in row["image"])
        if "more shapes" in question:
            counts = int(first.split()[0]), int(second.split()[0])
            assert counts[0] != counts[1] and answer == ("first" if counts[0] > counts[1] else "second")
            asked["more"] += 1
        else:
            which = "first" if "first image" in question else "second"
            assert first.startswith("1 shape:") and second.startswith("1 shape:")
            assert answer == (first if which == "first" else second).split()[3]  # "1 shape: a red circle."
            asked[which] += 1
    assert asked["more"] > 20 and asked["first"] == asked["second"] >= 2, asked


def test_the_scenes_task_through_a_server_gives_the_local_engines_answers(model, processor, tmp_path, capsys):
    """`openowl eval scenes --server URL`: the questions (two images, a second turn with the first's answer) go to a
    real `openowl serve` app through the openai client; greedy, they get the local engine's answers."""
    from server_helpers import serve

    from openowl.serve.config import ServeConfig

    task, params = tasks.get_task("scenes"), SamplingParams(max_new_tokens=4)
    items = task.load("1")
    local = runner.evaluate(lambda: Engine(model, processor), task, items, tmp_path / "local", params, batch_size=4,
                            show_progress=False, model=str(CHECKPOINT))  # fmt: skip
    with serve(Engine(model, processor), ServeConfig(model_name="owl-test", max_images=2)) as running:
        args = ["eval", "scenes", "--data", "1", "--server", f"{running.url}/v1", "--max-new-tokens", "4",
                "--batch-size", "3", "--output", str(tmp_path / "served")]  # fmt: skip
        assert main(args) == 0
    assert "| two-turn |" in capsys.readouterr().out
    served = {r["id"]: r for r in map(json.loads, (tmp_path / "served" / "answers.jsonl").read_text().splitlines())}
    answers = {r["id"]: r for r in map(json.loads, (tmp_path / "local" / "answers.jsonl").read_text().splitlines())}
    assert len(served) == len(items) and {i: r["answer"] for i, r in served.items()} == {
        i: r["answer"] for i, r in answers.items()}  # fmt: skip
    settings = json.loads((tmp_path / "served" / "settings.json").read_text())
    assert (settings["server"], settings["served_model"], settings["model"]) == (f"{running.url}/v1", "owl-test",
                                                                                "owl-test")  # fmt: skip
    assert local["breakdown"] == json.loads((tmp_path / "served" / "results.json").read_text())["breakdown"]


def test_server_requests_refuse_what_the_openai_fields_cannot_say():
    from openowl.eval import client

    assert client.request_args(SamplingParams(max_new_tokens=5)) == {"max_tokens": 5, "temperature": 0.0}
    sampled = SamplingParams(max_new_tokens=5, do_sample=True, temperature=0.7, top_p=0.9, seed=3, stop=("\n",))
    assert client.request_args(sampled) == {"max_tokens": 5, "temperature": 0.7, "top_p": 0.9, "seed": 3,
                                            "stop": ["\n"]}  # fmt: skip
    with pytest.raises(ValueError, match="repetition_penalty"):
        client.request_args(SamplingParams(repetition_penalty=1.2))


def test_training_files_read_back_as_the_recipes_samples(tmp_path, capsys, monkeypatch):
    """Written to a relative folder (as the recipe's commands do), the files still find their images: paths are
    relative to the files' folder, not to where the command ran."""
    from openowl.train.data import read_samples

    monkeypatch.chdir(tmp_path)
    assert main(["data", "scenes", "data/scenes", "--images", "12", "--seed", "3"]) == 0
    counts = json.loads(capsys.readouterr().out)
    monkeypatch.chdir("/")
    tmp_path = tmp_path / "data" / "scenes"
    assert counts["images"] == 12 == len(list((tmp_path / "images").glob("*.png")))
    captions = read_samples(tmp_path / "captions_train.jsonl")
    conversations = read_samples(tmp_path / "questions_train.jsonl")
    assert len(captions) == 12 and len(conversations) == counts["questions_train.jsonl"]
    assert all(Path(path).is_file() for s in captions + conversations for path in s.images)
    kinds = {s.id.split("-")[0] for s in conversations}
    assert kinds == {"q", "two", "pair"}  # one-image questions, two-turn conversations, two-image questions
    pair = next(s for s in conversations if s.id.startswith("pair-"))
    assert len(pair.images) == 2
    again = tmp_path / "again"
    scenes.write_training_data(again, images=12, seed=3)
    assert (again / "questions_train.jsonl").read_text() == (tmp_path / "questions_train.jsonl").read_text()
    assert scenes.caption(scenes.Scene((250, 250, 250), ())) == "0 shapes."
    two = scenes.Scene((250, 250, 250), (scenes.Shape("circle", "red", (120, 10, 150, 40)),
                                         scenes.Shape("triangle", "blue", (10, 10, 40, 40))), number=7)  # fmt: skip
    assert scenes.caption(two) == "2 shapes: a blue triangle, a red circle. The number 7."


def test_text_answers_keep_the_models_finished_answers(tmp_path, monkeypatch, capsys):
    from openowl.data import text_answers
    from openowl.train.data import read_samples

    questions = ["What is the capital of France?", "Say hello.", "What is 2 plus 2?"]
    monkeypatch.setattr(text_answers, "text_questions", lambda: questions)
    assert main(["data", "text-answers", str(tmp_path), "--model", str(CHECKPOINT), "--max-new-tokens", "3"]) == 0
    answers = [json.loads(line) for line in (tmp_path / "text_answers.jsonl").read_text().splitlines()]
    assert [a["question"] for a in answers] == questions  # the model answered each, as `generate --input` does
    alone = Engine(*load_pretrained(CHECKPOINT)).generate(
        [Request(_user_prompt(q)) for q in questions], SamplingParams(max_new_tokens=3))  # fmt: skip
    assert [a["answer"] for a in answers] == [c.text for c in alone]
    written = json.loads(capsys.readouterr().out)
    finished = sum(a["finish_reason"] == "stop" for a in answers)
    assert written == {"text_train.jsonl": finished, "left out (cut at the token limit)": 3 - finished}

    # Finished answers are kept with their questions; one cut at the token limit is left out.
    answers[1]["finish_reason"], answers[2]["finish_reason"] = "stop", "length"
    (tmp_path / "text_answers.jsonl").write_text("".join(json.dumps(a) + "\n" for a in answers))
    assert text_answers.write_samples(tmp_path)["text_train.jsonl"] == 1 + (answers[0]["finish_reason"] == "stop")
    samples = read_samples(tmp_path / "text_train.jsonl")
    assert samples[-1].id == answers[1]["id"] and not samples[-1].images
    row = json.loads((tmp_path / "text_train.jsonl").read_text().splitlines()[-1])
    assert row["conversations"] == [{"from": "human", "value": "Say hello."},
                                    {"from": "gpt", "value": answers[1]["answer"].strip()}]  # fmt: skip


def _user_prompt(text: str) -> str:
    from openowl.loading import load_processor

    message = {"role": "user", "content": [{"type": "text", "text": text}]}
    return load_processor(CHECKPOINT).apply_chat_template([message])
