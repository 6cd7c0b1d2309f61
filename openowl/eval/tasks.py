"""The task registry: every built-in benchmark's name, metric and loader, and `get_task`, which also turns a
`.jsonl` file into a task.

Built in: `easy-vqa` (the `easy-vqa` package's test split, loaded here, offline) and `owleval` (upstream's OwlEval
files, downloaded once: `owleval_data`). From the Hugging Face hub (`hub`, which imports `datasets` only when a
loader runs; or its cache, or a local copy given as `data`): MME, POPE, MMBench, SEED-Bench, HallusionBench,
EgoSchema. Any other benchmark runs from a jsonl file (`jsonl_task`; the format is in docs/evaluation.md).
"""

from __future__ import annotations

import dataclasses
import random
from pathlib import Path

from openowl.data.easy_vqa import question_type
from openowl.eval import hub
from openowl.eval.items import METRICS, Item, Task
from openowl.eval.jsonl_task import infer_metric, load_jsonl
from openowl.eval.owleval_data import load_owleval


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
        Item(id=str(i), question=q, images=[paths[image]], answers=[a], meta={"category": question_type(a)})
        for i, (q, a, image) in enumerate(zip(texts, answers, image_ids, strict=True))
    ]


SCENES_PER_KIND = 100
SCENES_SEED = 1_000_003  # the held-out set: a seed and fonts that `openowl data scenes` never trains on


def load_scenes(data: str | None = None) -> list[Item]:
    """The held-out scene questions (`openowl.data.scenes`): 100 of each kind, drawn with their own seed in the test
    fonts; `data` = "N" asks for N of each kind."""
    from openowl.data import scenes

    if data is not None and not data.isdigit():
        raise ValueError(f"the scenes task takes --data N (questions of each kind), not {data!r}")
    per_kind = SCENES_PER_KIND if data is None else int(data)
    items = []
    for q in scenes.question_set(per_kind, SCENES_SEED, scenes.TEST_FONTS):
        images = [lambda s=s, key=f"{q.id}-{n}": scenes.draw(s, random.Random(key)) for n, s in enumerate(q.scenes)]
        items.append(Item(id=q.id, question=q.question, images=images, answers=[q.answer],
                          conversation=q.conversation, meta={"category": q.kind}))  # fmt: skip
    return items


SHORT_ANSWER = "\nAnswer the question using a single word or phrase."  # lmms-eval's POPE post-prompt

TASKS: dict[str, Task] = {
    t.name: t
    for t in [
        Task("easy-vqa", "easy-vqa test split (offline): shapes, colours, yes/no; exact match", "exact", load_easy_vqa),
        Task(
            "scenes",
            "drawn scenes, held out: counting, numbers, positions, two images, two turns; exact match",
            "exact",
            load_scenes,
        ),
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
            hub.LOADERS["mme"],
        ),
        Task(
            "pope",
            "POPE (lmms-lab/POPE): object hallucination, yes/no",
            "pope",
            hub.LOADERS["pope"],
            prompt_suffix=SHORT_ANSWER,
        ),
        Task(
            "mmbench",
            "MMBench dev, English (lmms-lab/MMBench): multiple choice, circular",
            "choice",
            hub.LOADERS["mmbench"],
        ),
        Task(
            "seed-bench",
            "SEED-Bench (lmms-lab/SEED-Bench): multiple choice, image and video",
            "choice",
            hub.LOADERS["seed-bench"],
            circular=False,
        ),
        Task(
            "hallusionbench",
            "HallusionBench (lmms-lab/HallusionBench): yes/no pairs",
            "hallusion",
            hub.LOADERS["hallusionbench"],
            max_new_tokens=32,
        ),
        Task(
            "egoschema",
            "EgoSchema subset (lmms-lab/egoschema): 5-way video multiple choice",
            "choice",
            hub.LOADERS["egoschema"],
            circular=False,
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
        return task if metric is None else dataclasses.replace(task, metric=metric)
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
