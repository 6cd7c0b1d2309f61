"""Loaders for the Hugging Face datasets versions of MME, POPE, MMBench, SEED-Bench, HallusionBench and EgoSchema
(lmms-lab's copies, as lmms-eval reads them). `datasets` reads them from the hub, its cache, or a local copy of the
dataset repository; without any of these the error says so and what to do instead.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from pathlib import Path

from openowl.eval.items import Item
from openowl.eval.metrics import LETTERS


def hub_rows(repo: str, config: str | None, split: str, data: str | None = None):
    """A `datasets.Dataset` from the hub (or its cache), or from a local copy of the repository at `data`.

    Raises:
        ImportError: `datasets` is not installed.
        RuntimeError: the dataset is neither cached nor reachable (offline machine), saying what to do.
    """
    try:
        import datasets
    except ImportError as err:
        raise ImportError(f'{repo} is read with the `datasets` package: pip install -e ".[eval]"') from err
    try:
        return datasets.load_dataset(data or repo, config, split=split)
    except Exception as err:  # the hub's errors vary (ConnectionError, OfflineModeIsEnabled, DatasetNotFoundError)
        raise RuntimeError(
            f"could not load the dataset {repo} (config {config}, split {split}) from {data or 'the Hugging Face hub'}"
            f": {err}. Without access to the hub, copy the dataset's repository to this machine and pass its folder "
            "with --data, or write the benchmark in the jsonl task format (README, Evaluation) and run "
            "`openowl eval FILE.jsonl`."
        ) from err


class _Cell:
    """A dataset cell read when called (images are decoded one row at a time, when their batch runs)."""

    def __init__(self, rows, index: int, column: str):
        self.rows, self.index, self.column = rows, index, column

    def __call__(self):
        return self.rows[self.index][self.column]


def _metadata(rows, media: Sequence[str]) -> list[dict]:
    """The rows without their media columns (cheap to read: no image is decoded)."""
    if hasattr(rows, "remove_columns"):
        return rows.remove_columns([c for c in media if c in rows.column_names]).to_list()
    return [{k: v for k, v in row.items() if k not in media} for row in rows]


def _present(value) -> bool:
    return value is not None and str(value).strip() not in ("", "nan", "None")


def mme_items(rows) -> list[Item]:
    """lmms-lab/MME: image, question (ends in "Please answer yes or no."), answer Yes/No, category; question_id
    names the image, which is asked two questions."""
    return [
        Item(
            id=str(i),
            question=r["question"],
            images=[_Cell(rows, i, "image")],
            answers=[r["answer"].lower()],
            meta={"category": r["category"], "pair": r["question_id"]},
        )
        for i, r in enumerate(_metadata(rows, ["image"]))
    ]


def pope_items(rows) -> list[Item]:
    """lmms-lab/POPE: image, question, answer yes/no, category (adversarial / popular / random)."""
    return [
        Item(
            id=str(i),
            question=r["question"],
            images=[_Cell(rows, i, "image")],
            answers=[r["answer"].lower()],
            meta={"category": r["category"], **({"question_id": r["question_id"]} if "question_id" in r else {})},
        )
        for i, r in enumerate(_metadata(rows, ["image"]))
    ]


def mmbench_items(rows) -> list[Item]:
    """lmms-lab/MMBench (en, dev): hint, question, options A-D, answer letter. Rows with index >= 1e6 are the
    dataset's own rotated copies; they are dropped (the runner rotates the options itself)."""
    items = []
    for i, r in enumerate(_metadata(rows, ["image"])):
        if int(r["index"]) >= 1_000_000:
            continue
        options = [str(r[c]) for c in "ABCD" if c in r and _present(r[c])]
        question = f"{r['hint']}\n{r['question']}" if _present(r.get("hint")) else r["question"]
        items.append(
            Item(
                id=str(r["index"]),
                question=question,
                images=[_Cell(rows, i, "image")],
                options=options,
                answer_index=LETTERS.index(r["answer"]),
                meta={"category": r["category"]},
            )
        )
    return items


def seed_bench_items(rows) -> list[Item]:
    """lmms-lab/SEED-Bench: question, choice_a-d, answer letter, data_type image / video (`image` holds the
    picture or the video's frames, given to the model as images)."""
    return [
        Item(
            id=str(r["question_id"]),
            question=r["question"],
            images=[_Cell(rows, i, "image")],
            options=[r[f"choice_{c}"] for c in "abcd"],
            answer_index=LETTERS.index(r["answer"]),
            meta={"category": r["data_type"], "question_type": r["question_type_id"]},
        )
        for i, r in enumerate(_metadata(rows, ["image"]))
    ]


def hallusion_items(rows, split: str) -> list[Item]:
    """lmms-lab/HallusionBench: yes/no questions (gt_answer "1" = yes) grouped by set, figure and question."""
    keys = ("category", "subcategory", "set_id", "figure_id", "question_id")
    return [
        Item(
            id=f"{split}-{i}",
            question=r["question"],
            images=[_Cell(rows, i, "image")] if split == "image" else [],
            answers=["yes" if str(r["gt_answer"]) == "1" else "no"],
            meta={k: r[k] for k in keys},
        )
        for i, r in enumerate(_metadata(rows, ["image"]))
    ]


def egoschema_items(rows, video_dir: Path) -> list[Item]:
    """lmms-lab/egoschema (Subset: the 500 questions with public answers): five options "A. ..." and the
    answer's index; the videos are `<video_idx>.mp4` files in `video_dir`."""
    return [
        Item(
            id=str(r["video_idx"]),
            question=r["question"],
            videos=[video_dir / f"{r['video_idx']}.mp4"],
            options=[re.sub(r"^[A-E]\.\s*", "", o).strip() for o in r["option"]],
            answer_index=int(r["answer"]),
        )
        for r in _metadata(rows, [])
    ]


def _load_hallusion(data: str | None) -> list[Item]:
    return [
        it
        for split in ("image", "non_image")
        for it in hallusion_items(hub_rows("lmms-lab/HallusionBench", None, split, data), split)
    ]


def _load_egoschema(data: str | None) -> list[Item]:
    hf_home = Path(os.environ.get("HF_HOME", Path.home() / ".cache" / "huggingface"))
    video_dir = Path(data) if data else hf_home / "egoschema" / "videos"
    items = egoschema_items(hub_rows("lmms-lab/egoschema", "Subset", "test"), video_dir)
    missing = [str(v) for it in items for v in it.videos if not Path(v).is_file()]
    if missing:
        raise FileNotFoundError(
            f"{len(missing)} EgoSchema videos are missing, e.g. {missing[0]} (unzip the "
            "dataset's videos there, or give their folder with --data)"
        )
    return items


LOADERS = {
    "mme": lambda data: mme_items(hub_rows("lmms-lab/MME", None, "test", data)),
    "pope": lambda data: pope_items(hub_rows("lmms-lab/POPE", None, "test", data)),
    "mmbench": lambda data: mmbench_items(hub_rows("lmms-lab/MMBench", "en", "dev", data)),
    "seed-bench": lambda data: seed_bench_items(hub_rows("lmms-lab/SEED-Bench", None, "test", data)),
    "hallusionbench": _load_hallusion,
    "egoschema": _load_egoschema,
}
