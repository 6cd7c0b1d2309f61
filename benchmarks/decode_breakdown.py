"""Where a compiled GPU decoding step's time goes, against the card's bandwidth (random weights of a real shape).

    python benchmarks/decode_breakdown.py --preset mplug-owl-7b

Prints, in GB/s of LM weights read per step and as a share of the measured bandwidth:
- matmuls alone: every LM Linear on one bf16 row, replayed as one CUDA graph (the kernels' floor);
- the same with q/k/v and gate/up fused into one weight each;
- the engine's compiled decoding step replayed back to back (the GPU's time: the host never waits);
- the engine's loop (tokens reach the host every step), with and without queuing the next step ahead
  (`generate_tokens(lookahead=...)`);
- the top GPU kernels of an eager decoding step.

`--parts` picks some of these: floor (the matmuls alone), eager, compiled. The engine fuses q/k/v and gate/up
(`infer/fuse.py`), so its steps read the fused weights.
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_inference import (  # noqa: E402
    benchmark_request,
    decode_run,
    kv_bytes,
    lm_bytes,
    machine_limits,
    random_model,
)

import openowl.infer.engine as engine_module  # noqa: E402
from openowl.infer.engine import Engine, Request  # noqa: E402
from openowl.infer.fuse import fuse_projections  # noqa: E402
from openowl.infer.generate import DecodeStep, generate_tokens  # noqa: E402
from openowl.infer.prepare import prepare_for_inference  # noqa: E402
from openowl.infer.sampling import SamplingParams  # noqa: E402


def graph_time(fn, replays: int = 20) -> float:
    """Seconds per call of `fn` captured in a CUDA graph and replayed `replays` times back to back."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    best = float("inf")
    for _ in range(3):
        start.record()
        for _ in range(replays):
            graph.replay()
        end.record()
        torch.cuda.synchronize()
        best = min(best, start.elapsed_time(end) / 1e3 / replays)
    return best


def linear_floor(model) -> dict:
    """Every LM Linear (and the head) on one row, as one graph; then with q/k/v and gate/up fused, as the engine
    fuses them (`fuse_projections`: the parts' weights become views of the fused ones, so nothing is copied)."""
    lm = model.language_model
    fuse_projections(lm)
    layers = [(layer.self_attn, layer.mlp) for layer in lm.model.layers]
    plain, fused = [], []  # layer by layer, in the order a step reads them, then the head
    for a, m in layers:
        plain += [a.q_proj.weight, a.k_proj.weight, a.v_proj.weight, a.o_proj.weight]
        plain += [m.gate_proj.weight, m.up_proj.weight, m.down_proj.weight]
        fused += [a.qkv_proj.weight, a.o_proj.weight, m.gate_up_proj.weight, m.down_proj.weight]
    plain.append(lm.lm_head.weight)
    fused.append(lm.lm_head.weight)
    x = {w.shape[1]: torch.randn(1, w.shape[1], device=model.device, dtype=model.dtype) for w in plain}
    plain_s = graph_time(lambda: [F.linear(x[w.shape[1]], w) for w in plain])
    fused_s = graph_time(lambda: [F.linear(x[w.shape[1]], w) for w in fused])
    return {"bytes": sum(w.numel() * w.element_size() for w in plain), "plain_s": plain_s, "fused_s": fused_s}


def kernel_table(engine: Engine, request: Request) -> str:
    """Top GPU kernels of three eager decoding steps."""
    model = engine.model
    ids = engine.processor.pad([engine.processor.tokenize_prompt(request.prompt)])
    features = engine.image_features(request.images)
    tokens = generate_tokens(
        model, ids["input_ids"], ids["attention_mask"], SamplingParams(max_new_tokens=8), features, lookahead=False
    )
    next(tokens), next(tokens)
    torch.cuda.synchronize()
    activities = [torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=activities) as prof:
        for _ in range(3):
            next(tokens)
        torch.cuda.synchronize()
    return prof.key_averages().table(sort_by="cuda_time_total", row_limit=15, max_name_column_width=70)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="mplug-owl-7b")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--parts", default="floor,eager,compiled", help="which measurements, comma-separated")
    args = parser.parse_args()
    parts = set(args.parts.split(","))
    device, dtype = torch.device("cuda"), torch.bfloat16
    out: dict = {"card": torch.cuda.get_device_name(device), "torch": torch.__version__}
    machine = machine_limits(device)
    out["machine"] = machine
    bandwidth = machine["bandwidth_gbps"] * 1e9
    print(f"card {out['card']}, read {machine['read_gbps']:.0f} GB/s, copy {machine['copy_gbps']:.0f} GB/s", flush=True)
    model = random_model(args.preset, dtype, device)
    processor, request = benchmark_request(model)

    if "floor" in parts:
        floor = linear_floor(model)
        out["linears"] = floor
        for key in ("plain_s", "fused_s"):
            gbps = floor["bytes"] / floor[key] / 1e9
            print(f"matmuls alone ({key[:-2]}): {floor[key] * 1e3:.2f} ms, {gbps:.0f} GB/s, "
                  f"{gbps * 1e9 / bandwidth:.0%} of bandwidth", flush=True)  # fmt: skip
    if "eager" in parts:
        engine = Engine(model, processor, step=prepare_for_inference(model))
        out["eager_kernels"] = kernel_table(engine, request)
        print(out["eager_kernels"], flush=True)
    if "compiled" in parts:
        out["compiled"] = compiled_loop(model, processor, request, args.new_tokens, bandwidth)
    print(json.dumps(out))


def compiled_loop(model, processor, request: Request, new_tokens: int, bandwidth: float) -> dict:
    """The compiled engine's loop with and without lookahead, and its step replayed back to back."""
    compiled, last = prepare_for_inference(model, compile=True).run, {}

    def recording(*a):
        last["args"] = a
        return compiled(*a)

    engine = Engine(model, processor, step=DecodeStep(recording, static_cache=True))
    start = time.perf_counter()
    prompt_len = decode_run(engine, request, new_tokens, repeat=1)["prompt_len"]
    result = {"first_run_s": time.perf_counter() - start}
    step_bytes = lm_bytes(model) + kv_bytes(model, prompt_len + new_tokens // 2)  # as bench_inference counts
    result["step_bytes"] = step_bytes
    plain_generate = engine_module.generate_tokens
    for ahead in (False, True):
        engine_module.generate_tokens = functools.partial(plain_generate, lookahead=ahead)
        try:
            runs = [decode_run(engine, request, new_tokens, repeat=1) for _ in range(3)]
        finally:
            engine_module.generate_tokens = plain_generate
        result[f"loop_lookahead_{ahead}_tok_s"] = sorted(r["decode_tok_s"] for r in runs)[1]
    for _ in range(3):
        compiled(*last["args"])
    torch.cuda.synchronize()
    begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    replays = 50
    begin.record()
    for _ in range(replays):  # the same step again and again: the GPU's time, the host never waited for
        compiled(*last["args"])
    end.record()
    torch.cuda.synchronize()
    result["graph_tok_s"] = replays / (begin.elapsed_time(end) / 1e3)
    for key in [k for k in result if k.endswith("tok_s")]:
        result[key.replace("tok_s", "of_bandwidth")] = result[key] * step_bytes / bandwidth
    print("compiled", json.dumps(result), flush=True)
    return result


if __name__ == "__main__":
    main()
