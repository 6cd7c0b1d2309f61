"""Answer a task's items with the engine — batched, resumable — then score them and write the results.

Output folder: `answers.jsonl` (one line per answer, appended and flushed batch by batch: a rerun skips the ids it
holds; each line carries the dataset's question id, the question as sent and the reference, for audits),
`settings.json` (what the answers depend on: the model's identity, dtype, quantization, compile, the data's
content, the prompt and the sampling; a rerun with other settings is refused, naming them: `infer.answering`),
`results.json` and `results.md`. The prompts are built by `processor.apply_chat_template`; the questions of one
conversation are asked in order, each after the earlier questions and their answers.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from openowl.data.jsonl import check_unique_ids, read_answers
from openowl.eval.items import Item, Task
from openowl.eval.likelihood import continuation_logprobs
from openowl.eval.metrics import LETTERS, circular_options
from openowl.eval.owleval import tally, write_owleval
from openowl.eval.results import score, write_results
from openowl.infer.answering import (
    check_media_files,
    check_settings,
    content_digest,
    media_stamp,
    sampling_settings,
)
from openowl.infer.engine import Engine, Request
from openowl.infer.sampling import SamplingParams
from openowl.prompts import assistant_message, user_message
from openowl.video import load_video_frames

CHOICE_INSTRUCTION = "Answer with the option's letter from the given choices directly."


@dataclass
class Unit:
    """One model call's worth of question: an item, or one rotation of a multiple-choice item's options."""

    id: str  # its key in answers.jsonl
    item: Item
    text: str  # the user message's text
    options: list[str] = field(default_factory=list)  # in this unit's order
    answer_index: int | None = None


def model_label(model: str) -> str:
    """A folder-safe name for a model: a hub id's `owner__name`, a folder's last two parts."""
    path = Path(model)
    parts = path.resolve().parts[-2:] if path.exists() else Path(model.strip("/")).parts
    return "__".join(p for p in parts if p not in ("", ".", "..")) or "model"


# --- the answer cache ----------------------------------------------------------------------------


class AnswerCache:
    """answers.jsonl as a dict by id; `add` appends and flushes. A line cut by a killed run is dropped (and answered
    again): the file is read by `read_answers`, as `openowl generate --input` reads its own."""

    def __init__(self, path: Path):
        self.path = path
        self.records: dict[str, dict] = {record["id"]: record for record in read_answers(path)}

    def __contains__(self, key: str) -> bool:
        return key in self.records

    def __getitem__(self, key: str) -> dict:
        return self.records[key]

    def add(self, records: Sequence[dict]) -> None:
        with self.path.open("a") as out:
            out.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
            out.flush()
        self.records.update((r["id"], r) for r in records)


# --- units and prompts ---------------------------------------------------------------------------


def choice_text(question: str, options: Sequence[str]) -> str:
    lines = [f"{LETTERS[i]}. {option}" for i, option in enumerate(options)]
    return "\n".join([question, *lines, CHOICE_INSTRUCTION])


def make_units(task: Task, items: Sequence[Item], method: str = "generate", circular: bool | None = None) -> list[Unit]:
    """The model calls a task needs: one per item (its question and the task's `prompt_suffix`), or, for multiple
    choice generated with `circular` (default: the task's own protocol), one per rotation of the options (MMBench's
    CircularEval). `method="likelihood"` scores each option's text instead."""
    check_items(task, items)
    circular = task.circular if circular is None else circular
    if task.metric != "choice":
        return [Unit(it.id, it, it.question + task.prompt_suffix) for it in items]
    units = []
    for it in items:
        if method == "likelihood":
            units.append(Unit(it.id, it, it.question, list(it.options), it.answer_index))
            continue
        variants = circular_options(it.options, it.answer_index) if circular else [(it.options, it.answer_index)]
        for k, (options, answer) in enumerate(variants):
            unit_id = f"{it.id}#{k}" if circular else it.id
            units.append(Unit(unit_id, it, choice_text(it.question, options), list(options), answer))
    return units


HALLUSION_FIELDS = ("category", "subcategory", "set_id", "figure_id", "question_id")


def check_items(task: Task, items: Sequence[Item]) -> None:
    """Raises ValueError, naming the first item that lacks what the task's metric needs or whose id is taken, and
    FileNotFoundError for the first media file that is missing: all before the model loads."""
    if not items:
        raise ValueError(f"{task.name}: no questions to answer")
    check_unique_ids((it.id for it in items), task.name)
    check_media_files((f"{task.name}: item {it.id}", m) for it in items for m in _media_paths(it))
    for it in items:
        if task.metric == "choice" and (not it.options or it.answer_index is None):
            raise ValueError(f"item {it.id}: the choice metric needs options and the right one")
        if task.metric == "choice" and it.conversation is not None:
            raise ValueError(f"item {it.id}: multiple-choice questions can't be conversation turns")
        if task.metric not in ("choice", "none") and not it.answers:
            raise ValueError(f"item {it.id}: the {task.metric} metric needs an answer")
        missing = [k for k in HALLUSION_FIELDS if k not in it.meta] if task.metric == "hallusion" else []
        if missing:
            raise ValueError(f"item {it.id}: the hallusion metric needs the fields {', '.join(missing)}")


def _media_paths(item: Item) -> list[Path]:
    return [Path(m) for m in [*item.images, *item.videos] if isinstance(m, str | Path)]


def item_digest(item: Item) -> str:
    """An item's content: its id, question, references, options, conversation, fields, and each media file's size
    and modification time (an image read from a dataset is covered by its row's fields). Each answer line keeps the
    digest of its item, so that answers to other data (another file of the same name) are never reused, while
    another `--limit` still reuses the answers it shares."""
    fields = [item.id, item.question, item.answers, item.options, item.answer_index, item.conversation, item.meta]
    return content_digest([*fields, [media_stamp(p) for p in _media_paths(item)]])


def check_cached_data(units: Sequence[Unit], cache: AnswerCache, output: Path) -> None:
    """Raises ValueError when a cached answer was made for an item whose content has changed since."""
    digests: dict[int, str] = {}
    for unit in units:
        if unit.id in cache:
            digest = digests.setdefault(id(unit.item), item_digest(unit.item))
            if cache[unit.id].get("data") != digest:
                raise ValueError(
                    f"{output} holds answers made with other settings (data: item {unit.item.id} is not the "
                    "question it answered): use another --output, or delete the folder to start again"
                )


def conversations(units: Sequence[Unit]) -> list[list[Unit]]:
    """Units grouped into conversations (a unit without a conversation is one on its own), in order."""
    groups: dict[str, list[Unit]] = {}
    out: list[list[Unit]] = []
    for unit in units:
        key = unit.item.conversation
        if key is None:
            out.append([unit])
        else:
            if key not in groups:
                groups[key] = []
                out.append(groups[key])
            groups[key].append(unit)
    return out


def media(item: Item) -> tuple[list, list]:
    """The item's images and videos, read: callables called (a list result is several images), video files
    decoded into frames."""
    images = []
    for image in item.images:
        value = image() if callable(image) else image
        images += value if isinstance(value, list) else [value]
    videos = []
    for video in item.videos:
        if isinstance(video, str | Path):
            video = load_video_frames(video)
        videos.append(video)
    return images, videos


def conversation_request(processor, turns: Sequence[Unit], cache: AnswerCache) -> Request:
    """The request for the last of `turns`: the earlier turns with their cached answers, then its question."""
    messages, images, videos = [], [], []
    for k, unit in enumerate(turns):
        turn_images, turn_videos = media(unit.item)
        images += turn_images
        videos += turn_videos
        messages.append(user_message(unit.text, len(turn_images), len(turn_videos)))
        if k + 1 < len(turns):
            messages.append(assistant_message(cache[unit.id]["answer"]))
    return Request(processor.apply_chat_template(messages), images, videos)


def served_turns(turns: Sequence[Unit], cache: AnswerCache) -> list:
    """`turns` for a served model (`client.ServerClient`): each question with its images and its cached answer
    (None for the last)."""
    out = []
    for k, unit in enumerate(turns):
        images, videos = media(unit.item)
        if videos:
            raise ValueError(f"item {unit.item.id}: --server sends images only; ask video tasks of a local model")
        out.append((unit.text, images, cache[unit.id]["answer"] if k + 1 < len(turns) else None))
    return out


def _answers(engine, batch: list[list[Unit]], cache: AnswerCache, params: SamplingParams) -> list[tuple[str, str]]:
    """(text, finish reason) for the last turn of each conversation of `batch`, from an engine or a server."""
    from openowl.eval.client import ServerClient

    if isinstance(engine, ServerClient):
        return engine.answer([served_turns(turns, cache) for turns in batch], params)
    requests = [conversation_request(engine.processor, turns, cache) for turns in batch]
    return [(c.text, c.finish_reason) for c in engine.generate(requests, params)]


# --- answering -----------------------------------------------------------------------------------


def _audit(unit: Unit) -> dict:
    """What an answers.jsonl line carries besides the answer: the dataset's question id, the question as sent, and
    the reference (the right option's letter in this unit's order, for multiple choice)."""
    item = unit.item
    reference = LETTERS[unit.answer_index] if unit.answer_index is not None else item.answers
    if isinstance(reference, list) and len(reference) == 1:
        reference = reference[0]
    question_id = item.meta.get("question_id", item.meta.get("pair", item.id))  # MME's question_id is its "pair"
    audit = {"id": unit.id, "question_id": question_id, "question": unit.text, "reference": reference}
    return {**audit, "data": item_digest(item)}


def answer_by_generation(
    engine, convs: list[list[Unit]], cache: AnswerCache, batch_size: int, params: SamplingParams, progress
) -> None:
    """Round by round, the next unanswered turn of every conversation, in batches (`engine`: an `Engine`, or a
    `client.ServerClient` for a served model)."""
    while True:
        todo = []
        for conv in convs:
            k = next((k for k, u in enumerate(conv) if u.id not in cache), None)
            if k is not None:
                todo.append(conv[: k + 1])
        if not todo:
            return
        for start in range(0, len(todo), batch_size):
            batch = todo[start : start + batch_size]
            answers = _answers(engine, batch, cache, params)
            cache.add(
                [
                    {**_audit(turns[-1]), "answer": text, "finish_reason": reason}
                    for turns, (text, reason) in zip(batch, answers, strict=True)
                ]
            )
            progress(len(batch))


def answer_by_likelihood(engine: Engine, units: list[Unit], cache: AnswerCache, batch_size: int, progress) -> None:
    """Each option's text scored as the continuation of the bare question; the answer is the likeliest letter."""
    todo = [u for u in units if u.id not in cache]
    for start in range(0, len(todo), batch_size):
        batch = todo[start : start + batch_size]
        requests, continuations = [], []
        for unit in batch:
            request = conversation_request(engine.processor, [unit], cache)
            requests += [request] * len(unit.options)
            continuations += unit.options
        scores = iter(continuation_logprobs(engine, requests, continuations))
        records = []
        for unit in batch:
            logprobs = [next(scores)[0] for _ in unit.options]
            best = max(range(len(logprobs)), key=logprobs.__getitem__)
            records.append({**_audit(unit), "answer": LETTERS[best], "logprobs": logprobs})
        cache.add(records)
        progress(len(batch))


def evaluate(
    make_engine: Callable[[], Engine],
    task: Task,
    items: Sequence[Item],
    output: str | Path,
    params: SamplingParams,
    batch_size: int = 8,
    method: str = "generate",
    circular: bool | None = None,
    model: str = "model",
    data: str | None = None,
    ratings: dict | None = None,
    show_progress: bool = True,
    engine_settings: dict | None = None,
) -> dict:
    """Answer what answers.jsonl in `output` lacks, score every item, write results.json and results.md.

    Args:
        make_engine: called only when something is left to answer: an `Engine`, or a `client.ServerClient` (a
            served model; the generate method only).
        method: "generate" (the answer is parsed from generated text) or "likelihood" (multiple choice only).
        circular: rotate multiple-choice options (generate method); None: the task's protocol (on for MMBench).
        data: where the task's data is (OwlEval: its folder, for the shipped answers of the report).
        ratings: OwlEval ratings saved from the report ({system: {question_id: grade}}), tallied in the results.
        engine_settings: what the engine's answers depend on (`infer.prepare.engine_settings`: the model's folder
            and files, dtype, device, quantization, compile); kept in settings.json with the rest. Default: those
            of `load_engine(model)` with its defaults, when `model` names a checkpoint (else the name alone).

    Raises:
        ValueError: settings that differ from those of the answers already in `output`, a bad batch size, an
            empty or inconsistent item list; FileNotFoundError: a missing media file. All before the model loads.
    """
    from tqdm import tqdm

    _check_arguments(task, method, batch_size)
    circular = task.circular if circular is None else circular
    output = Path(output)
    units = make_units(task, items, method, circular)
    if engine_settings is None:
        engine_settings = default_engine_settings(model)
    settings = answer_settings(task, method, circular, model, params, engine_settings)
    settings = check_settings(output / "settings.json", settings, output / "answers.jsonl")
    cache = AnswerCache(output / "answers.jsonl")
    check_cached_data(units, cache, output)
    left = sum(u.id not in cache for u in units)
    if left:
        engine = make_engine()
        with tqdm(total=len(units), initial=len(units) - left, desc=task.name, disable=not show_progress) as bar:
            if method == "likelihood":
                answer_by_likelihood(engine, units, cache, batch_size, bar.update)
            else:
                answer_by_generation(engine, conversations(units), cache, batch_size, params, bar.update)
    results = score(task, units, cache.records, method)
    results.update(model=model, settings={**settings, "batch_size": batch_size})
    if task.name == "owleval":
        results["report"] = str(write_owleval(items, cache.records, output, model_label(model), data, ratings))
        if ratings:
            results["ratings"] = tally(ratings, items)
    write_results(results, output)
    return results


def _check_arguments(task: Task, method: str, batch_size: int) -> None:
    if method not in ("generate", "likelihood"):
        raise ValueError(f"method must be 'generate' or 'likelihood', not {method!r}")
    if method == "likelihood" and task.metric != "choice":
        raise ValueError(f"the likelihood method needs a multiple-choice task; {task.name} is {task.metric}")
    if batch_size < 1:
        raise ValueError(f"the batch size must be at least 1, not {batch_size}")


def default_engine_settings(model: str) -> dict:
    """`infer.prepare.engine_settings(model)` (the defaults of `load_engine`), or only the name when `model` is a
    label that names no local checkpoint folder."""
    from openowl.infer.prepare import engine_settings

    if not Path(model).expanduser().is_dir():
        return {"model": model}
    return engine_settings(model)


def answer_settings(
    task: Task, method: str, circular: bool, model: str, params: SamplingParams, engine_settings: dict | None = None
) -> dict:
    """What every cached answer depends on besides its item (see `item_digest`): the engine's settings, the task
    and its metric, the prompt (the task's suffix, the multiple-choice instruction), the sampling, and for multiple
    choice the method and whether the options rotate."""
    settings = {"task": task.name, "metric": task.metric, "model": model, **(engine_settings or {})}
    settings.update(prompt={"suffix": task.prompt_suffix}, sampling=sampling_settings(params))
    if task.metric == "choice":
        settings["prompt"]["choice_instruction"] = CHOICE_INSTRUCTION
        settings.update(method=method, circular=circular and method == "generate")
    return settings
