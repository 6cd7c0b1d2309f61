"""Inference benchmark: what the engine achieves against the hardware limits, and against plain transformers.

    python benchmarks/bench_inference.py --preset llama-1b --dtype bfloat16

Random weights of a real shape (the `llama-1b` preset: the 7B ViT + abstractor and a 1.26 B LLaMA-shaped LM;
`mplug-owl-7b` where memory allows). Prints a table and, last, one JSON line:

- machine: the card, or the CPU and which kernels the eager engine decodes with on it; measured read and copy
  bandwidth (probed at the start and again at the end; the higher counts), bf16 / fp32 matmul peak;
- time to first token (image + short prompt) and the FLOP/s it reached (ViT + abstractor + LM prefill);
- decode tokens/s at batch 1, bytes read per step (LM weights + KV cache), achieved bandwidth, MBU (against the
  higher of the read and copy bandwidths) and the share of the read bandwidth;
- the same LM under plain transformers `generate(inputs_embeds=...)` (the upstream path), same run;
- variants at batch 1: the compiled engine (on a CPU: inductor's GEMMs on frozen, pre-packed weights), int8 and
  int4 weight-only (torchao), int8 compiled;
- batch 1/4/8 throughput, second chat turn with and without the prefix cache;
- with --load-rss: peak RSS while loading a saved bf16 checkpoint, as a multiple of the weights' size;
- with --peer vllm (this Python imports vLLM) or --peer PYTHON (one that does, e.g. `.venv-vllm/bin/python`): vLLM on
  the same LM (saved as a transformers folder), dtype and prompt length (`vllm_peer.py`): decode at each batch size
  and time to first token (the LM's prefill only: vLLM gets the prompt as text ids). A last table sets the decode
  rates side by side with the bandwidth limit (LM weights and KV cache read per step, over the read bandwidth).
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from accelerate import init_empty_weights

from openowl import OwlForConditionalGeneration, OwlProcessor, get_preset
from openowl.infer.engine import Engine, Request
from openowl.infer.fuse import fuse_projections, unfuse_projections
from openowl.infer.generate import generate_tokens
from openowl.infer.kernels import kernel_choice, use_decode_kernels, use_stock_kernels
from openowl.infer.prepare import prepare_for_inference
from openowl.infer.sampling import SamplingParams
from openowl.infer.session import ChatSession

ROOT = Path(__file__).resolve().parents[1]
TOKENIZER = ROOT / "tests" / "fixtures" / "parity-v1" / "checkpoint"
IMAGE = ROOT / "tests" / "fixtures" / "parity-v1" / "images" / "image0.jpg"
QUESTION = "Describe this image in detail."


def timed(fn, repeat: int = 3, warmup_s: float = 0.5) -> float:
    """Best-of-`repeat` wall time of `fn()` in seconds, after warming up for `warmup_s` (CPU matrix units and
    clocks take a moment to reach full speed)."""
    start = time.perf_counter()
    fn()
    while time.perf_counter() - start < warmup_s:
        fn()
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


# --- the machine ---------------------------------------------------------------------------------


def read_bandwidth(src: torch.Tensor) -> float:
    """Bytes/s at which the device reads `src` (a float32 sum over it, 1 GiB in `machine_limits`)."""
    return src.numel() * src.element_size() / timed(lambda: src.sum().item())


def bandwidths(device: torch.device) -> dict:
    """Read and copy bandwidth in GB/s over 1 GiB of float32."""
    n = 256 * 1024 * 1024
    src = torch.ones(n, device=device)
    dst = torch.empty_like(src)
    read = read_bandwidth(src)
    copy = 2 * n * 4 / timed(lambda: (dst.copy_(src), _sync(device)))
    return {"read_gbps": read / 1e9, "copy_gbps": copy / 1e9, "bandwidth_gbps": max(read, copy) / 1e9}


def machine_limits(device: torch.device) -> dict:
    peaks = {}
    n = 4096 if device.type == "cpu" else 8192
    for dtype in (torch.bfloat16, torch.float32):
        a = torch.randn(n, n, device=device, dtype=dtype)
        b = torch.randn(n, n, device=device, dtype=dtype)
        peaks[str(dtype).removeprefix("torch.")] = 2 * n**3 / timed(lambda a=a, b=b: (a @ b, _sync(device)))
    return {**bandwidths(device), "matmul_tflops": {k: v / 1e12 for k, v in peaks.items()}}


def cpu_name() -> str:
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.processor()
    return next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")), "")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


# --- the model -----------------------------------------------------------------------------------


def random_model(preset: str, dtype: torch.dtype, device: torch.device) -> OwlForConditionalGeneration:
    """A model of the preset's shape with N(0, 0.02) weights (norms at 1), allocated once, in `dtype`."""
    with init_empty_weights(include_buffers=False):
        model = OwlForConditionalGeneration(get_preset(preset))
    generator = torch.Generator(device=device).manual_seed(0)
    for name, p in list(model.named_parameters()):
        value = torch.empty(p.shape, dtype=dtype, device=device)
        module_name, _, attr = name.rpartition(".")
        if module_name.endswith(("norm", "ln", "layernorm", "norm1", "norm2", "normk")):
            value.fill_(1.0) if name.endswith("weight") else value.zero_()
        else:
            value.normal_(0.0, 0.02, generator=generator)
        model.get_submodule(module_name)._parameters[attr] = torch.nn.Parameter(value, requires_grad=False)
    return model.to(device).eval()


def benchmark_request(model: OwlForConditionalGeneration) -> tuple[OwlProcessor, Request]:
    """The real LLaMA tokenizer, set to the model's image size, and the request every run times: one image and
    `QUESTION` in the upstream template."""
    processor = OwlProcessor.from_pretrained(TOKENIZER)
    processor.image_size = model.config.vision.image_size
    content = [{"type": "image"}, {"type": "text", "text": QUESTION}]
    return processor, Request(processor.apply_chat_template([{"role": "user", "content": content}]), [IMAGE])


def lm_weights(model: OwlForConditionalGeneration) -> list[torch.Tensor]:
    """Every LM weight once but the embedding table, from the state dict: an engine's fused projections
    (`infer/fuse.py`) are parameters too, over the same memory as the weights they fuse."""
    embed = model.language_model.get_input_embeddings().weight
    weights = {id(t): t for t in model.language_model.state_dict(keep_vars=True).values()}
    return [t for t in weights.values() if t is not embed]


def lm_bytes(model: OwlForConditionalGeneration) -> int:
    """Bytes a decode step reads: every LM weight but the embedding table (a row lookup)."""
    return sum(_nbytes(p) for p in lm_weights(model))


def _nbytes(t: torch.Tensor) -> int:
    inner = [getattr(t, name) for name in ("qdata", "scale", "int_data", "scale_and_zero") if hasattr(t, name)]
    return sum(x.numel() * x.element_size() for x in inner) if inner else t.numel() * t.element_size()


def kv_bytes(model: OwlForConditionalGeneration, seq: int, batch: int = 1) -> int:
    c = model.language_model.config
    kv_heads = c.num_key_value_heads or c.num_attention_heads
    head_dim = c.hidden_size // c.num_attention_heads
    return 2 * c.num_hidden_layers * seq * kv_heads * head_dim * batch * model.dtype.itemsize


def prefill_flops(model: OwlForConditionalGeneration, prompt_len: int, images: int) -> float:
    vision = sum(p.numel() for p in model.vision_model.parameters())
    abstractor = sum(p.numel() for p in model.abstractor.parameters())
    lm = sum(p.numel() for p in lm_weights(model))
    c = model.language_model.config
    tokens = model.config.vision.num_positions
    attn_lm = 2 * 2 * c.num_hidden_layers * prompt_len**2 * c.hidden_size
    attn_vit = 2 * 2 * model.config.vision.num_hidden_layers * tokens**2 * model.config.vision.hidden_size
    return (
        2 * vision * tokens * images
        + 2 * abstractor * model.config.num_query_tokens * images
        + 2 * lm * prompt_len
        + attn_lm
        + attn_vit * images
    )


# --- measurements --------------------------------------------------------------------------------


def decode_run(engine: Engine, request: Request, new_tokens: int, batch: int = 1, repeat: int = 2) -> dict:
    """Time to first token and decode tokens/s of our engine for `batch` copies of `request` (best of `repeat`,
    after a short warm-up run)."""
    start = time.perf_counter()
    _decode_once(engine, request, 2, batch)
    first_run_s = time.perf_counter() - start  # with compiling, for a compiled engine
    runs = [_decode_once(engine, request, new_tokens, batch) for _ in range(repeat)]
    return {"ttft_s": min(r["ttft_s"] for r in runs), "decode_tok_s": max(r["decode_tok_s"] for r in runs),
            "prompt_len": runs[0]["prompt_len"], "first_run_s": first_run_s}  # fmt: skip


def _decode_once(engine: Engine, request: Request, new_tokens: int, batch: int) -> dict:
    engine.image_cache = type(engine.image_cache)()  # time the image encoding too
    device = engine.model.device
    start = time.perf_counter()
    stream, lengths = engine.token_stream([request] * batch, SamplingParams(max_new_tokens=new_tokens))
    next(stream).tolist()  # tokens reach the CPU each step, as the engine's detokenizer needs them
    first = time.perf_counter()
    steps = sum(1 for token in stream if token.tolist() is not None)
    _sync(device)
    end = time.perf_counter()
    return {"ttft_s": first - start, "decode_tok_s": batch * steps / (end - first), "prompt_len": lengths[0]}


def add_bandwidth(run: dict, step_bytes: int, machine: dict) -> None:
    """Add a decode run's achieved bandwidth (`step_bytes` read per step), its MBU and its share of the read
    bandwidth."""
    run["step_bytes"] = step_bytes
    run["achieved_gbps"] = step_bytes * run["decode_tok_s"] / 1e9
    run["mbu"] = run["achieved_gbps"] / machine["bandwidth_gbps"]
    run["of_read_bandwidth"] = run["achieved_gbps"] / machine["read_gbps"]


def _median_run(runs: list[dict]) -> dict:
    """The run with the median decode rate (its time to first token comes with it)."""
    return dict(sorted(runs, key=lambda r: r["decode_tok_s"])[len(runs) // 2])


def baseline_run(
    model: OwlForConditionalGeneration, processor: OwlProcessor, request: Request, new_tokens: int
) -> dict:
    """The upstream path: transformers `generate` on spliced `inputs_embeds` with the stock kernels, decode rate from
    1 vs N tokens."""
    ids = processor.pad([processor.tokenize_prompt(request.prompt)])
    pixels = processor.preprocess_images(request.images).to(model.dtype)

    def run(n: int) -> float:
        start = time.perf_counter()
        with torch.no_grad():
            embeds = model.embed_inputs(ids["input_ids"], pixel_values=pixels)
            mask = ids["attention_mask"].to(model.device)
            lm = model.language_model
            lm.generate(inputs_embeds=embeds, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, do_sample=False)
        _sync(model.device)
        return time.perf_counter() - start

    swapped = use_stock_kernels(model.language_model)
    fused = unfuse_projections(model.language_model, keep=True)
    try:
        run(2)
        one, full = min(run(1) for _ in range(2)), run(new_tokens)
    finally:
        if fused:
            fuse_projections(model.language_model)
        if swapped:
            use_decode_kernels(model.language_model)
    return {"ttft_s": one, "decode_tok_s": (new_tokens - 1) / (full - one)}


def second_turn(engine: Engine, request: Request, new_tokens: int, repeat: int = 2) -> dict:
    """Latency to the first token of a second chat turn, with the session's prefix cache and without it (best of
    `repeat` whole conversations, so that one-time kernel set-up is not counted)."""
    params = SamplingParams(max_new_tokens=new_tokens)
    first_token = params.with_(max_new_tokens=1)
    cached, uncached = float("inf"), float("inf")
    for _ in range(repeat):
        session = ChatSession(engine, params=params)
        "".join(session.ask(QUESTION, images=request.images))
        start = time.perf_counter()
        "".join(session.ask("What colours do you see?", params=first_token))
        _sync(engine.model.device)
        cached = min(cached, time.perf_counter() - start)
        engine.image_cache = type(engine.image_cache)()
        ids = torch.tensor([session.last_prompt_ids])
        start = time.perf_counter()  # the same ids from scratch: encode the image, run every token
        features = engine.image_features(session.images)
        next(generate_tokens(engine.model, ids, torch.ones_like(ids), first_token, image_features=features))
        _sync(engine.model.device)
        uncached = min(uncached, time.perf_counter() - start)
    return {"with_cache_s": cached, "without_cache_s": uncached, "speedup": uncached / cached,
            "tokens_run_with_cache": session.last_prefill_tokens}  # fmt: skip


def load_rss(model: OwlForConditionalGeneration) -> dict:
    """Save in bf16, then load in a fresh process and read its peak RSS (VmHWM) above the start."""
    with tempfile.TemporaryDirectory() as folder:
        model.to(torch.bfloat16).save_pretrained(folder)
        weights = sum(p.numel() * 2 for p in model.state_dict().values())
        code = (
            "import torch, openowl\n"
            "def rss(k): return int(next(l for l in open('/proc/self/status') if l.startswith(k)).split()[1]) * 1024\n"
            "base = rss('VmRSS:')\n"
            f"model = openowl.OwlForConditionalGeneration.from_pretrained({folder!r}, dtype=torch.bfloat16)\n"
            "sum(float(p.sum()) for p in model.parameters())  # touch every weight: mapped pages count\n"
            "print(rss('VmHWM:') - base)\n"
        )
        peak = int(
            subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout.split()[-1]
        )
    return {"weights_gb": weights / 1e9, "peak_rss_gb": peak / 1e9, "ratio": peak / weights}


# --- main ----------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="llama-1b", help="model shape (llama-1b, mplug-owl-7b, tiny)")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--skip-baseline", action="store_true", help="don't time plain transformers generate")
    parser.add_argument(
        "--variants",
        default="compile,int8,int8+compile,int4",
        help="more decoders to time at batch 1, comma-separated ('' for none): int8 / int4 weight-only, and "
        "'compile' (alone or as '+compile') for the compiled engine; each on a fresh copy of the random weights",
    )
    parser.add_argument("--batches", default="1,4,8", help="batch sizes for throughput")
    parser.add_argument("--load-rss", action="store_true", help="also measure peak RSS while loading (saves to /tmp)")
    parser.add_argument("--compile", action="store_true", help="decode with torch.compile and a static cache")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds of ours and the baseline (median)")
    parser.add_argument("--peer", help="also time vLLM: 'vllm' (importable here) or the path of a Python that has it")
    args = parser.parse_args()
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)

    result: dict = {
        "preset": args.preset,
        "dtype": args.dtype,
        "device": str(device),
        "threads": torch.get_num_threads(),
    }
    if device.type == "cuda":
        result["card"] = torch.cuda.get_device_name(device)
    else:  # which kernels the eager engine decodes with depends on the CPU (openowl/infer/kernels.py)
        result["cpu"] = cpu_name()
        result["decode_kernels"] = kernel_choice()
    result["machine"] = machine_limits(device)
    model = random_model(args.preset, dtype, device)
    processor, request = benchmark_request(model)
    result["lm_params_b"] = sum(p.numel() for p in model.language_model.parameters()) / 1e9
    engine = Engine(model, processor, step=prepare_for_inference(model, compile=args.compile))
    # Interleaved rounds, medians: drifts of a shared machine hit ours and the baseline alike.
    ours_runs, base_runs = [], []
    for _ in range(args.rounds):
        if not args.skip_baseline:
            base_runs.append(baseline_run(model, processor, request, args.new_tokens))
        ours_runs.append(decode_run(engine, request, args.new_tokens, repeat=1))
    ours = _median_run(ours_runs)
    base = _median_run(base_runs) if base_runs else None
    if base is not None:
        pairs = zip(ours_runs, base_runs, strict=True)
        result["speedup_per_round"] = [o["decode_tok_s"] / b["decode_tok_s"] for o, b in pairs]
    step_bytes = lm_bytes(model) + kv_bytes(model, ours["prompt_len"] + args.new_tokens // 2)
    add_bandwidth(ours, step_bytes, result["machine"])
    ours["prefill_tflops"] = prefill_flops(model, ours["prompt_len"], 1) / ours["ttft_s"] / 1e12
    peak = result["machine"]["matmul_tflops"]["float32" if args.dtype == "float32" else "bfloat16"]
    ours["prefill_mfu"] = ours["prefill_tflops"] / peak
    result["ours"] = ours
    if base is not None:
        add_bandwidth(base, step_bytes, result["machine"])
        result["transformers_generate"] = base
        result["speedup_vs_transformers"] = ours["decode_tok_s"] / base["decode_tok_s"]
    progress("machine, ours, transformers", [result["machine"], ours, base])
    result["batch_throughput_tok_s"] = {
        b: decode_run(engine, request, args.new_tokens, batch=b)["decode_tok_s"]
        for b in map(int, args.batches.split(","))
    }
    progress("batch_throughput_tok_s", result["batch_throughput_tok_s"])
    result["second_turn"] = second_turn(engine, request, args.new_tokens)
    result["step_bytes"] = step_bytes  # LM weights + KV cache read per decoding step
    result["kv_bytes"] = kv_bytes(model, ours["prompt_len"] + args.new_tokens // 2)
    if args.peer:
        result["vllm"] = vllm_peer(model, ours["prompt_len"], args)
        progress("vllm", result["vllm"])
    if args.load_rss:
        result["load_rss"] = load_rss(model)
    result["variants"] = {}
    for spec in filter(None, args.variants.split(",")):
        del engine, model  # a fresh model: quantization is in place, and compiling freezes a copy of the weights
        model = random_model(args.preset, dtype, device)
        options = spec.split("+")
        (mode,) = set(options) - {"compile"} or {None}
        step = prepare_for_inference(model, quantize=mode, compile=args.compile or "compile" in options)
        engine = Engine(model, processor, step=step)
        run = decode_run(engine, request, args.new_tokens)
        run["weight_gb"] = lm_bytes(model) / 1e9
        step_bytes = lm_bytes(model) + kv_bytes(model, run["prompt_len"] + args.new_tokens // 2)
        add_bandwidth(run, step_bytes, result["machine"])
        if "transformers_generate" in result:
            run["speedup_vs_transformers"] = run["decode_tok_s"] / result["transformers_generate"]["decode_tok_s"]
        result["variants"][spec] = run
        progress(spec, run)

    reprobe_bandwidth(result, device)
    print_table(result)
    print_peers(result)
    print(json.dumps(result))


def reprobe_bandwidth(result: dict, device: torch.device) -> None:
    """Measure the bandwidths again at the end and count the higher of the two probes (a shared machine's bandwidth
    moves between the start and the end of a run: the ratios stay conservative); the runs' shares are redone."""
    machine, end = result["machine"], bandwidths(device)
    machine["probes_gbps"] = {key: [machine[key], end[key]] for key in ("read_gbps", "copy_gbps")}
    for key, value in end.items():
        machine[key] = max(machine[key], value)
    runs = [result["ours"], result.get("transformers_generate"), *result["variants"].values()]
    for run in filter(None, runs):
        add_bandwidth(run, run["step_bytes"], machine)


def vllm_peer(model: OwlForConditionalGeneration, prompt_len: int, args: argparse.Namespace) -> dict:
    """vLLM's decode rates and first-token time on this model's LM, from `vllm_peer.py` in the peer's Python."""
    python = sys.executable if args.peer == "vllm" else args.peer
    with tempfile.TemporaryDirectory() as tmp:
        model.language_model.save_pretrained(tmp)
        OwlProcessor.from_pretrained(TOKENIZER).tokenizer.save_pretrained(tmp)
        command = [python, str(ROOT / "benchmarks" / "vllm_peer.py"), tmp, "--prompt-len", str(prompt_len),
                   "--new-tokens", str(args.new_tokens), "--batches", args.batches, "--dtype", args.dtype]  # fmt: skip
        run = subprocess.run(command, capture_output=True, text=True)
    found = [line for line in run.stdout.splitlines() if line.startswith("vllm-peer-result: ")]
    if run.returncode or not found:
        raise RuntimeError(f"vllm_peer.py failed ({run.returncode}):\n{run.stderr[-3000:]}")
    return json.loads(found[-1].removeprefix("vllm-peer-result: "))


def print_peers(r: dict) -> None:
    """Decoding at batch 1 side by side, each against its bandwidth limit: the bytes it reads per step (LM weights at
    their stored size, and the KV cache) over the machine's read bandwidth."""
    kv, step = r["kv_bytes"], r["step_bytes"]
    rows = [("ours", r["ours"]["decode_tok_s"], step)]
    if "transformers_generate" in r:
        rows.append(("upstream path (transformers generate)", r["transformers_generate"]["decode_tok_s"], step))
    rows += [(f"ours, {spec}", q["decode_tok_s"], q["weight_gb"] * 1e9 + kv) for spec, q in r["variants"].items()]
    if "vllm" in r:
        rows.append((f"vLLM {r['vllm']['vllm_version']}", r["vllm"]["decode_tok_s"]["1"], step))
    read = r["machine"]["read_gbps"] * 1e9
    print(f"\n{'decode, batch 1':<40}{'tok/s':>8}{'of limit':>10}{'limit tok/s':>13}")
    for name, tok_s, step_bytes in rows:
        print(f"{name:<40}{tok_s:>8.2f}{tok_s * step_bytes / read:>10.0%}{read / step_bytes:>13.2f}")
    if "vllm" in r:
        for b, v in r["batch_throughput_tok_s"].items():
            print(f"batch {b}: ours {v:.2f} tok/s, vLLM {r['vllm']['decode_tok_s'][str(b)]:.2f} tok/s")


def _probes(machine: dict) -> str:
    probes = machine.get("probes_gbps")
    if not probes:
        return ""
    (read_start, read_end), (copy_start, copy_end) = probes["read_gbps"], probes["copy_gbps"]
    return (
        f" (the higher of start / end: read {read_start:.1f} / {read_end:.1f}, copy {copy_start:.1f} / {copy_end:.1f})"
    )


def progress(name: str, value: object) -> None:
    """A finished measurement, to stderr at once (a run cut short still tells what it measured)."""
    print(f"{name}: {json.dumps(value)}", file=sys.stderr, flush=True)


def print_table(r: dict) -> None:
    m = r["machine"]
    rows = [("device", r.get("card") or f"{r['cpu']}, {r['threads']} threads; decoding: {r['decode_kernels']}")]
    rows += [
        ("machine read / copy bandwidth", f"{m['read_gbps']:.1f} / {m['copy_gbps']:.1f} GB/s" + _probes(m)),
        (
            "matmul peak bf16 / fp32",
            f"{m['matmul_tflops']['bfloat16']:.2f} / {m['matmul_tflops']['float32']:.2f} TFLOP/s",
        ),
        ("LM parameters", f"{r['lm_params_b']:.2f} B"),
        (
            "ours: time to first token",
            f"{r['ours']['ttft_s'] * 1e3:.0f} ms ({r['ours']['prefill_mfu']:.0%} of matmul peak)",
        ),
        (
            "ours: decode",
            f"{r['ours']['decode_tok_s']:.2f} tok/s, {r['ours']['achieved_gbps']:.1f} GB/s, MBU {r['ours']['mbu']:.0%}"
            f" ({r['ours']['of_read_bandwidth']:.0%} of read)",
        ),
    ]
    if "transformers_generate" in r:
        b = r["transformers_generate"]
        decode = f"{b['decode_tok_s']:.2f} tok/s, MBU {b['mbu']:.0%} ({b['of_read_bandwidth']:.0%} of read)"
        rows.append(("transformers generate: decode", decode))
        rows.append(("speedup vs transformers", f"{r['speedup_vs_transformers']:.2f}x"))
    for spec, q in r["variants"].items():
        vs = f", {q['speedup_vs_transformers']:.2f}x transformers" if "speedup_vs_transformers" in q else ""
        decode = f"{q['decode_tok_s']:.2f} tok/s, {q['achieved_gbps']:.1f} GB/s ({q['of_read_bandwidth']:.0%} of read)"
        rows.append((f"{spec}: decode", f"{decode}; {q['weight_gb']:.2f} GB of LM weights{vs}"))
        rows.append(
            (f"{spec}: time to first token", f"{q['ttft_s'] * 1e3:.0f} ms (first run {q['first_run_s']:.0f} s)")
        )
    for b, v in r["batch_throughput_tok_s"].items():
        rows.append((f"batch {b} throughput", f"{v:.2f} tok/s"))
    t = r["second_turn"]
    rows.append(
        (
            "second turn, first token",
            f"{t['with_cache_s'] * 1e3:.0f} ms cached vs {t['without_cache_s'] * 1e3:.0f} ms ({t['speedup']:.1f}x)",
        )
    )
    if "load_rss" in r:
        rows.append(("peak RSS while loading", f"{r['load_rss']['ratio']:.2f}x the weights"))
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k:<{width}}  {v}")


if __name__ == "__main__":
    main()
