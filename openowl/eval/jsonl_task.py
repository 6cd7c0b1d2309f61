"""Any benchmark written as a jsonl file (the task format of docs/evaluation.md), read as items, and the metric
its answers call for when none is given."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from openowl.data.jsonl import as_list, check_unique_ids, read_rows
from openowl.eval.items import Item
from openowl.eval.metrics import LETTERS

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


def load_jsonl(path: str | Path) -> list[Item]:
    """Items from a jsonl file: `question`, optional `id`, `image` (a path or a list, relative to the file),
    `video`, `answer` (a string, or a list of references), `options` with `answer` as a letter, an index or the
    option's text, `conversation`, `category`; other fields are kept in `meta`.

    Raises:
        FileNotFoundError, ValueError: naming the file and line.
    """
    path = Path(path)
    items = []
    for number, row in read_rows(path):
        try:
            items.append(_jsonl_item(row, number, path.parent))
        except (ValueError, TypeError) as err:
            raise ValueError(f"{path}:{number}: {err}") from err
    if not items:
        raise ValueError(f"{path}: no questions")
    check_unique_ids((it.id for it in items), str(path))
    return items


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


def _jsonl_item(row: dict, number: int, base: Path) -> Item:
    if not isinstance(row, dict) or not isinstance(row.get("question", row.get("prompt")), str):
        raise ValueError("expected an object with a 'question' string")
    answers = row.get("answer", row.get("answers"))
    answers = [] if answers is None else [answers] if not isinstance(answers, list) else answers
    item = Item(
        id=str(row.get("id", row.get("question_id", number))),
        question=row.get("question", row.get("prompt")),
        images=[base / p for p in as_list(row.get("image", row.get("images")))],
        videos=[base / p for p in as_list(row.get("video", row.get("videos")))],
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
