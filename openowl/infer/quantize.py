"""Weight-only quantization of the language model through torchao (the vision side stays in full precision)."""

from __future__ import annotations

from torch import nn

from openowl.model.owl import OwlForConditionalGeneration

MODES = ("int8", "int4")


def quantize(
    model: OwlForConditionalGeneration, mode: str, include_vision: bool = False, group_size: int = 128
) -> OwlForConditionalGeneration:
    """Quantize, in place, every Linear of the language model (and of the vision side if asked).

    int8 uses torchao's weight-only int8 (per-channel scales), which has CPU and CUDA kernels; int4 uses its
    grouped int4 weight-only layout (`group_size` input features per scale; a Linear whose input width is not a
    multiple of it stays as it is), which needs CUDA (torchao's tinygemm kernel).

    Raises:
        ImportError: torchao is missing (`pip install torchao`).
        ValueError: an unknown mode.
        RuntimeError: the backend has no kernel for the mode, with torchao's reason.
    """
    if mode not in MODES:
        raise ValueError(f"unknown quantization {mode!r}; choose one of {', '.join(MODES)}")
    try:
        from torchao.quantization import Int4WeightOnlyConfig, Int8WeightOnlyConfig, quantize_
    except ImportError as err:
        raise ImportError("quantization needs torchao: pip install torchao") from err
    if mode == "int8":
        config = Int8WeightOnlyConfig()
    elif model.device.type == "cuda":
        config = Int4WeightOnlyConfig(group_size=group_size, int4_packing_format="tile_packed_to_4d")
    else:
        raise RuntimeError(f"int4 weight-only needs a CUDA device (torchao has no int4 kernel for {model.device}); "
                           "use int8")  # fmt: skip

    def wanted(module: nn.Module, _name: str) -> bool:
        return isinstance(module, nn.Linear) and (mode == "int8" or module.in_features % group_size == 0)

    parts: list[nn.Module] = [model.language_model]
    if include_vision:
        parts += [model.vision_model, model.abstractor]
    try:
        for part in parts:
            quantize_(part, config, filter_fn=wanted)
    except (ImportError, NotImplementedError, RuntimeError) as err:
        raise RuntimeError(f"{mode} weight-only quantization is not available on {model.device}: {err}") from err
    return model
