"""Answering a jsonl file of questions in batches, resumably: each batch's answers are appended as soon as they are
made, and a rerun skips the ids already answered (`openowl generate --input`)."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path

from openowl.data.jsonl import read_answers, read_questions
from openowl.infer.engine import Engine, Request
from openowl.infer.sampling import SamplingParams
from openowl.processing import load_image
from openowl.prompts import user_message
from openowl.video import load_video_frames


def user_request(engine: Engine, text: str, images: list, videos: list) -> Request:
    """One user turn with its images and videos, in the engine's prompt format."""
    prompt = engine.processor.apply_chat_template([user_message(text, len(images), len(videos))])
    return Request(prompt, images, videos)


def answer_file(
    make_engine: Callable[[], Engine], source: Path, target: Path, params: SamplingParams, batch_size: int
) -> int:
    """Answer every question of `source` into `target`; answers already there are kept, not recomputed. The engine
    is made only when there is something to answer. Returns how many questions were answered now."""
    from tqdm import tqdm

    rows = read_questions(source)
    done = {row["id"] for row in read_answers(target)}
    todo = [row for row in rows if row["id"] not in done]
    if not todo:
        print(f"all {len(rows)} answers are already in {target}", file=sys.stderr)
        return 0
    engine = make_engine()
    base = source.parent
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
