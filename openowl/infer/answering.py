"""Answering a jsonl file of questions in batches, resumably: each batch's answers are appended as soon as they are
made, and a rerun skips the ids already answered (`openowl generate --input`).

An answers file is a cache, kept only for the settings it was made with: `check_settings` writes them beside it the
first time (`settings.json`, or `ANSWERS.settings.json`) and refuses, naming what changed, a later run with other
ones. The eval runner keeps its answers the same way.
"""

from __future__ import annotations

import hashlib
import json
import sys
from collections.abc import Callable, Iterable
from pathlib import Path

from openowl.data.jsonl import check_unique_ids, read_answers, read_questions
from openowl.infer.engine import Engine, Request
from openowl.infer.sampling import SamplingParams
from openowl.processing import load_image
from openowl.prompts import user_message
from openowl.video import load_video_frames


def user_request(engine: Engine, text: str, images: list, videos: list) -> Request:
    """One user turn with its images and videos, in the engine's prompt format."""
    prompt = engine.processor.apply_chat_template([user_message(text, len(images), len(videos))])
    return Request(prompt, images, videos)


# --- the settings an answers file was made with --------------------------------------------------


def sampling_settings(params: SamplingParams) -> dict:
    settings = vars(params).copy()
    settings["stop"] = list(params.stop)
    return settings


def media_stamp(path: str | Path) -> list:
    """A media file as the settings see it: its path, size and modification time (a replaced file differs)."""
    stat = Path(path).stat()
    return [str(path), stat.st_size, stat.st_mtime_ns]


def content_digest(rows: Iterable) -> str:
    """A short sha256 of JSON-able rows (questions, references, media stamps): the data's content."""
    digest = hashlib.sha256()
    for row in rows:
        digest.update(json.dumps(row, sort_keys=True, default=str, ensure_ascii=False).encode() + b"\n")
    return digest.hexdigest()[:16]


def check_settings(path: Path, settings: dict, answers: Path) -> dict:
    """Write `settings` to `path` while `answers` holds nothing; later, refuse other settings, naming the keys that
    changed.

    Raises:
        ValueError: the answers were made with other settings.
    """
    settings = json.loads(json.dumps(settings, default=str))  # as it reads back from the file
    if path.exists() and answers.exists() and answers.stat().st_size:
        before = json.loads(path.read_text())
        if before != settings:
            changed = sorted(k for k in settings.keys() | before.keys() if settings.get(k) != before.get(k))
            raise ValueError(
                f"{answers} holds answers made with other settings ({', '.join(changed)}; see {path.name}): "
                "use another output, or delete the answers to start again"
            )
    else:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(settings, indent=2) + "\n")
    return settings


def check_media_files(paths: Iterable[tuple[str, Path]]) -> None:
    """Raises FileNotFoundError naming the first (owner, path) whose file is missing, before any batch starts."""
    missing = [(owner, path) for owner, path in paths if not Path(path).is_file()]
    if missing:
        owner, path = missing[0]
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise FileNotFoundError(f"{owner}: {path}: no such file{more}")


# --- generate --input ----------------------------------------------------------------------------


def answer_file(
    make_engine: Callable[[], Engine],
    source: Path,
    target: Path,
    params: SamplingParams,
    batch_size: int,
    engine_settings: dict | None = None,
) -> int:
    """Answer every question of `source` into `target`; answers already there are kept, not recomputed. The engine
    is made only when there is something to answer. Returns how many questions were answered now.

    Args:
        engine_settings: what the engine's answers depend on (`infer.prepare.engine_settings`), recorded with the
            sampling and the questions' content in `TARGET.settings.json`.

    Raises:
        FileNotFoundError, ValueError: a missing media file, a duplicate id, other settings than the answers
            already in `target` were made with; all before the model loads.
    """
    from tqdm import tqdm

    if batch_size < 1:
        raise ValueError(f"the batch size must be at least 1, not {batch_size}")
    rows = read_questions(source)
    check_unique_ids((row["id"] for row in rows), str(source))
    base = source.parent
    media = [(f"{source}: id {row['id']}", base / p) for row in rows for p in row["images"] + row["videos"]]
    check_media_files(media)
    stamps = [media_stamp(path) for _, path in media]
    settings = {**(engine_settings or {}), "sampling": sampling_settings(params), "data": content_digest(rows + stamps)}
    check_settings(target.with_name(target.name + ".settings.json"), settings, target)
    done = {row["id"] for row in read_answers(target)}
    todo = [row for row in rows if row["id"] not in done]
    if not todo:
        print(f"all {len(rows)} answers are already in {target}", file=sys.stderr)
        return 0
    engine = make_engine()
    with target.open("a") as out, tqdm(total=len(rows), initial=len(rows) - len(todo), desc="answering") as bar:
        for start in range(0, len(todo), batch_size):
            batch = todo[start : start + batch_size]
            requests = []
            for row in batch:
                images = [load_image(base / p) for p in row["images"]]
                videos = [load_video_frames(base / p) for p in row["videos"]]
                requests.append(user_request(engine, row["question"], images, videos))
            for row, completion in zip(batch, engine.generate(requests, params), strict=True):
                record = {"id": row["id"], "question": row["question"], "answer": completion.text}
                record["finish_reason"] = completion.finish_reason
                out.write(json.dumps(record, ensure_ascii=False) + "\n")
            out.flush()
            bar.update(len(batch))
    return len(todo)
