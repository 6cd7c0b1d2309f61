"""Weight-only quantization of the language model through torchao (the vision side stays in full precision)."""

from __future__ import annotations

import threading

import torch
import torch.nn.functional as F
from torch import nn

from openowl.infer.fuse import unfuse_projections
from openowl.infer.kernels import MAX_ROWS, fits_small_linear, needs_grad
from openowl.model.owl import OwlForConditionalGeneration

MODES = ("int8", "int4")


def quantize(
    model: OwlForConditionalGeneration, mode: str, include_vision: bool = False, group_size: int = 128
) -> OwlForConditionalGeneration:
    """Quantize, in place, every Linear of the language model (and of the vision side if asked).

    int8 uses torchao's weight-only int8 (per-channel scales), held as `Int8WeightOnlyLinear`s (torchao's int8
    values and scales as plain tensors, whose products `torch.compile` can fuse with the conversion; torchao's
    tensor subclass hides them). On a CPU they run openowl's or PyTorch's int8 kernel and, under
    `Engine(compile=True)`, inductor's own int8 GEMM on pre-packed frozen weights; there a Linear whose input width
    is not a multiple of 16 stays as it is (the CPU kernel reads 16 inputs at a time: in bf16 it crashes or returns
    garbage on other widths). On CUDA, see `Int8WeightOnlyLinear`.

    int4 uses torchao's grouped int4 weight-only layouts (`group_size` input features per scale, 32 to 256; a
    Linear whose input width is not a multiple of it stays as it is): on CUDA the tinygemm layout, on a CPU the
    "opaque" layout for PyTorch's `_weight_int4pack_mm_for_cpu` (torchao's prototype
    `PrototypeInt4WeightOnlyConfig`). docs/performance.md compares the modes' speeds.

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

    multiple = group_size if mode == "int4" else 16 if model.device.type == "cpu" else 1  # widths that quantize

    def wanted(module: nn.Module, _name: str) -> bool:
        return isinstance(module, nn.Linear) and module.in_features % multiple == 0

    unfuse_projections(model.language_model)  # an engine's fused projections would keep the unquantized weights
    parts: list[nn.Module] = [model.language_model]
    if include_vision:
        parts += [model.vision_model, model.abstractor]
    try:
        for part in parts:
            quantize_(part, config, filter_fn=wanted)
            if mode == "int8":
                _unwrap_int8(part)
    except (ImportError, NotImplementedError, RuntimeError) as err:
        raise RuntimeError(f"{mode} weight-only quantization is not available on {model.device}: {err}") from err
    return model


class Int8WeightOnlyLinear(nn.Module):
    """A Linear with int8 weights and one scale per output feature, held as plain tensors.

    On a CPU, up to 8 bf16 rows run openowl's int8 kernel where the CPU has it (`kernels.py`: it reads each int8
    weight once for all the rows). Otherwise, up to 16 rows run PyTorch's int8 kernel (`_weight_int8pack_mm`, which
    reads the int8 weight as it is, where torchao's eager path dequantizes every weight at every call); more rows
    dequantize the weight (into a buffer each thread reuses: `dequantized`) and use the float GEMM. Under
    `torch.compile` with frozen weights, inductor rewrites both of PyTorch's paths into its own pre-packed int8
    GEMM.

    On CUDA, up to 8 rows under `torch.compile` (decoding) are a sum of products over the input features, which
    inductor can fuse with the conversion into one kernel over the int8 weight; a matmul would first write the weight
    out in the rows' dtype and read it back (measured: docs/performance.md, GPU: an H100). Eagerly, and for more
    rows, the weight is converted for the float GEMM.
    """

    def __init__(self, weight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.scale = nn.Parameter(scale, requires_grad=False)
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features)
        if x.device.type == "cuda" and rows.shape[0] <= MAX_ROWS and torch.compiler.is_compiling():
            y = int8_product_sum(rows, self.weight, self.scale)
        elif x.device.type != "cpu" or rows.shape[0] > 16:
            y = F.linear(rows, dequantized(self.weight, x.dtype, keep=needs_grad(rows))) * self.scale
        elif rows.shape[0] <= MAX_ROWS and self.scale.dtype == x.dtype and fits_small_linear(self.weight, x):
            y = torch.ops.openowl.small_linear_int8(rows.contiguous(), self.weight, self.scale)
        else:
            y = torch._weight_int8pack_mm(rows.contiguous(), self.weight, self.scale)
        y = y.reshape(*x.shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias

    @classmethod
    def fused_from(cls, values: dict[str, torch.Tensor]) -> Int8WeightOnlyLinear:
        """One Linear over the parts' weights, scales and biases side by side (`fuse.py`)."""
        return cls(values["weight"], values["scale"], values.get("bias"))

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


_scratch = threading.local()


def dequantized(weight: torch.Tensor, dtype: torch.dtype, keep: bool = False) -> torch.Tensor:
    """`weight.to(dtype)`; on a CPU, in a buffer that this thread reuses from call to call. A new tensor per call
    would be new memory every time, which the OS hands over page by page (a prefill through the 1.26 B LM's int8
    weights took 1.7-1.9x as long: docs/performance.md, Run J). `keep`: the result outlives the call (autograd
    saves it), or `torch.compile` traces it: a tensor of its own."""
    if weight.device.type != "cpu" or keep or torch.compiler.is_compiling():
        return weight.to(dtype)
    buffer = getattr(_scratch, "buffer", None)
    if buffer is None or buffer.dtype != dtype or buffer.numel() < weight.numel():
        buffer = _scratch.buffer = torch.empty(weight.numel(), dtype=dtype)
    return buffer[: weight.numel()].view(weight.shape).copy_(weight)


def int8_product_sum(rows: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """`(M, in)` rows times an `(out, in)` int8 weight and its `(out,)` scales, as a sum of products in float32 (for
    inductor to fuse into one pass over the weight; eagerly it would hold every product). -> `(M, out)`"""
    products = weight[:, None, :] * rows[None].float()  # (out, M, in): rows next to each other reuse a weight row
    return (products.sum(-1).t() * scale).to(rows.dtype)


def _unwrap_int8(part: nn.Module) -> None:
    """Replace every Linear holding a torchao int8 weight by an `Int8WeightOnlyLinear` with the same values."""
    for name, module in list(part.named_modules()):
        if not isinstance(module, nn.Linear) or not hasattr(module.weight, "qdata"):
            continue
        weight = module.weight
        scale = weight.scale.reshape(-1).to(weight.dtype)  # torchao keeps (N, 1) float32 scales
        bias = None if module.bias is None else module.bias.detach()
        parent, _, attr = name.rpartition(".")
        setattr(part.get_submodule(parent), attr, Int8WeightOnlyLinear(weight.qdata, scale, bias))
