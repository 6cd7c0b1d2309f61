"""Writing files so that a crash never leaves a half-written one: write beside the target, fsync, rename. And
`cache_root`, the folder where openowl keeps what it builds or downloads once (built-in models, OwlEval)."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path


def fsync(path: Path) -> None:
    """Flush a file's (or a folder's) contents to the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def replace(source: Path, target: Path) -> None:
    """Rename a fully written `source` (file or folder) onto `target` atomically, fsyncing it first and the
    folder that holds it after, so that the rename itself survives a power cut."""
    fsync(source)
    os.replace(source, target)
    fsync(target.parent)


def atomic_write(target: str | Path, write: Callable[[Path], object]) -> Path:
    """Call `write(path)` on a temporary file beside `target`, then move it onto `target` (see `replace`).

    A failing `write` leaves `target` as it was and no temporary file behind.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(name)
    try:
        write(tmp)
        replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    return target


def atomic_write_text(target: str | Path, text: str) -> Path:
    """`atomic_write` of a text file (UTF-8)."""
    return atomic_write(target, lambda path: path.write_text(text, encoding="utf-8"))


def sha256(path: str | Path) -> str:
    """The hex SHA-256 of a file's bytes."""
    import hashlib

    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def cache_root() -> Path:
    """`$OPENOWL_CACHE`, else `$XDG_CACHE_HOME/openowl`, else `~/.cache/openowl`."""
    if os.environ.get("OPENOWL_CACHE"):
        return Path(os.environ["OPENOWL_CACHE"]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "openowl"
