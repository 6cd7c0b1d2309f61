"""Training benchmark: tokens/s and achieved FLOP/s against the measured matmul peak, for each stage's policy.

    python benchmarks/bench_train.py --preset llama-1b --steps 3 [--compile]

Random weights of a real shape (the 7B ViT + abstractor and a 1.26 B LLaMA-shaped LM) drawn in bf16 as the
released checkpoints store them, float32 master weights for what trains, frozen Linear weights kept in bf16 (as the
recipe does: `store_frozen_linears`), bf16 autocast, AdamW on what the policy trains. FLOPs are counted from the
model: 2·params·tokens forward for every part; backward 4·params·tokens for trained parts, 2·params·tokens
(activation gradients only) for frozen parts and LoRA parts that sit between a trained part and the loss, nothing
for frozen parts upstream of every trained one; attention scores are not counted. Each step is set against the
bf16 matmul peak measured just before and after it (this machine's speed drifts); the medians are reported, and
the fastest step against the highest peak (the least disturbed measurement of each). Prints a table and, last, one
JSON line.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from bench_inference import random_model, timed  # this folder is on sys.path when the script runs

from openowl import OwlForConditionalGeneration
from openowl.train.config import OptimSection
from openowl.train.policy import MODEL_PARTS, POLICIES, apply_policy, backward_parts, store_frozen_linears
from openowl.train.recipe import compile_layers, make_optimizer


def part_params(model: OwlForConditionalGeneration) -> dict[str, int]:
    embed = model.language_model.get_input_embeddings().weight.numel()  # a lookup, not a matmul
    return {
        "vision": sum(p.numel() for p in model.vision_model.parameters()),
        "abstractor": sum(p.numel() for p in model.abstractor.parameters()),
        "language_model": sum(p.numel() for p in model.language_model.parameters()) - embed,
    }


def step_flops(model: OwlForConditionalGeneration, policy_name: str, batch: int, images: int, text: int) -> float:
    """Matmul FLOPs of one forward + backward (attention scores ignored: short sequences)."""
    policy = POLICIES[policy_name]
    params = part_params(model)
    tokens = {
        "vision": images * model.config.vision.num_positions,
        "abstractor": images * (model.config.num_query_tokens + model.config.vision.num_positions),
        "language_model": batch * (text + images // batch * model.config.num_visual_tokens),
    }
    through = backward_parts(policy)
    total = 0.0
    for part in MODEL_PARTS:
        work = params[part] * tokens[part]
        total += 2 * work  # forward
        if getattr(policy, part) == "full":
            total += 4 * work  # activation and weight gradients
        elif part in through:
            total += 2 * work  # activation gradients only (frozen or LoRA: the adapters' own FLOPs are negligible)
    return total


def run_stage(
    preset: str,
    policy_name: str,
    batch: int,
    text: int,
    steps: int,
    checkpointing: bool,
    frozen_bf16: bool,
    compile: bool,
) -> dict:
    torch.manual_seed(0)
    # Weights drawn in bf16, as the released checkpoints store them, and trained from float32 master copies.
    model = random_model(preset, torch.bfloat16, torch.device("cpu")).float().train()
    apply_policy(model, POLICIES[policy_name], gradient_checkpointing=checkpointing)
    if frozen_bf16:  # as the recipe does under bf16 autocast
        store_frozen_linears(model, torch.bfloat16)
    if compile:  # as the recipe does with train.compile
        compile_layers(model)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = make_optimizer(trainable, OptimSection(lr=1e-5))  # the recipe's
    size = model.config.vision.image_size
    ids = torch.randint(100, 30000, (batch, text))
    ids[:, 1 : 1 + model.config.num_visual_tokens] = -1  # one image per sample, after BOS
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone(),
              "pixel_values": torch.randn(batch, 3, size, size)}  # fmt: skip

    def one_step(eager: bool = False) -> float:
        # force_eager runs the compiled layers' plain Python: the same model, weights and step, not compiled.
        with torch.compiler.set_stance("force_eager" if eager else "default"):
            start = time.perf_counter()
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = model(**inputs).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            return time.perf_counter() - start

    first = one_step()  # warm-up: allocations, optimizer state, compiling
    if compile:
        one_step(eager=True)
    flops = step_flops(model, policy_name, batch, batch, text - model.config.num_visual_tokens)
    times, eager_times, ratios, peaks = [], [], [], []
    for i in range(steps):
        # This machine's speed drifts (shared cores): each step is set against the peak measured just before and
        # just after it, the higher of the two. With --compile, an eager step runs beside each compiled one, first
        # or second in turn, as the baseline.
        before = matmul_peak()
        if compile and i % 2:
            eager_times.append(one_step(eager=True))
        times.append(one_step())
        if compile and not i % 2:
            eager_times.append(one_step(eager=True))
        peaks.append(max(before, matmul_peak()))
        ratios.append(flops / times[-1] / peaks[-1])
    seconds = statistics.median(times)
    # The least disturbed measurements of each, as timeit advises for a shared machine: the fastest step against
    # the highest peak seen in the stage.
    best = flops / min(times) / max(peaks)
    result = {"policy": policy_name, "compiled": compile, "first_step_s": first, "step_s": seconds,
              "steps_s": times, "tokens_per_s": batch * text / seconds, "tflops": flops / seconds / 1e12,
              "of_peak": statistics.median(ratios), "best_of_peak": best, "peak_tflops": [p / 1e12 for p in peaks],
              "trainable_params": sum(p.numel() for p in trainable)}  # fmt: skip
    if compile:
        result["eager_steps_s"] = eager_times
        result["speedup_over_eager"] = statistics.median(e / c for e, c in zip(eager_times, times, strict=True))
    return result


def matmul_peak(n: int = 4096) -> float:
    """bf16 FLOP/s of an n×n×n matrix product, best of a few after a short warm-up."""
    a, b = torch.randn(n, n, dtype=torch.bfloat16), torch.randn(n, n, dtype=torch.bfloat16)
    return 2 * n**3 / timed(lambda: a @ b, repeat=3, warmup_s=0.3)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="llama-1b")
    parser.add_argument("--policies", default="stage1,stage2", help="comma-separated policy names")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--text", type=int, default=192, help="sequence length incl. the 65 visual tokens")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--gradient-checkpointing", action="store_true")
    compile_help = "torch.compile each layer, as train.compile does, and time an eager step beside each compiled one"
    parser.add_argument("--compile", action="store_true", help=compile_help)
    frozen_help = "keep frozen Linear weights in float32 (autocast then casts them at every call)"
    parser.add_argument("--frozen-fp32", action="store_true", help=frozen_help)
    args = parser.parse_args()

    result = {"preset": args.preset, "threads": torch.get_num_threads(), "batch": args.batch, "seq": args.text,
              "stages": []}  # fmt: skip
    for name in args.policies.split(","):
        stage = run_stage(
            args.preset,
            name,
            args.batch,
            args.text,
            args.steps,
            args.gradient_checkpointing,
            not args.frozen_fp32,
            args.compile,
        )
        result["stages"].append(stage)
    print(f"{result['threads']} threads, batch {args.batch} × {args.text} tokens, median of {args.steps} steps")
    for s in result["stages"]:
        trained = s["trainable_params"] / 1e6
        peak = statistics.median(s["peak_tflops"])
        print(f"{s['policy']:<18} {s['step_s']:6.2f} s/step  {s['tokens_per_s']:7.1f} tok/s  "
              f"{s['tflops']:.3f} TFLOP/s  {s['of_peak']:.0%} of the bf16 matmul peak "
              f"(measured around each step, median {peak:.2f} TFLOP/s; fastest step against highest peak "
              f"{s['best_of_peak']:.0%})  "
              f"({trained:.1f} M trained; first step {s['first_step_s']:.0f} s)")  # fmt: skip
        if s["compiled"]:
            eager = statistics.median(s["eager_steps_s"])
            print(f"{'':<18} eager steps beside them: {eager:.2f} s/step; compiled {s['speedup_over_eager']:.2f}× "
                  "faster (median of the pairs)")  # fmt: skip
    print(json.dumps(result))


if __name__ == "__main__":
    main()
