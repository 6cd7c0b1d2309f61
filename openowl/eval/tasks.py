"""Benchmarks as lists of `Item`s: the task registry, the generic jsonl format and the loaders.

Built in and offline: `easy-vqa` (the `easy-vqa` package's test split) and `owleval` (the upstream OwlEval files).
From the Hugging Face hub (`hub.py`; or its cache, or a local copy given as `data`): MME, POPE, MMBench, SEED-Bench,
HallusionBench, EgoSchema. Any other benchmark runs from a jsonl file (`load_jsonl`; the format is in the README).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

from openowl.eval.metrics import LETTERS

METRICS = ("exact", "vqa", "yes-no", "mme", "hallusion", "choice", "caption", "none")
REPO_ROOT = Path(__file__).resolve().parents[2]


@dataclass
class Item:
    """One question. Media entries are paths, PIL images, or zero-argument callables that return one or a list."""

    id: str
    question: str
    images: list = field(default_factory=list)
    videos: list = field(default_factory=list)  # video files or frame lists
    answers: list[str] = field(default_factory=list)  # reference answers (several for VQA and captions)
    options: list[str] = field(default_factory=list)  # multiple choice
    answer_index: int | None = None  # the right option
    conversation: str | None = None  # items with the same key are turns of one conversation, in list order
    meta: dict[str, Any] = field(default_factory=dict)  # "category" is the breakdown key of the results


@dataclass(frozen=True)
class Task:
    name: str
    description: str
    metric: str  # one of METRICS
    load: Callable[[str | None], list[Item]]  # data location (None: the default) -> items
    max_new_tokens: int = 10


# --- the generic jsonl format ------------------------------------------------------------------------


def load_jsonl(path: str | Path) -> list[Item]:
    """Items from a jsonl file: `question`, optional `id`, `image` (a path or a list, relative to the file),
    `video`, `answer` (a string, or a list of references), `options` with `answer` as a letter, an index or the
    option's text, `conversation`, `category`; other fields are kept in `meta`.

    Raises:
        FileNotFoundError, ValueError: naming the file and line.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    items = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            items.append(_jsonl_item(row, number, path.parent))
        except (json.JSONDecodeError, ValueError, TypeError) as err:
            raise ValueError(f"{path}:{number}: {err}") from err
    if not items:
        raise ValueError(f"{path}: no questions")
    if len({it.id for it in items}) < len(items):
        raise ValueError(f"{path}: ids must be unique")
    return items


_KNOWN = {
    "id",
    "question_id",
    "question",
    "prompt",
    "image",
    "images",
    "video",
    "videos",
    "answer",
    "answers",
    "options",
    "conversation",
}


def _jsonl_item(row: dict, number: int, base: Path) -> Item:
    if not isinstance(row, dict) or not isinstance(row.get("question", row.get("prompt")), str):
        raise ValueError("expected an object with a 'question' string")
    answers = row.get("answer", row.get("answers"))
    answers = [] if answers is None else [answers] if not isinstance(answers, list) else answers
    item = Item(
        id=str(row.get("id", row.get("question_id", number))),
        question=row.get("question", row.get("prompt")),
        images=[base / p for p in _as_list(row.get("image", row.get("images")))],
        videos=[base / p for p in _as_list(row.get("video", row.get("videos")))],
        answers=[str(a) for a in answers],
        options=[str(o) for o in row.get("options", [])],
        conversation=None if row.get("conversation") is None else str(row["conversation"]),
        meta={k: v for k, v in row.items() if k not in _KNOWN},
    )
    if item.options:
        if len(answers) != 1:
            raise ValueError("a multiple-choice question needs one 'answer' (a letter, an index or the option)")
        item.answer_index = _option_index(answers[0], item.options)
    return item


def _option_index(answer, options: list[str]) -> int:
    if isinstance(answer, int) and 0 <= answer < len(options):
        return answer
    if isinstance(answer, str) and answer in LETTERS[: len(options)]:
        return LETTERS.index(answer)
    if str(answer) in options:
        return options.index(str(answer))
    raise ValueError(f"answer {answer!r} is neither a letter, an index nor one of the options")


def _as_list(value) -> list:
    return [] if value is None else [value] if isinstance(value, str) else list(value)


def infer_metric(items: Sequence[Item]) -> str:
    """choice when there are options; yes-no when every answer is yes / no; vqa with several references; else
    exact; none without answers."""
    if any(it.options for it in items):
        return "choice"
    answers = [a.strip().lower() for it in items for a in it.answers]
    if not answers:
        return "none"
    if set(answers) <= {"yes", "no"}:
        return "yes-no"
    return "vqa" if any(len(it.answers) > 1 for it in items) else "exact"


# --- built in, offline ---------------------------------------------------------------------------------

SHAPES = {"circle", "rectangle", "triangle"}


def easy_vqa_type(answer: str) -> str:
    """easy-vqa's question type, read off the answer: yes/no, shape or colour."""
    return "yes/no" if answer in ("yes", "no") else "shape" if answer in SHAPES else "colour"


def load_easy_vqa(data: str | None = None) -> list[Item]:
    """The test split of the `easy-vqa` package (9,673 questions on 1,000 images), in the package's order."""
    try:
        import easy_vqa
    except ImportError as err:
        raise ImportError('the easy-vqa task needs the easy-vqa package: pip install -e ".[eval]"') from err
    if data not in (None, "test"):
        raise ValueError(f"easy-vqa has only its test split here, not {data!r}")
    texts, answers, image_ids = easy_vqa.get_test_questions()
    paths = easy_vqa.get_test_image_paths()
    return [
        Item(id=str(i), question=q, images=[paths[image]], answers=[a], meta={"category": easy_vqa_type(a)})
        for i, (q, a, image) in enumerate(zip(texts, answers, image_ids, strict=True))
    ]


def owleval_dir(data: str | None = None) -> Path:
    """The OwlEval folder: `data`, else `$OPENOWL_OWLEVAL`, else `../shared/owleval` beside the repository."""
    folder = Path(data or os.environ.get("OPENOWL_OWLEVAL") or REPO_ROOT.parent / "shared" / "owleval")
    if not (folder / "questions.jsonl").is_file():
        raise FileNotFoundError(f"{folder}: no OwlEval questions.jsonl there (give the folder with --data)")
    return folder


def load_owleval(data: str | None = None) -> list[Item]:
    """The 82 OwlEval questions in question_id order; the questions on one image form one conversation, whose
    first question carries the image (`meta["path"]` has it for every question)."""
    folder = owleval_dir(data)
    rows = [json.loads(line) for line in (folder / "questions.jsonl").read_text().splitlines() if line.strip()]
    items, seen = [], set()
    for row in sorted(rows, key=lambda r: r["question_id"]):
        path = folder / "cases" / row["image"]
        meta = {"image": row["image"], "path": path, "ability": row["ability"], "category": ",".join(row["category"])}
        items.append(
            Item(
                id=str(row["question_id"]),
                question=row["question"],
                images=[] if row["image"] in seen else [path],
                conversation=row["image"],
                meta=meta,
            )
        )
        seen.add(row["image"])
    return items


def _hub(name: str, data: str | None) -> list[Item]:
    from openowl.eval import hub  # imports `datasets` only when called

    return hub.LOADERS[name](data)


TASKS: dict[str, Task] = {
    t.name: t
    for t in [
        Task("easy-vqa", "easy-vqa test split (offline): shapes, colours, yes/no; exact match", "exact", load_easy_vqa),
        Task(
            "owleval",
            "OwlEval: 82 open questions on 50 images, rated by people (HTML report)",
            "none",
            load_owleval,
            max_new_tokens=512,
        ),
        Task(
            "mme",
            "MME (lmms-lab/MME): yes/no, acc + acc+ per subtask",
            "mme",
            partial(_hub, "mme"),
        ),
        Task(
            "pope",
            "POPE (lmms-lab/POPE): object hallucination, yes/no",
            "yes-no",
            partial(_hub, "pope"),
        ),
        Task(
            "mmbench",
            "MMBench dev, English (lmms-lab/MMBench): multiple choice, circular",
            "choice",
            partial(_hub, "mmbench"),
        ),
        Task(
            "seed-bench",
            "SEED-Bench (lmms-lab/SEED-Bench): multiple choice, image and video",
            "choice",
            partial(_hub, "seed-bench"),
        ),
        Task(
            "hallusionbench",
            "HallusionBench (lmms-lab/HallusionBench): yes/no pairs",
            "hallusion",
            partial(_hub, "hallusionbench"),
            max_new_tokens=32,
        ),
        Task(
            "egoschema",
            "EgoSchema subset (lmms-lab/egoschema): 5-way video multiple choice",
            "choice",
            partial(_hub, "egoschema"),
        ),
    ]
}


def get_task(name: str, metric: str | None = None) -> Task:
    """A registered task, or a task read from a `.jsonl` file (its metric inferred unless given).

    Raises:
        ValueError: an unknown task name or metric.
    """
    if metric is not None and metric not in METRICS:
        raise ValueError(f"unknown metric {metric!r}; choose from {', '.join(METRICS)}")
    if name in TASKS:
        task = TASKS[name]
        return task if metric is None else Task(task.name, task.description, metric, task.load, task.max_new_tokens)
    if name.endswith(".jsonl"):
        items = load_jsonl(name)  # read now: errors show before the model loads
        chosen = metric or infer_metric(items)
        return Task(
            Path(name).stem,
            f"questions from {name}",
            chosen,
            lambda _: items,
            max_new_tokens=32 if chosen == "caption" else 256 if chosen == "none" else 10,
        )
    raise ValueError(f"unknown task {name!r}: use one of {', '.join(TASKS)} or a .jsonl file (openowl eval --list)")
