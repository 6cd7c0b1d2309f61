"""openowl: mPLUG-Owl (vision encoder + visual abstractor + LLaMA) on current PyTorch and transformers."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from openowl.config import OwlConfig, get_preset
    from openowl.model.owl import OwlForConditionalGeneration
    from openowl.processing import OwlProcessor, build_prompt

# The public names, imported when first used: `import openowl.cli` (and `openowl --help`) then loads no torch.
_EXPORTS = {
    "OwlConfig": "openowl.config",
    "get_preset": "openowl.config",
    "OwlForConditionalGeneration": "openowl.model.owl",
    "OwlProcessor": "openowl.processing",
    "build_prompt": "openowl.processing",
}
__all__ = ["OwlConfig", "OwlForConditionalGeneration", "OwlProcessor", "build_prompt", "get_preset"]
__version__ = "0.1.0"


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'openowl' has no attribute {name!r}")
