"""Jsonl files of questions and of answers: reading questions with their media paths, and reading back an answers
file that an interrupted run may have cut (its last line is dropped, to be answered again)."""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any


def read_rows(path: Path) -> list[tuple[int, dict[str, Any]]]:
    """`(line number, object)` for each non-blank line.

    Raises:
        FileNotFoundError: no such file.
        ValueError: a line that isn't JSON, naming the file and line.
    """
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    rows = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rows.append((number, json.loads(line)))
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}:{number}: not valid JSON ({err})") from err
    return rows


def read_questions(path: Path) -> list[dict[str, Any]]:
    """Questions from a jsonl file: objects with "question" (or "prompt"), optional "id" (default: the line
    number), "image" / "images" (a path or a list) and "video".

    Raises:
        FileNotFoundError, ValueError: naming the file and line.
    """
    questions = []
    for number, row in read_rows(path):
        question = row.get("question", row.get("prompt")) if isinstance(row, dict) else None
        if not isinstance(question, str):
            raise ValueError(f"{path}:{number}: expected an object with a 'question' string")
        questions.append({
            "id": row.get("id", row.get("question_id", number)),
            "question": question,
            "images": as_list(row.get("image", row.get("images"))),
            "videos": as_list(row.get("video")),
        })  # fmt: skip
    return questions


def read_answers(path: Path) -> list[dict[str, Any]]:
    """Answers already written; a last line cut by an interrupted run is dropped (it will be recomputed), and the
    file is left ending with a newline, so that the next answer is not glued to the last one.

    Raises:
        ValueError: a line other than the last that isn't JSON.
    """
    if not path.exists():
        return []
    text = path.read_text()
    rows, lines = [], text.splitlines()
    for number, line in enumerate(lines, start=1):
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            if number != len(lines):
                raise ValueError(f"{path}:{number}: not valid JSON; fix or remove the line") from None
    if len(rows) < len(lines) or (text and not text.endswith("\n")):
        path.write_text("".join(f"{x}\n" for x in lines[: len(rows)]))
    return rows


def as_list(value: Any) -> list:
    """None -> [], a string -> [it], a sequence -> a list."""
    return [] if value is None else [value] if isinstance(value, str) else list(value)


def check_unique_ids(ids: Iterable, where: str) -> None:
    """Raises ValueError naming the first id that occurs twice."""
    seen: set = set()
    for key in ids:
        if key in seen:
            raise ValueError(f"{where}: the id {key!r} occurs twice; ids must be unique")
        seen.add(key)
