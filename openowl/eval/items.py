"""The data types every benchmark is made of: an `Item` (one question) and a `Task` (a named list of them with its
metric). Loaders (`tasks`, `hub`, `jsonl_task`, `owleval_data`), the runner and the scorers all share them."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

METRICS = ("exact", "vqa", "yes-no", "pope", "mme", "hallusion", "choice", "caption", "none")


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
    """A benchmark: its name, what it is, how it is scored and how its items are read."""

    name: str
    description: str
    metric: str  # one of METRICS
    load: Callable[[str | None], list[Item]]  # data location (None: the default) -> items
    max_new_tokens: int = 10
    prompt_suffix: str = ""  # appended to each question (the reference protocol's instruction), choice tasks aside
    circular: bool = True  # multiple choice: the default of --circular (MMBench's CircularEval)
