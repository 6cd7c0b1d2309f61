"""openowl: mPLUG-Owl (vision encoder + visual abstractor + LLaMA) on current PyTorch and transformers."""

from openowl.config import OwlConfig, get_preset
from openowl.model.owl import OwlForConditionalGeneration
from openowl.processing import OwlProcessor, build_prompt

__all__ = ["OwlConfig", "OwlForConditionalGeneration", "OwlProcessor", "build_prompt", "get_preset"]
__version__ = "0.1.0"
