"""`openowl eval`: every metric on hand-computed examples, the task loaders (offline), and the runner end to end on
the parity checkpoint: OwlEval's answers file and report, batched equals one by one, resume recomputes nothing."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import CHECKPOINT, IMAGES
from PIL import Image

from openowl.cli import main
from openowl.eval import hub, jsonl_task, metrics, owleval, owleval_data, results, runner, tasks
from openowl.eval.items import Item
from openowl.eval.likelihood import continuation_logprobs
from openowl.infer.engine import Engine, Request
from openowl.infer.sampling import SamplingParams
from openowl.prompts import user_message

MODEL = ["--model", str(CHECKPOINT)]
PARAMS = SamplingParams(max_new_tokens=4)
OWLEVAL = Path(__file__).parent / "fixtures" / "owleval"  # a copy of upstream's OwlEval folder


@pytest.fixture(autouse=True)
def owleval_copy(monkeypatch, tmp_path):
    """OwlEval from the tests' copy; a download, should any test ask for one, reads a folder that isn't there."""
    monkeypatch.setenv("OPENOWL_OWLEVAL", str(OWLEVAL))
    monkeypatch.setattr(owleval_data, "OWLEVAL_URL", (tmp_path / "no-network").as_uri())


@pytest.fixture(scope="module")
def engine(model, processor) -> Engine:
    return Engine(model, processor)


def _read(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _count_requests(monkeypatch) -> list[list[str]]:
    """Record the prompts of every Engine.generate call."""
    calls: list[list[str]] = []
    original = Engine.generate

    def counting(self, requests, params):
        calls.append([r.prompt for r in requests])
        return original(self, requests, params)

    monkeypatch.setattr(Engine, "generate", counting)
    return calls


# --- metrics on hand-computed examples -------------------------------------------------------------


def test_exact_match_normalization():
    assert metrics.normalize_answer("The Circle.") == "circle"
    assert metrics.normalize_answer("  An  orange,   shape! ") == "orange shape"
    assert metrics.exact_match("Yes.", "yes") and metrics.exact_match("RED", ["blue", "red"])
    assert not metrics.exact_match("a red one", "red") and not metrics.exact_match("yes, it is", "yes")


@pytest.mark.parametrize(
    "raw, normalized",
    [("Two dogs.", "2 dogs"), ("dont know", "don't know"), ("couldnt've", "couldn't've"),
     ("1,000 people", "1000 people"), ("yes!", "yes"), ("The man (left)", "man left"), ("it is 3.5 m", "it is 3.5 m"),
     ("what-ever", "what ever"),
     ("x - y", "x y"), ("None", "0"), ("Hes here", "he's here"), ("end.", "end")],
)  # fmt: skip
def test_vqa_normalization(raw, normalized):
    assert metrics.vqa_normalize(raw) == normalized


def test_vqa_accuracy_averages_the_leave_one_out_subsets():
    answers = ["2"] * 3 + ["3"] * 7
    # Each "2" annotator leaves 2 matching others (2/3); each "3" annotator leaves all 3 (capped at 1).
    assert metrics.vqa_accuracy("two", answers) == pytest.approx((3 * 2 / 3 + 7 * 1) / 10)
    assert metrics.vqa_accuracy("3", answers) == 1.0
    assert metrics.vqa_accuracy("4", answers) == 0.0
    # One annotator agrees: 9 subsets hold that match (1/3 each), the one without it scores 0.
    assert metrics.vqa_accuracy("Yes.", ["yes"] + ["no"] * 9) == pytest.approx(9 * (1 / 3) / 10)
    assert metrics.vqa_accuracy("no", ["yes"] * 2 + ["no"] * 8) == 1.0
    with pytest.raises(ValueError):
        metrics.vqa_accuracy("x", [])


def test_yes_no_parsing_and_pope_scores():
    parse = metrics.parse_yes_no
    assert [parse(t) for t in ["Yes.", "No, there is not.", "y", "N", "yes", "There is a cat", ""]] == [
        "yes", "no", "yes", "no", "yes", None, None]  # fmt: skip
    scores = metrics.binary_scores(["yes", "yes", "no", None, "no", "yes"], ["yes", "no", "no", "yes", "yes", "yes"])
    # TP 2, FP 1, TN 1, FN 2 (the unparsed answer to a "yes" question counts as a miss).
    assert scores == pytest.approx(
        {"accuracy": 3 / 6, "precision": 2 / 3, "recall": 2 / 4, "f1": 4 / 7, "yes_ratio": 3 / 6}
    )


def test_mme_scores_acc_plus_per_image():
    records = [("existence", "1.png", True), ("existence", "1.png", True), ("existence", "2.png", True),
               ("existence", "2.png", False), ("count", "3.png", False), ("count", "3.png", False),
               ("commonsense_reasoning", "4.png", True), ("commonsense_reasoning", "4.png", True)]  # fmt: skip
    table = metrics.mme_scores(records)
    assert table["existence"] == {"acc": 75.0, "acc+": 50.0, "score": 125.0}
    assert table["count"] == {"acc": 0.0, "acc+": 0.0, "score": 0.0}
    assert table["commonsense_reasoning"]["score"] == 200.0
    assert table["perception"] == 125.0 and table["cognition"] == 200.0


def test_hallusion_pair_and_figure_accuracy():
    def r(cat, sub, set_id, fig, q, truth, pred):
        return dict(category=cat, subcategory=sub, set_id=set_id, figure_id=fig, question_id=q, truth=truth,
                    prediction=pred)  # fmt: skip

    records = [
        r("VD", "illusion", 1, 0, 0, "yes", "yes"),
        r("VD", "illusion", 1, 1, 0, "no", "no"),
        r("VD", "illusion", 1, 0, 1, "yes", "no"),  # wrong: figure 0 and question 1 fail
        r("VD", "illusion", 1, 1, 1, "yes", "yes"),
        r("VS", "chart", 2, 0, 0, "yes", None),  # no figure, no commitment: right, and in no figure group
        r("VS", "chart", 2, 1, 0, "no", "no"),
    ]
    assert metrics.hallusion_scores(records) == pytest.approx(
        {"all_accuracy": 5 / 6, "question_pair_accuracy": 2 / 3, "figure_accuracy": 2 / 3}
    )
    assert metrics.hallusion_scores([r("VD", "x", 1, 0, 0, "yes", None)])["all_accuracy"] == 0.0


def test_choice_parsing_mmbench_style():
    options = ["cat", "dog", "bird", "fish"]
    assert metrics.parse_choice("B", options) == 1
    assert metrics.parse_choice("The answer is (C).", options) == 2
    assert metrics.parse_choice("B. dog", options) == 1
    assert metrics.parse_choice("A dog is sitting here", options) == 1  # "A" is the article; the text names dog
    assert metrics.parse_choice("A", options) == 0
    assert metrics.parse_choice("I don't know", options) is None
    assert metrics.parse_choice("a cat or a dog", options) is None  # two options named
    assert metrics.parse_choice("E", options) is None  # not an option here


def test_circular_options_rotate_the_answer():
    assert metrics.circular_options(["x", "y", "z"], 2) == [(["x", "y", "z"], 2), (["y", "z", "x"], 1),
                                                           (["z", "x", "y"], 0)]  # fmt: skip


def test_caption_bleu4_and_cider():
    # Precisions 5/6, 3/5, 2/4, 1/3, equal lengths (no brevity penalty): BLEU-4 = (1/12) ** (1/4).
    scores = metrics.caption_scores({"1": "A cat sits on the mat."}, {"1": ["a cat sits on a mat"]})
    assert scores["bleu4"] == pytest.approx((1 / 12) ** 0.25, abs=1e-6)
    # CIDEr-D over two images: idf log 2 for every n-gram; image 1 matches its reference in 1- and 2-grams
    # (cosine 1 each, 0 for the absent 3-, 4-grams: 10 * 2/4 = 5); image 2 shares one unigram of two
    # (cosine 1/2: 10 * 0.5/4 = 1.25). Mean 3.125.
    scores = metrics.caption_scores({"1": "a b", "2": "c e"}, {"1": ["a b"], "2": ["c d"]})
    assert scores["cider"] == pytest.approx(3.125, abs=1e-6)


# --- tasks and loaders -----------------------------------------------------------------------------


def test_easy_vqa_loader_types_and_always_yes_baseline():
    task = tasks.get_task("easy-vqa")
    items = task.load(None)
    assert len(items) == 9673 and items[0].question == "what is the red shape?" and items[0].answers == ["triangle"]
    assert Path(items[0].images[0]).name == "0.png" and task.max_new_tokens == 10
    units = runner.make_units(task, items)
    scored = results.score(task, units, {it.id: {"answer": "Yes."} for it in items})
    assert scored["scores"]["accuracy"] == pytest.approx(0.3733, abs=5e-5)  # 37.3 % on the full test split
    assert scored["baseline"]["scores"]["accuracy"] == scored["scores"]["accuracy"]
    assert {k: v["n"] for k, v in scored["breakdown"].items()} == {"colour": 1280, "shape": 1257, "yes/no": 7136}
    assert scored["breakdown"]["shape"]["accuracy"] == 0.0
    assert scored["breakdown"]["yes/no"]["accuracy"] == pytest.approx(3611 / 7136)


def test_jsonl_task_format(tmp_path):
    (tmp_path / "pics").mkdir()
    shutil.copy(IMAGES / "image0.jpg", tmp_path / "pics" / "a.jpg")
    rows = [
        {"id": "mc", "image": "pics/a.jpg", "question": "What is it?", "options": ["cat", "dog"], "answer": "B",
         "category": "animals", "source": "x"},
        {"question": "Which?", "options": ["red", "blue", "green"], "answer": "green"},
        {"question": "Which?", "options": ["red", "blue"], "answer": 0},
    ]  # fmt: skip
    path = tmp_path / "t.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    items = jsonl_task.load_jsonl(path)
    assert [it.id for it in items] == ["mc", "2", "3"]
    assert items[0].images == [tmp_path / "pics" / "a.jpg"] and items[0].meta == {"category": "animals", "source": "x"}
    assert [it.answer_index for it in items] == [1, 2, 0]
    assert tasks.get_task(str(path)).metric == "choice"
    yes_no = [Item("1", "q", answers=["Yes"]), Item("2", "q", answers=["no"])]
    assert jsonl_task.infer_metric(yes_no) == "yes-no"
    assert jsonl_task.infer_metric([Item("1", "q", answers=["2", "two", "2"])]) == "vqa"
    assert jsonl_task.infer_metric([Item("1", "q", answers=["red"])]) == "exact"
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(rows[0]) + "\n" + json.dumps({**rows[1], "answer": "Z"}) + "\n")
    with pytest.raises(ValueError, match="bad.jsonl:2"):
        jsonl_task.load_jsonl(bad)
    with pytest.raises(ValueError, match="unknown task"):
        tasks.get_task("no-such-task")
    # What a metric needs is checked before any model loads.
    exact = tasks.get_task(str(path), metric="exact")
    with pytest.raises(ValueError, match="item mc: the exact metric needs an answer"):
        runner.make_units(exact, [Item("mc", "q")])
    with pytest.raises(ValueError, match="options"):
        runner.make_units(tasks.get_task(str(path)), [Item("x", "q", answers=["a"])])
    with pytest.raises(ValueError, match="set_id"):
        runner.make_units(tasks.get_task(str(path), metric="hallusion"), [Item("h", "q", answers=["yes"])])


def test_hub_row_converters_offline():
    image = object()
    mme = hub.mme_items([{"question_id": "code/1.png", "image": image, "question": "Q? Please answer yes or no.",
                          "answer": "Yes", "category": "code_reasoning"}])  # fmt: skip
    assert mme[0].answers == ["yes"] and mme[0].meta == {"category": "code_reasoning", "pair": "code/1.png"}
    assert mme[0].images[0]() is image  # read when its batch runs
    mmb = hub.mmbench_items([
        {"index": 5, "question": "Q", "hint": "H", "A": "a", "B": "b", "C": "c", "D": "nan", "answer": "C",
         "category": "ocr", "image": image},
        {"index": 1_000_005, "question": "Q", "hint": "nan", "A": "b", "B": "c", "C": "a", "D": "nan", "answer": "B",
         "category": "ocr", "image": image},
    ])  # fmt: skip
    assert len(mmb) == 1 and mmb[0].question == "H\nQ" and mmb[0].options == ["a", "b", "c"]
    assert mmb[0].answer_index == 2
    seed = hub.seed_bench_items([{"question_id": "7", "question": "Q", "choice_a": "1", "choice_b": "2",
                                  "choice_c": "3", "choice_d": "4", "answer": "D", "data_type": "video",
                                  "question_type_id": 3, "image": [image, image]}])  # fmt: skip
    assert seed[0].answer_index == 3 and seed[0].meta["category"] == "video"
    row = {"category": "VS", "subcategory": "chart", "set_id": 1, "figure_id": 0, "question_id": 2, "question": "Q",
           "gt_answer": "1", "image": None}  # fmt: skip
    hb = hub.hallusion_items([row], "non_image")
    assert hb[0].answers == ["yes"] and hb[0].images == [] and hb[0].meta["figure_id"] == 0
    ego = hub.egoschema_items([{"video_idx": "abc", "question": "Q", "option": [f"{c}. opt {c}" for c in "ABCDE"],
                                "answer": "3"}], IMAGES)  # fmt: skip
    assert ego[0].options == ["opt A", "opt B", "opt C", "opt D", "opt E"] and ego[0].answer_index == 3
    assert ego[0].videos == [IMAGES / "abc.mp4"]


def test_hub_tasks_offline_error_is_clear(monkeypatch, capsys):
    import datasets.config
    import huggingface_hub.constants

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)  # as on a machine without the hub, but at once
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr("openowl.cli._engine", lambda args: pytest.fail("the model must not load"))
    assert main(["eval", "mme", *MODEL]) == 2
    err = capsys.readouterr().err
    assert "lmms-lab/MME" in err and "--data" in err and "jsonl" in err


def test_eval_list_and_bad_arguments(capsys):
    assert main(["eval", "--list"]) == 0
    out = capsys.readouterr().out
    for name in ["easy-vqa", "owleval", "mme", "pope", "mmbench", "seed-bench", "hallusionbench", "egoschema"]:
        assert name in out
    assert main(["eval", *MODEL]) == 2 and "TASK" in capsys.readouterr().err
    assert main(["eval", "easy-vqa", *MODEL, "--metric", "bleu"]) == 2 and "metric" in capsys.readouterr().err


# --- the runner on the parity checkpoint ---------------------------------------------------------


def _easy(n: int):
    task = tasks.get_task("easy-vqa")
    return task, task.load(None)[:n]


def test_easy_vqa_end_to_end(tmp_path, capsys):
    assert main(["eval", "easy-vqa", *MODEL, "--limit", "10", "--batch-size", "4", "--max-new-tokens", "3",
                 "--output", str(tmp_path)]) == 0  # fmt: skip
    answers = _read(tmp_path / "answers.jsonl")
    assert [a["id"] for a in answers] == [str(i) for i in range(10)]
    saved = json.loads((tmp_path / "results.json").read_text())
    _, items = _easy(10)
    right = [metrics.exact_match(a["answer"], it.answers) for a, it in zip(answers, items, strict=True)]
    assert saved["n"] == 10 and saved["scores"]["accuracy"] == sum(right) / 10
    assert saved["baseline"]["scores"]["accuracy"] == sum(it.answers == ["yes"] for it in items) / 10
    assert saved["settings"]["sampling"]["max_new_tokens"] == 3 and saved["settings"]["sampling"]["do_sample"] is False
    table = (tmp_path / "results.md").read_text()
    assert '| always "yes" accuracy |' in table and "| yes/no |" in table and "| colour |" in table
    assert table in capsys.readouterr().out


def test_batched_equals_one_by_one(engine, tmp_path):
    task, items = _easy(6)
    owl = tasks.get_task("owleval")
    talks = [it for it in owl.load(None) if it.conversation in ("10.jpg", "47.jpg")]  # 8 + 5 turns
    for chosen_task, chosen in ((task, items), (owl, talks)):
        one = runner.evaluate(lambda: engine, chosen_task, chosen, tmp_path / f"{chosen_task.name}-1", PARAMS,
                              batch_size=1, show_progress=False)  # fmt: skip
        many = runner.evaluate(lambda: engine, chosen_task, chosen, tmp_path / f"{chosen_task.name}-5", PARAMS,
                               batch_size=5, show_progress=False)  # fmt: skip
        assert one["scores"] == many["scores"]
        by_one = {a["id"]: a["answer"] for a in _read(tmp_path / f"{chosen_task.name}-1" / "answers.jsonl")}
        by_many = {a["id"]: a["answer"] for a in _read(tmp_path / f"{chosen_task.name}-5" / "answers.jsonl")}
        assert by_one == by_many and len(by_one) == len(chosen)


def test_resume_recomputes_nothing(engine, tmp_path, monkeypatch):
    task, items = _easy(7)
    reference = runner.evaluate(lambda: engine, task, items, tmp_path / "whole", PARAMS, batch_size=3,
                                show_progress=False)  # fmt: skip
    batches: list[int] = []
    real = Engine.generate

    def dies_on_the_second_batch(self, requests, params):
        batches.append(len(requests))
        if len(batches) == 2:
            raise KeyboardInterrupt
        return real(self, requests, params)

    monkeypatch.setattr(Engine, "generate", dies_on_the_second_batch)
    with pytest.raises(KeyboardInterrupt):
        runner.evaluate(lambda: engine, task, items, tmp_path / "cut", PARAMS, batch_size=3, show_progress=False)
    assert [a["id"] for a in _read(tmp_path / "cut" / "answers.jsonl")] == ["0", "1", "2"]

    calls = _count_requests(monkeypatch)  # the real generate again, counted
    path = tmp_path / "cut" / "answers.jsonl"
    path.write_text(path.read_text() + '{"id": "3", "ans')  # and a line cut mid-write
    resumed = runner.evaluate(lambda: engine, task, items, tmp_path / "cut", PARAMS, batch_size=3,
                              show_progress=False)  # fmt: skip
    assert sum(len(c) for c in calls) == 4  # items 3..6 only
    assert resumed["scores"] == reference["scores"]
    assert _read(path) == _read(tmp_path / "whole" / "answers.jsonl")

    calls.clear()
    loads = []
    runner.evaluate(lambda: loads.append(1) or engine, task, items, tmp_path / "cut", PARAMS, show_progress=False)
    assert calls == [] and loads == []  # all answered: the model is not even loaded

    with pytest.raises(ValueError, match="other settings"):
        runner.evaluate(lambda: engine, task, items, tmp_path / "cut", PARAMS.with_(max_new_tokens=9))


def test_owleval_end_to_end(tmp_path, monkeypatch):
    calls = _count_requests(monkeypatch)
    assert main(["eval", "owleval", *MODEL, "--max-new-tokens", "3", "--batch-size", "32",
                 "--output", str(tmp_path)]) == 0  # fmt: skip
    label = runner.model_label(str(CHECKPOINT))
    rows = _read(tmp_path / f"{label}_answer.jsonl")
    questions = _read(owleval_data.owleval_dir() / "questions.jsonl")
    assert len(rows) == 82 and [r["question_id"] for r in rows] == list(range(1, 83))
    assert all(set(r) == {"image", "question_id", "question", "answer", "model_id"} for r in rows)
    assert [(r["image"], r["question"]) for r in rows] == [(q["image"], q["question"]) for q in questions]
    assert {r["model_id"] for r in rows} == {label}
    # Round by round: 50 first turns, then the second turns of the 17 multi-turn images, ...
    sizes = [len(c) for c in calls]
    assert sum(sizes) == 82 and sizes[:2] == [32, 18]
    # A later turn is asked after the earlier questions and answers of its image, which is given once.
    answers = {r["question_id"]: r["answer"] for r in rows}
    third = next(p for c in calls for p in c if "Is there a bathroom in master bedroom?" in p)
    assert third.count("<image>") == 1
    assert third.index("How many bedrooms") < third.index(answers[15]) < third.index("Master Bedroom")

    html = (tmp_path / "report.html").read_text()
    assert html.count("<section>") == 82 and html.count('type="radio"') == 82 * 7 * 4
    assert html.count("data:image/jpeg;base64,") == 82
    for system in ["mPLUG_Owl_7b:v1", "MMreact", "BLIP2", "openflanmingo", label]:
        assert f"<th>{system}</th>" in html
    assert "How many bedrooms are there in this floor plan?" in html


def test_owleval_ratings_tally(tmp_path):
    items = tasks.get_task("owleval").load(None)
    ratings = {"ours": {"15": "A", "16": "B", "1": "D"}, "other": {"1": "C"}}
    counts = owleval.tally(ratings, items)
    # Question 15 is both single- and multi-turn, 16 multi-turn, 1 single-turn.
    assert counts["ours"]["all"] == {"A": 1, "B": 1, "C": 0, "D": 1, "A+B": 2}
    assert counts["ours"]["single_turn"] == {"A": 1, "B": 0, "C": 0, "D": 1, "A+B": 1}
    assert counts["ours"]["multi_turn"] == {"A": 1, "B": 1, "C": 0, "D": 0, "A+B": 2}
    assert counts["other"]["all"]["C"] == 1
    with pytest.raises(ValueError, match="rating"):
        owleval.tally({"ours": {"1": "E"}}, items)
    some = [it for it in items if it.id in ("1", "15")]
    page = owleval.render_report(some, {"ours": {1: "one", 15: "fifteen"}}, ratings)
    assert page.count(" checked") == 2 and "<td>2</td>" in page  # A+B over all questions, tallied in the page


def test_owleval_ratings_from_the_command_line(engine, tmp_path):
    task = tasks.get_task("owleval")
    items = task.load(None)
    params = PARAMS.with_(max_new_tokens=4)
    runner.evaluate(lambda: engine, task, items, tmp_path, params, batch_size=64, model=str(CHECKPOINT))
    ratings = tmp_path / "ratings.json"
    ratings.write_text(json.dumps({"mPLUG_Owl_7b:v1": {str(q): "A" for q in range(1, 83)}}))
    assert main(["eval", "owleval", *MODEL, "--max-new-tokens", "4", "--output", str(tmp_path),
                 "--ratings", str(ratings)]) == 0  # fmt: skip
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["ratings"]["mPLUG_Owl_7b:v1"]["all"]["A"] == 82
    assert saved["ratings"]["mPLUG_Owl_7b:v1"]["single_turn"]["A"] == 50
    assert saved["ratings"]["mPLUG_Owl_7b:v1"]["multi_turn"]["A"] == 52
    assert (
        "| mPLUG_Owl_7b:v1 | 82/0/0/0 (82) | 50/0/0/0 (50) | 52/0/0/0 (52) |" in (tmp_path / "results.md").read_text()
    )


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def test_owleval_downloaded_once_into_the_cache(tmp_path, monkeypatch):
    """Without a folder given, OwlEval is downloaded on first use (here from a file:// copy that stands in for
    upstream) into the openowl cache, and read from there afterwards."""
    monkeypatch.delenv("OPENOWL_OWLEVAL")
    monkeypatch.setenv("OPENOWL_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(owleval_data, "OWLEVAL_URL", OWLEVAL.as_uri())
    folder = owleval_data.owleval_dir()
    assert folder.parent == tmp_path / "cache" and list(folder.parent.iterdir()) == [folder]  # no temporary left
    upstream = {name: data for name, data in _files(OWLEVAL).items() if name != "README.md"}
    assert _files(folder) == upstream and len(upstream) == 1 + 6 + 50
    monkeypatch.setattr(owleval_data, "OWLEVAL_URL", (tmp_path / "unreachable").as_uri())
    items = owleval_data.load_owleval()  # from the cache: nothing is downloaded again
    assert len(items) == 82 and items[0].meta["path"] == folder / "cases" / "1.jpg"


def test_owleval_download_cut_short_leaves_nothing(tmp_path):
    def fails_on_an_image(url: str) -> bytes:
        if "/cases/" in url:
            raise ConnectionResetError("connection reset by peer")
        return owleval_data.read_url(url)

    with pytest.raises(RuntimeError, match="cases/.*connection reset"):
        owleval_data.download_owleval(tmp_path / "owleval", OWLEVAL.as_uri(), fails_on_an_image)
    assert list(tmp_path.iterdir()) == []  # the next run starts again


def test_owleval_offline_error_is_clear(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("OPENOWL_OWLEVAL")
    monkeypatch.setenv("OPENOWL_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr("openowl.cli._engine", lambda args: pytest.fail("the model must not load"))
    # OWLEVAL_URL (owleval_copy) names a folder that isn't there: out of reach, as upstream is on an offline machine
    assert main(["eval", "owleval", *MODEL, "--output", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "OwlEval" in err and "could not be downloaded" in err and "--data" in err and "$OPENOWL_OWLEVAL" in err
    assert list((tmp_path / "cache").iterdir()) == []
    with pytest.raises(FileNotFoundError, match="--data"):
        owleval_data.owleval_dir(str(tmp_path))  # a given folder that isn't OwlEval's


def test_multiple_choice_generate_circular_and_likelihood(engine, tmp_path):
    rows = [{"id": f"q{i}", "image": str(IMAGES / f"image{i}.jpg"), "question": "What is shown?",
             "options": ["a cat", "a dog", "a car"], "answer": i, "category": "objects"} for i in range(3)]  # fmt: skip
    path = tmp_path / "mc.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    task = tasks.get_task(str(path))
    items = task.load(None)

    generated = runner.evaluate(lambda: engine, task, items, tmp_path / "gen", PARAMS, show_progress=False)
    answers = {a["id"]: a["answer"] for a in _read(tmp_path / "gen" / "answers.jsonl")}
    assert sorted(answers) == [f"q{i}#{k}" for i in range(3) for k in range(3)]  # every rotation asked
    units = runner.make_units(task, items)
    assert units[1].text.splitlines()[1:] == ["A. a dog", "B. a car", "C. a cat", runner.CHOICE_INSTRUCTION]
    right = {it.id: all(metrics.parse_choice(answers[u.id], u.options) == u.answer_index
                        for u in units if u.item is it) for it in items}  # fmt: skip
    assert generated["scores"]["accuracy"] == sum(right.values()) / 3
    assert "first_rotation_accuracy" in generated["scores"]

    scored = runner.evaluate(lambda: engine, task, items, tmp_path / "ll", PARAMS, method="likelihood",
                             show_progress=False)  # fmt: skip
    records = _read(tmp_path / "ll" / "answers.jsonl")
    assert [r["id"] for r in records] == ["q0", "q1", "q2"]
    for record, item in zip(records, items, strict=True):
        request = runner.conversation_request(engine.processor, [runner.Unit(item.id, item, item.question)], None)
        alone = [continuation_logprobs(engine, [request], [o])[0][0] for o in item.options]  # one row at a time
        assert record["logprobs"] == pytest.approx(alone, abs=1e-4)
        assert record["answer"] == "ABC"[max(range(3), key=alone.__getitem__)]
    assert scored["scores"]["accuracy"] == sum(r["answer"] == "ABC"[i] for i, r in enumerate(records)) / 3


def test_continuation_logprobs_match_a_full_forward(engine):
    processor, model = engine.processor, engine.model

    def alone(prompt: str, images: list, continuation: str) -> float:
        """Sum of log p(token) over the continuation, from one unpadded forward pass over the whole sequence."""
        ids = processor.tokenize_prompt(prompt)
        cont = processor.tokenizer(continuation, add_special_tokens=False)["input_ids"]
        pixels = processor.preprocess_images(images) if images else None
        with torch.no_grad():
            logits = model(torch.tensor([ids + cont]), pixel_values=pixels).logits
        logprobs = logits[0, :-1].log_softmax(-1)
        return sum(float(logprobs[len(ids) - 1 + k, t]) for k, t in enumerate(cont))

    with_image = processor.apply_chat_template([user_message("What is this?", 1, 0)])
    text_only = processor.apply_chat_template([user_message("Hi", 0, 0)])
    rows = [(with_image, [IMAGES / "image1.jpg"], "a big red bus on a street"), (text_only, [], "hello")]
    batched = continuation_logprobs(engine, [Request(p, i) for p, i, _ in rows], [c for _, _, c in rows])
    for (prompt, images, continuation), (score, greedy) in zip(rows, batched, strict=True):
        assert score == pytest.approx(alone(prompt, images, continuation), abs=1e-4) and score < 0
        assert greedy is False  # the tiny model's greedy text is noise
    with pytest.raises(ValueError, match="no tokens"):
        continuation_logprobs(engine, [Request(text_only)], [""])


def test_compare_side_by_side(tmp_path, capsys):
    for name, accuracy in (("small", 0.5), ("big", 0.75)):
        folder = tmp_path / "easy-vqa" / name
        folder.mkdir(parents=True)
        results.write_results({"task": "easy-vqa", "model": name, "n": 4, "scores": {"accuracy": accuracy},
                               "breakdown": {}}, folder)  # fmt: skip
    assert main(["eval", "--compare", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "| big | 4 | 75.0 % |" in out and "| small | 4 | 50.0 % |" in out


CHROMIUM = Path("/usr/bin/chromium")


@pytest.mark.skipif(not CHROMIUM.exists(), reason="needs Debian's chromium (apt-get install chromium)")
def test_report_tallies_ratings_in_the_browser(tmp_path):
    from playwright.sync_api import sync_playwright

    items = [it for it in owleval_data.load_owleval() if it.id in ("1", "15", "16")]
    answers = {"ours": {1: "one", 15: "fifteen", 16: "sixteen"}, "them": {1: "uno", 15: "quince", 16: "dieciseis"}}
    path = tmp_path / "report.html"
    path.write_text(owleval.render_report(items, answers))
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=["--headless", "--no-sandbox"])
        page = browser.new_page(accept_downloads=True)
        page.goto(path.as_uri())
        page.check('input[name="q15-s0"][value="A"]')  # single- and multi-turn
        page.check('input[name="q1-s0"][value="B"]')  # single-turn
        page.check('input[name="q16-s1"][value="D"]')  # multi-turn
        rows = page.locator("#tally tr")
        # Columns: all A, B, C, D, A+B, then the same for single-turn and for multi-turn questions.
        assert rows.nth(1).locator("td").all_inner_texts() == [*"11002", *"11002", *"10001"]
        assert rows.nth(2).locator("td").all_inner_texts() == [*"00010", *"00000", *"00010"]
        page.reload()  # kept in the browser
        assert rows.nth(1).locator("td").all_inner_texts() == [*"11002", *"11002", *"10001"]
        with page.expect_download() as download:
            page.click("#save")
        saved = json.loads(Path(download.value.path()).read_text())
        browser.close()
    assert saved == {"ours": {"15": "A", "1": "B"}, "them": {"16": "D"}}
    assert owleval.tally(saved, items)["ours"]["all"]["A+B"] == 2  # the saved file feeds --ratings


def test_hub_task_from_a_local_copy(tmp_path):
    """A hub benchmark read by `datasets` from a local copy of its repository (parquet with an image column)."""
    import datasets

    rows = {"question_id": ["1", "2", "3", "4"], "question": ["Is there a dog in the image?"] * 4,
            "answer": ["yes", "no", "yes", "no"], "category": ["random", "random", "popular", "popular"],
            "image": [Image.open(IMAGES / f"image{i % 3}.jpg") for i in range(4)]}  # fmt: skip
    text = datasets.Value("string")
    features = {"question_id": text, "question": text, "answer": text, "category": text, "image": datasets.Image()}
    table = datasets.Dataset.from_dict(rows, features=datasets.Features(features))
    (tmp_path / "pope" / "data").mkdir(parents=True)
    table.to_parquet(tmp_path / "pope" / "data" / "test-00000-of-00001.parquet")
    assert main(["eval", "pope", *MODEL, "--data", str(tmp_path / "pope"), "--output", str(tmp_path / "out"),
                 "--max-new-tokens", "2"]) == 0  # fmt: skip
    saved = json.loads((tmp_path / "out" / "results.json").read_text())
    assert saved["n"] == 4 and set(saved["breakdown"]) == {"popular", "random"}
    assert saved["baseline"]["scores"]["accuracy"] == 0.5
    assert set(saved["scores"]) == {"accuracy", "precision", "recall", "f1", "yes_ratio"}


# --- answer caches keyed on what changes an answer, inputs checked first, reference protocols (issue 22) ---------


def test_eval_cache_refuses_other_model_settings_without_loading(tmp_path, monkeypatch, capsys):
    args = ["eval", "easy-vqa", *MODEL, "--limit", "3", "--max-new-tokens", "2", "--output", str(tmp_path)]
    assert main(args) == 0
    settings = json.loads((tmp_path / "settings.json").read_text())
    assert settings["model_folder"] == str(CHECKPOINT.resolve()) and settings["dtype"] == "float32"
    assert settings["quantize"] is None and settings["compile"] is False and settings["device"] == "cpu"
    capsys.readouterr()
    monkeypatch.setattr("openowl.cli._engine", lambda args: pytest.fail("the model must not load"))
    for flags, changed in ((["--quantize", "int4"], "quantize"), (["--dtype", "bfloat16"], "dtype"),
                           (["--compile"], "compile")):  # fmt: skip
        assert main([*args, *flags]) == 2
        err = capsys.readouterr().err
        assert "other settings" in err and changed in err and "accuracy" not in err
    copy = tmp_path.parent / f"{tmp_path.name}-model"
    shutil.copytree(CHECKPOINT, copy)
    assert main([*args[:2], "--model", str(copy), *args[4:]]) == 2  # another folder: another model
    assert "model_folder" in capsys.readouterr().err
    assert main([*args[:4], "--limit", "2", *args[6:]]) == 0  # fewer questions: the same answers, reused


def test_eval_cache_refuses_another_file_of_the_same_name(engine, tmp_path, monkeypatch, capsys):
    first, second = tmp_path / "a" / "bench.jsonl", tmp_path / "b" / "bench.jsonl"
    for path, answer in ((first, "yes"), (second, "no")):
        path.parent.mkdir()
        path.write_text(json.dumps({"id": "1", "question": f"Is it {answer}?", "answer": answer}) + "\n")
    out = ["--output", str(tmp_path / "out"), "--max-new-tokens", "2"]
    assert main(["eval", str(first), *MODEL, *out]) == 0
    capsys.readouterr()
    monkeypatch.setattr("openowl.cli._engine", lambda args: pytest.fail("the model must not load"))
    assert main(["eval", str(second), *MODEL, *out]) == 2
    assert "other settings (data" in capsys.readouterr().err


def test_eval_checks_ids_and_media_before_the_model_loads(tmp_path):
    task = tasks.get_task("easy-vqa")
    items = task.load(None)[:3]
    never = lambda: pytest.fail("the model must not load")  # noqa: E731
    with pytest.raises(ValueError, match="'0' occurs twice"):
        runner.evaluate(never, task, [*items, items[0]], tmp_path / "dup", PARAMS, show_progress=False)
    gone = Item("late", "What?", images=[tmp_path / "gone.png"], answers=["yes"])
    with pytest.raises(FileNotFoundError, match="gone.png"):
        runner.evaluate(never, task, [*items, gone], tmp_path / "gone", PARAMS, show_progress=False)
    with pytest.raises(ValueError, match="no questions"):
        runner.evaluate(never, task, [], tmp_path / "empty", PARAMS, show_progress=False)
    with pytest.raises(ValueError, match="batch size"):
        runner.evaluate(never, task, items, tmp_path / "b0", PARAMS, batch_size=0, show_progress=False)


def test_answers_carry_the_question_id_question_and_reference(tmp_path):
    assert main(["eval", "easy-vqa", *MODEL, "--limit", "2", "--max-new-tokens", "2", "--output", str(tmp_path)]) == 0
    _, items = _easy(2)
    for record, item in zip(_read(tmp_path / "answers.jsonl"), items, strict=True):
        assert record["question_id"] == item.id and record["question"] == item.question
        assert record["reference"] == item.answers[0]


def test_pope_follows_its_reference_protocol():
    parse = metrics.parse_pope
    assert [parse(t) for t in ["There is no dog.", "No", "Yes.", "yes, there is", "It is not there.", "I see a cat"]] \
        == ["no", "no", "yes", "yes", "no", "yes"]  # fmt: skip
    assert metrics.parse_yes_no("There is no dog.") is None  # MME's rule, kept for MME
    pope = tasks.TASKS["pope"]
    assert pope.metric == "pope"
    item = Item("0", "Is there a dog in the image?", answers=["no"], meta={"category": "random"})
    units = runner.make_units(pope, [item])
    assert units[0].text == "Is there a dog in the image?\nAnswer the question using a single word or phrase."
    scored = results.score(pope, units, {"0": {"answer": "There is no dog."}})
    assert scored["scores"]["accuracy"] == 1.0
    assert runner.make_units(tasks.TASKS["mme"], [item])[0].text == item.question  # MME's question says it all


def test_circular_evaluation_only_where_the_benchmark_uses_it():
    item = Item("q", "Which?", options=["a", "b", "c", "d"], answer_index=1)
    assert len(runner.make_units(tasks.TASKS["mmbench"], [item])) == 4
    for name in ("seed-bench", "egoschema"):
        units = runner.make_units(tasks.TASKS[name], [item])
        assert [u.id for u in units] == ["q"] and units[0].text.endswith(runner.CHOICE_INSTRUCTION)
    assert len(runner.make_units(tasks.TASKS["seed-bench"], [item], circular=True)) == 4  # --circular
