"""Shared fixtures: the parity checkpoint (written by the upstream code) and its reference outputs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

FIXTURE = Path(__file__).parent / "fixtures" / "parity-v1"
CHECKPOINT = FIXTURE / "checkpoint"
VIDEO_CHECKPOINT = FIXTURE / "checkpoint-video"
IMAGES = FIXTURE / "images"


@pytest.fixture(scope="session")
def manifest() -> dict:
    return json.loads((FIXTURE / "manifest.json").read_text())


@pytest.fixture(scope="session")
def expected() -> dict[str, torch.Tensor]:
    return load_file(FIXTURE / "expected.safetensors")


@pytest.fixture(scope="session")
def model():
    from openowl import OwlForConditionalGeneration

    return OwlForConditionalGeneration.from_pretrained(CHECKPOINT, torch_dtype=torch.float32)


@pytest.fixture(scope="session")
def video_model():
    from openowl import OwlForConditionalGeneration

    return OwlForConditionalGeneration.from_pretrained(VIDEO_CHECKPOINT, torch_dtype=torch.float32)


@pytest.fixture(scope="session")
def processor():
    from openowl import OwlProcessor

    return OwlProcessor.from_pretrained(CHECKPOINT)
