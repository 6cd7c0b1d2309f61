"""The built-in models' cache: each is assembled once from the installed packages into a normal checkpoint folder
under `cache_root()`, which later runs load like any other."""

from __future__ import annotations

import shutil
import sys
import tempfile
from pathlib import Path

from openowl import checkpoint
from openowl.files import cache_root
from openowl.owl_small import assemble
from openowl.owl_small.pretrained import BASE_NAME, NAME, PRETRAINED_PARTS, part_file

BASE_VERSION = 1  # bump when the assembly of the base model changes: cached folders are rebuilt
BUILTIN_MODELS = (NAME, BASE_NAME)


def resolve(name: str) -> Path:
    """The checkpoint folder of a built-in model (`owl-small`, `owl-small-base`), built on first use.

    Raises:
        MissingPartError: a package with a pretrained part is missing.
    """
    if name == NAME:
        if assemble.TRAINED_SHA256 is None:
            raise ValueError(f"{NAME} has no trained weights in this version (TRAINED_SHA256 is not set)")
        folder, builder = cache_root() / f"{NAME}-{assemble.TRAINED_SHA256[:16]}", assemble.build
    elif name == BASE_NAME:
        folder, builder = cache_root() / f"{BASE_NAME}-v{BASE_VERSION}", assemble.build_base
    else:
        raise KeyError(f"unknown built-in model {name!r} (known: {', '.join(BUILTIN_MODELS)})")
    if (folder / "config.json").is_file():
        return folder
    for part in PRETRAINED_PARTS:  # fail before any work when a package is missing
        part_file(part)
    print(f"building {name} from the installed packages (first use only) into {folder}", file=sys.stderr)
    model, processor = builder()
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{folder.name}-", dir=folder.parent))
    try:
        checkpoint.save_model(model, tmp)
        processor.save_pretrained(tmp)
        try:
            tmp.rename(folder)
        except OSError:  # another process built it meanwhile
            if not (folder / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder
