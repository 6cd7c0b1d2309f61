"""Random number generator state: seeding a run, and saving and restoring every generator a resumed run needs.

Python's and numpy's states are written as JSON, torch's (CPU and every CUDA device) as safetensors: nothing that
needs unpickling to read back. Each process of a run draws its own dropout masks, so each has its own files.
"""

from __future__ import annotations

import json
import logging
import random
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

logger = logging.getLogger(__name__)


def seed_everything(seed: int) -> None:
    """Seed Python's, numpy's and torch's generators."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def state_name(process_index: int, num_processes: int) -> str:
    """The file stem of a process's RNG state in a checkpoint: `rng` alone, else `rng-<process index>`."""
    return "rng" if num_processes == 1 else f"rng-{process_index}"


def save_rng_state(folder: Path, name: str) -> None:
    """Write this process's generator states as `name.json` and `name.safetensors` in `folder`."""
    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"python": [version, list(internal), gauss], "numpy": [kind, keys.tolist(), pos, has_gauss, cached]}
    (folder / f"{name}.json").write_text(json.dumps(state))
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        tensors.update({f"cuda{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
    save_file(tensors, folder / f"{name}.safetensors")


def load_rng_state(folder: Path, name: str) -> None:
    """Restore what `save_rng_state` wrote; without this process's files (a run resumed on another number of
    processes) warn and leave the generators as they are."""
    if not (folder / f"{name}.json").is_file():
        logger.warning("%s: no RNG state for this process (%s); random draws will differ from the original run",
                       folder, name)  # fmt: skip
        return
    state = json.loads((folder / f"{name}.json").read_text())
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    tensors = load_file(folder / f"{name}.safetensors")
    torch.set_rng_state(tensors["torch"])
    cuda = [tensors[f"cuda{i}"] for i in range(len(tensors) - 1)]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)
