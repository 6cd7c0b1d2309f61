"""Weight-only quantization of the language model through torchao (the vision side stays in full precision)."""

from __future__ import annotations

from torch import nn

from openowl.model.owl import OwlForConditionalGeneration

MODES = ("int8", "int4")


def quantize(
    model: OwlForConditionalGeneration, mode: str, include_vision: bool = False, group_size: int = 128
) -> OwlForConditionalGeneration:
    """Quantize, in place, every Linear of the language model (and of the vision side if asked).

    int8 uses torchao's weight-only int8 (per-channel scales), which has CPU and CUDA kernels; int4 its grouped
    int4 weight-only layouts (`group_size` input features per scale, 32 to 256; a Linear whose input width is not
    a multiple of it stays as it is): on CUDA the tinygemm layout, on a CPU the "opaque" layout for PyTorch's
    `_weight_int4pack_mm_for_cpu` (torchao's prototype `PrototypeInt4WeightOnlyConfig`; it decodes about 2× as
    fast as bf16 here, int8 does not: see the README's Performance section).

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
    elif model.device.type == "cpu":
        try:
            from torchao.prototype.quantization.int4 import PrototypeInt4WeightOnlyConfig
        except ImportError as err:
            raise RuntimeError(
                f"int4 on a CPU needs torchao's CPU int4 layout, missing from this torchao: {err}"
            ) from err
        config = PrototypeInt4WeightOnlyConfig(group_size=group_size, set_inductor_config=False)
    else:
        raise RuntimeError(f"int4 weight-only has no kernel for {model.device} in torchao; use int8")

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
