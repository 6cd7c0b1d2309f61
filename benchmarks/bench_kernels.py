"""CPU decoding kernels against PyTorch's, in GB/s of weights (or KV cache) read: the figures behind the kernel
choice in `openowl/infer/kernels.py`.

    python benchmarks/bench_kernels.py

Over bf16 weights of the `llama-1b` LM's shapes (2048 x 2048, 5632 x 2048, 2048 x 5632; `--weights` of them, 154
by default: the LM's 2.3 GB, more than the caches hold), rows = sequences in a decoding batch: openowl's
`small_linear` (where this CPU has it), oneDNN's `F.linear`, oneDNN on weights packed once for it
(`kernels.pack_weights`, where PyTorch's oneDNN has bf16) and with one row the engine's fallback
(`kernels.matvec`); the same shapes in int8 with a scale per output feature: openowl's `small_linear_int8` (in fixed
point on AVX-512 VNNI) against PyTorch's `_weight_int8pack_mm`. Then one-token attention for 8 rows x 32 heads x 64
against 150 cached positions, 22 layers: openowl's kernel against SDPA. Kernels take turns in each of `--rounds`
rounds; medians. Prints a table and one JSON line.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from bench_inference import read_bandwidth  # the same read probe as the inference benchmark's

from openowl.infer.kernels import cpu_kernels, kernel_choice, matvec


def _time(fn: Callable) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def time_products(weights: list[tuple], rows: list[int], rounds: int, kernels: Callable) -> dict:
    """{rows: {kernel: GB/s of weights read}}, each kernel `fn(x, *weight)` over every weight in turn."""
    nbytes = sum(t.numel() * t.element_size() for weight in weights for t in weight)
    gbps = {}
    for n in rows:
        inputs = {w[0].shape[1]: torch.randn(n, w[0].shape[1], dtype=torch.bfloat16) for w in weights}
        times: dict[str, list[float]] = {name: [] for name in kernels(n)}
        for _ in range(rounds):
            for name, fn in kernels(n).items():
                times[name].append(_time(lambda fn=fn, x=inputs: [fn(x[w[0].shape[1]], *w) for w in weights]))
        gbps[n] = {name: nbytes / statistics.median(t) / 1e9 for name, t in times.items()}
    return gbps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--rows", default="1,2,4,8")
    parser.add_argument("--weights", type=int, default=154, help="how many weights (154: the 1.26 B LM's)")
    args = parser.parse_args()
    torch.manual_seed(0)
    shapes = [(2048, 2048)] * 4 + [(5632, 2048)] * 2 + [(2048, 5632)]
    shapes = [s for _ in range(-(-args.weights // 7)) for s in shapes][: args.weights]
    rows = [int(r) for r in args.rows.split(",")]
    result: dict = {"kernels": kernel_choice(), "read_gbps": read_bandwidth(torch.ones(256 * 1024 * 1024)) / 1e9}

    bf16 = [(torch.randn(s, dtype=torch.bfloat16) / 50,) for s in shapes]
    kernels: dict[str, Callable] = {"oneDNN F.linear": lambda x, w: F.linear(x, w)}
    if cpu_kernels():
        kernels["openowl small_linear"] = torch.ops.openowl.small_linear
    if torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported():
        packed = {id(w): torch.ops.mkldnn._reorder_linear_weight(w, 1) for (w,) in bf16}  # laid out for few rows
        kernels["oneDNN on packed weights"] = lambda x, w: torch.ops.mkldnn._linear_pointwise(
            x, packed[id(w)], None, "none", [], ""
        )
    one_row = {"PyTorch / oneDNN torch.mv (kernels.matvec)": lambda x, w: matvec(w, x[0])}
    result["gbps"] = time_products(bf16, rows, args.rounds, lambda n: {**kernels, **(one_row if n == 1 else {})})
    int8 = [(torch.randint(-127, 128, s, dtype=torch.int8), torch.rand(s[0]).bfloat16() / 100) for s in shapes]
    kernels = {"PyTorch _weight_int8pack_mm": torch._weight_int8pack_mm}
    if cpu_kernels():
        kernels["openowl small_linear_int8"] = torch.ops.openowl.small_linear_int8
    result["int8_gbps"] = time_products(int8, rows, args.rounds, lambda n: kernels)

    batch, heads, dim, length, layers = 8, 32, 64, 150, 22
    caches = [torch.randn(2, batch, heads, 256, dim, dtype=torch.bfloat16) for _ in range(layers)]
    q = torch.randn(batch, heads, 1, dim, dtype=torch.bfloat16)
    mask = torch.ones(batch, 1, 1, length, dtype=torch.bool)
    attention = {"SDPA": lambda k, v: F.scaled_dot_product_attention(q, k, v, attn_mask=mask)}
    if cpu_kernels():
        attention["openowl decode_attention"] = lambda k, v: torch.ops.openowl.decode_attention(q, k, v, mask, 0.125)
    times = {name: [] for name in attention}
    for _ in range(args.rounds):
        for name, fn in attention.items():
            times[name].append(_time(lambda fn=fn: [fn(c[0, :, :, :length], c[1, :, :, :length]) for c in caches]))
    kv_bytes = 2 * batch * heads * length * dim * 2
    result["attention_ms_per_layer"] = {name: statistics.median(t) / layers * 1e3 for name, t in times.items()}
    result["attention_kv_gbps"] = {
        name: kv_bytes / ms * 1e3 / 1e9 for name, ms in result["attention_ms_per_layer"].items()
    }

    print(f"kernels: {result['kernels']}; read bandwidth {result['read_gbps']:.1f} GB/s")
    for dtype, key in (("bf16", "gbps"), ("int8", "int8_gbps")):
        for n, by_kernel in result[key].items():
            for name, gbps in by_kernel.items():
                print(f"{dtype}, {n} row{'s' if n > 1 else ' '}  {name:<45} {gbps:6.1f} GB/s")
    for name, ms in result["attention_ms_per_layer"].items():
        print(f"attention, {batch} rows  {name:<36} {ms:6.3f} ms/layer ({result['attention_kv_gbps'][name]:.1f} GB/s)")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
