"""The OwlEval files: a local folder, or upstream's copy downloaded once into the openowl cache; read as items.

OwlEval is upstream's instruction-following set (github.com/X-PLUG/mPLUG-Owl, folder `mPLUG-Owl/OwlEval`):
`questions.jsonl` (82 questions), `cases/*.jpg` (the 50 images they ask about) and `answer/*.jsonl` (six systems'
answers, shown beside ours in the report). The download is pinned to one upstream commit, so the files never change
under a cached copy; without network access the error says how to give a copy instead (docs/evaluation.md).
"""

from __future__ import annotations

import os
import shutil
import tempfile
import urllib.request
from collections.abc import Callable
from pathlib import Path

from openowl.data.jsonl import read_rows
from openowl.eval.items import Item
from openowl.files import cache_root, fsync, replace

UPSTREAM_REPO = "X-PLUG/mPLUG-Owl"
UPSTREAM_COMMIT = "21ff9b0bd301fa8d7be107a5ed85b34278eca64f"  # the last commit that changed mPLUG-Owl/OwlEval
OWLEVAL_URL = f"https://raw.githubusercontent.com/{UPSTREAM_REPO}/{UPSTREAM_COMMIT}/mPLUG-Owl/OwlEval"
ANSWER_FILES = (
    "MMreact_answer.jsonl",
    "blip2_13b_answer.jsonl",
    "llava_13b_answer.jsonl",
    "mPLUG_Owl_7b_answer.jsonl",
    "minigpt4_13b_answer.jsonl",
    "openflanmingo_answer.jsonl",
)
TIMEOUT_S = 30  # per file; an offline machine fails at once (no name resolution)


def owleval_dir(data: str | None = None) -> Path:
    """The OwlEval folder: `data`, else `$OPENOWL_OWLEVAL`, else the cached download (made on first use).

    Raises:
        FileNotFoundError: a given folder without questions.jsonl.
        RuntimeError: nothing given, nothing cached, and the download failed (saying what to do instead).
    """
    given = data or os.environ.get("OPENOWL_OWLEVAL")
    if given:
        folder = Path(given)
        if not (folder / "questions.jsonl").is_file():
            raise FileNotFoundError(f"{folder}: no OwlEval questions.jsonl there (give the folder with --data)")
        return folder
    folder = cache_root() / f"owleval-{UPSTREAM_COMMIT[:12]}"
    if not (folder / "questions.jsonl").is_file():
        download_owleval(folder)
    return folder


def read_url(url: str) -> bytes:
    """The bytes at `url` (http(s):// or file://)."""
    with urllib.request.urlopen(url, timeout=TIMEOUT_S) as response:
        return response.read()


def download_owleval(target: Path, base_url: str | None = None, read: Callable[[str], bytes] = read_url) -> Path:
    """Download OwlEval's files from `base_url` (default: upstream's, `OWLEVAL_URL`) into the folder `target`.

    The files go to a temporary folder beside `target`, renamed onto it once all are there: an interrupted
    download leaves no `target`, and the next run starts again.

    Raises:
        RuntimeError: a file could not be read, naming its URL, `--data` and `$OPENOWL_OWLEVAL`.
    """
    base_url = (base_url or OWLEVAL_URL).rstrip("/")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp"))
    try:
        questions = _fetch(read, base_url, "questions.jsonl", tmp)
        images = sorted({row["image"] for _, row in read_rows(questions)})
        for name in [*(f"answer/{a}" for a in ANSWER_FILES), *(f"cases/{i}" for i in images)]:
            _fetch(read, base_url, name, tmp)
        try:
            replace(tmp, target)
        except OSError:
            if not (target / "questions.jsonl").is_file():  # else another run has just put it there
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _fetch(read: Callable[[str], bytes], base_url: str, name: str, folder: Path) -> Path:
    url = f"{base_url}/{name}"
    try:
        content = read(url)
    except OSError as err:  # urllib's URLError and HTTPError, timeouts
        raise RuntimeError(
            f"OwlEval is not on this machine and could not be downloaded ({url}: {err}). Give a copy of its folder "
            f"(questions.jsonl, cases/, answer/: folder mPLUG-Owl/OwlEval of github.com/{UPSTREAM_REPO}) with "
            "--data DIR, or set $OPENOWL_OWLEVAL to it."
        ) from err
    path = folder / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content)
    fsync(path)  # `replace` makes the rename durable; the files must be on the disk before it
    return path


def load_owleval(data: str | None = None) -> list[Item]:
    """The 82 OwlEval questions in question_id order; the questions on one image form one conversation, whose
    first question carries the image (`meta["path"]` has it for every question)."""
    folder = owleval_dir(data)
    rows = [row for _, row in read_rows(folder / "questions.jsonl")]
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
