"""Training benchmark: tokens/s and achieved FLOP/s against the measured matmul peak, for each stage's policy.

    python benchmarks/bench_train.py --preset llama-1b --steps 3

Random weights of a real shape (the 7B ViT + abstractor and a 1.26 B LLaMA-shaped LM), float32 master weights,
bf16 autocast, AdamW on what the policy trains. FLOPs are counted from the model: 2·params·tokens forward for every
part; backward 4·params·tokens for trained parts, 2·params·tokens (activation gradients only) for frozen parts
and LoRA parts that sit between a trained part and the loss, nothing for frozen parts upstream of every trained
one. Prints a
table and, last, one JSON line.
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from bench_inference import machine_limits, random_model  # this folder is on sys.path when the script runs

from openowl import OwlForConditionalGeneration
from openowl.train.policy import PARTS, POLICIES, apply_policy, backward_parts


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
    for part in PARTS:
        work = params[part] * tokens[part]
        total += 2 * work  # forward
        if getattr(policy, part) == "full":
            total += 4 * work  # activation and weight gradients
        elif part in through:
            total += 2 * work  # activation gradients only (frozen or LoRA: the adapters' own FLOPs are negligible)
    return total


def run_stage(preset: str, policy_name: str, batch: int, text: int, steps: int, checkpointing: bool) -> dict:
    torch.manual_seed(0)
    model = random_model(preset, torch.float32, torch.device("cpu")).train()  # float32 master weights
    apply_policy(model, POLICIES[policy_name], gradient_checkpointing=checkpointing)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-5)
    size = model.config.vision.image_size
    ids = torch.randint(100, 30000, (batch, text))
    ids[:, 1 : 1 + model.config.num_visual_tokens] = -1  # one image per sample, after BOS
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone(),
              "pixel_values": torch.randn(batch, 3, size, size)}  # fmt: skip

    def one_step() -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(**inputs).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    one_step()  # warm-up: allocations, optimizer state
    start = time.perf_counter()
    for _ in range(steps):
        one_step()
    seconds = (time.perf_counter() - start) / steps
    flops = step_flops(model, policy_name, batch, batch, text - model.config.num_visual_tokens)
    return {"policy": policy_name, "step_s": seconds, "tokens_per_s": batch * text / seconds,
            "tflops": flops / seconds / 1e12, "trainable_params": sum(p.numel() for p in trainable)}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="llama-1b")
    parser.add_argument("--policies", default="stage1,stage2", help="comma-separated policy names")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--text", type=int, default=192, help="sequence length incl. the 65 visual tokens")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--gradient-checkpointing", action="store_true")
    args = parser.parse_args()

    peak = machine_limits(torch.device("cpu"))["matmul_tflops"]["bfloat16"]
    result = {"preset": args.preset, "threads": torch.get_num_threads(), "bf16_matmul_peak_tflops": peak,
              "batch": args.batch, "seq": args.text, "stages": []}  # fmt: skip
    for name in args.policies.split(","):
        stage = run_stage(args.preset, name, args.batch, args.text, args.steps, args.gradient_checkpointing)
        stage["of_peak"] = stage["tflops"] / peak
        result["stages"].append(stage)
    print(f"bf16 matmul peak {peak:.2f} TFLOP/s, {result['threads']} threads, batch {args.batch} × {args.text} tokens")
    for s in result["stages"]:
        trained = s["trainable_params"] / 1e6
        print(f"{s['policy']:<18} {s['step_s']:6.2f} s/step  {s['tokens_per_s']:7.1f} tok/s  "
              f"{s['tflops']:.3f} TFLOP/s  {s['of_peak']:.0%} of peak  ({trained:.1f} M trained)")  # fmt: skip
    print(json.dumps(result))


if __name__ == "__main__":
    main()
