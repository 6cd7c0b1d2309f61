"""Training benchmark: tokens/s and achieved FLOP/s against the measured matmul peak, for each stage's policy; with
--data, what the data path costs a step; with --startup, how start-up grows with the data.

    python benchmarks/bench_train.py --preset llama-1b --steps 3 [--compile]
    python benchmarks/bench_train.py --data [--steps 2 --rounds 3]
    python benchmarks/bench_train.py --startup [--repeats 3]

Random weights of a real shape (the 7B ViT + abstractor and a 1.26 B LLaMA-shaped LM) drawn in bf16 as the
released checkpoints store them, float32 master weights for what trains, frozen Linear weights kept in bf16 (as the
recipe does: `store_frozen_linears`), bf16 autocast, AdamW on what the policy trains. FLOPs are counted from the
model: 2·params·tokens forward for every part; backward 4·params·tokens for trained parts, 2·params·tokens
(activation gradients only) for frozen parts and LoRA parts that sit between a trained part and the loss, nothing
for frozen parts upstream of every trained one; attention scores are not counted. Each step is set against the
bf16 matmul peak measured just before and after it (this machine's speed drifts); the medians are reported, and
the fastest step against the highest peak (the least disturbed measurement of each). Prints a table and, last, one
JSON line.

--data trains owl-small-base (the real model: the ViT, a fresh abstractor, SmolLM2 with LoRA; policy stage2, float32)
through `TrainRecipe` on easy-vqa questions, read into memory from jsonl or streamed from tar shards, with 0 and 2
DataLoader workers, and with the frozen ViT's feature cache (`data.augment=false`, `data.features`). Every variant
is set up in this one process and they take turns, in rounds of `--steps` steps (order reversed every other round);
each step is timed as the recipe's loop takes it: blocked in `next(batches)` (waiting for data), then
`_optimizer_step`. Reported per variant: samples/s, the share of step time spent waiting for data, and the
samples/s the same steps would give without the wait (the compute-bound ceiling), medians over rounds; and the
token positions a step computes, padding included (in-memory batches are grouped by length, streamed ones not).

--startup times `TrainRecipe.setup()` to the end of the first optimizer step, and the process's peak RSS, on 10k
and 100k synthetic samples (distinct 64×64 PNGs, one per sample), read into memory and streamed, each in a fresh
process, on the tests' tiny parity checkpoint (what is measured is the data's start-up, not the model's).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch
from bench_inference import random_model, timed  # this folder is on sys.path when the script runs

from openowl import OwlForConditionalGeneration
from openowl.train.config import OptimSection, TrainConfig, load_config
from openowl.train.policy import MODEL_PARTS, POLICIES, apply_policy, backward_parts, store_frozen_linears
from openowl.train.recipe import TrainRecipe, compile_layers, make_optimizer, run_feature_cache
from openowl.train.stream import write_shards

TINY_CHECKPOINT = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "parity-v1" / "checkpoint"


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


def run_compute(args: argparse.Namespace) -> None:
    """The default mode: each policy's steps against the bf16 matmul peak."""
    steps = args.steps or 3
    result = {"preset": args.preset, "threads": torch.get_num_threads(), "batch": args.batch, "seq": args.text,
              "stages": []}  # fmt: skip
    for name in args.policies.split(","):
        stage = run_stage(
            args.preset,
            name,
            args.batch,
            args.text,
            steps,
            args.gradient_checkpointing,
            not args.frozen_fp32,
            args.compile,
        )
        result["stages"].append(stage)
    print(f"{result['threads']} threads, batch {args.batch} × {args.text} tokens, median of {steps} steps")
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


# --- the data path (--data) -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Variant:
    """One way of feeding the same model: where the samples come from, how many DataLoader workers, which images."""

    streamed: bool
    workers: int
    cache: bool  # the frozen ViT's cached outputs (data.features, data.augment=false) instead of pixels

    @property
    def name(self) -> str:
        return f"{'streamed' if self.streamed else 'in-memory'}{' + cache' if self.cache else ''}, {self.workers} w"


DATA_VARIANTS = tuple(Variant(streamed, workers, cache) for cache in (False, True) for streamed in (False, True)
                      for workers in (0, 2))  # fmt: skip


def easy_vqa_subset(folder: Path, images: int) -> tuple[Path, str]:
    """owl-small's stage-2 rows (easy-vqa's training questions, about 10 per image) about the first `images`
    training images, as a jsonl file and as tar shards of 128 samples; returns the file and the shards' glob."""
    from openowl.data.easy_vqa import write_training_data

    write_training_data(folder / "easy-vqa")
    rows = [json.loads(line) for line in (folder / "easy-vqa" / "questions_train.jsonl").read_text().splitlines()]
    chosen = set(list(dict.fromkeys(row["image"] for row in rows))[:images])
    rows = [row for row in rows if row["image"] in chosen]
    jsonl = folder / "questions.jsonl"
    jsonl.write_text("".join(json.dumps(row) + "\n" for row in rows))
    write_shards(rows, str(folder / "shards" / "train-{:05d}.tar"), per_shard=128)
    return jsonl, str(folder / "shards" / "*.tar")


def owl_small_overrides(train: str, micro_batch: int) -> list[str]:
    """owl-small-base, stage 2 (ViT and abstractor frozen, LoRA on the LM), float32, on easy-vqa's questions."""
    return ["model.path=owl-small-base", f"data.train={train}", "data.format=llava", "data.max_length=128",
            "policy=stage2", f"train.micro_batch_size={micro_batch}", "train.max_steps=100000"]  # fmt: skip


def variant_config(v: Variant, jsonl: Path, shards: str, features: Path, micro_batch: int, out: Path) -> TrainConfig:
    overrides = owl_small_overrides(shards if v.streamed else str(jsonl), micro_batch)
    overrides += [f"train.num_workers={v.workers}", f"train.output_dir={out}"]
    if v.cache:
        overrides += ["data.augment=false", f"data.features={features}"]
    return load_config(None, overrides)


class Step(NamedTuple):
    waiting: float  # seconds blocked in next(batches)
    total: float  # seconds of the whole step, waiting included
    tokens: int  # token positions of its batches, padding included


def timed_steps(recipe: TrainRecipe, batches, steps: int) -> list[Step]:
    """`steps` optimizer steps, each timed as `TrainRecipe.train` takes it (without its logging)."""
    out = []
    for _ in range(steps):
        start = time.perf_counter()
        micro = [next(batches) for _ in range(recipe.cfg.train.grad_accum)]
        fed = time.perf_counter()
        recipe._optimizer_step(micro)
        out.append(Step(fed - start, time.perf_counter() - start, sum(b["input_ids"].numel() for b in micro)))
    return out


def start_variant(v: Variant, cfg: TrainConfig, warmup: int) -> dict | str:
    """Set up a variant's recipe and take its warm-up steps (allocations; the DataLoader's workers start, a stream
    fills its shuffle buffer); returns its state, or why it can't run."""
    recipe = TrainRecipe(cfg)
    recipe.setup()
    if v.cache and recipe.dataset.features is None:
        return "not measured: this recipe does not give a streamed data.train its data.features"
    before = len(multiprocessing.active_children())
    batches = recipe._batches()
    first = timed_steps(recipe, batches, warmup)
    workers = len(multiprocessing.active_children()) - before
    return {"recipe": recipe, "batches": batches, "warmup": first, "worker_processes": workers, "rounds": []}


def summarize(rounds: list[list[Step]], samples_per_step: int) -> dict:
    """Samples/s, the share of step time spent waiting for data and the samples/s without the wait, each over a
    round's steps, medians over the rounds; the median step, wait and padded batch size."""

    def median(fn) -> float:
        return statistics.median(fn(steps) for steps in rounds)

    every = [step for steps in rounds for step in steps]
    return {
        "samples_per_s": median(lambda s: samples_per_step * len(s) / sum(x.total for x in s)),
        "waiting_share": median(lambda s: sum(x.waiting for x in s) / sum(x.total for x in s)),
        "compute_samples_per_s": median(lambda s: samples_per_step * len(s) / sum(x.total - x.waiting for x in s)),
        "step_s": statistics.median(x.total for x in every),
        "waiting_s": statistics.median(x.waiting for x in every),
        "tokens_per_step": statistics.median(x.tokens for x in every),
    }


def run_data(args: argparse.Namespace) -> None:
    steps = args.steps or 2
    with tempfile.TemporaryDirectory(prefix="bench-train-data-") as tmp:
        folder = Path(tmp)
        jsonl, shards = easy_vqa_subset(folder, args.images)
        samples = len(jsonl.read_text().splitlines())
        start = time.perf_counter()
        overrides = owl_small_overrides(str(jsonl), args.micro_batch)
        cache = run_feature_cache(load_config(None, [*overrides, "data.augment=false", f"data.features={folder}/f"]))
        cache_s = time.perf_counter() - start
        runs, skipped = {}, {}
        for i, v in enumerate(DATA_VARIANTS):
            cfg = variant_config(v, jsonl, shards, folder / "f", args.micro_batch, folder / f"run-{i}")
            state = start_variant(v, cfg, args.warmup)
            if isinstance(state, str):
                skipped[v.name] = state
            else:
                runs[v] = state
        for r in range(args.rounds):  # the variants take turns, in reversed order every other round
            for v in list(runs) if r % 2 == 0 else list(runs)[::-1]:
                runs[v]["rounds"].append(timed_steps(runs[v]["recipe"], runs[v]["batches"], steps))
        for state in runs.values():
            state["batches"].close()  # its DataLoader's workers end with it
    result = {"model": "owl-small-base", "policy": "stage2", "dtype": "float32", "threads": torch.get_num_threads(),
              "micro_batch": args.micro_batch, "samples": samples, "images": args.images, "rounds": args.rounds,
              "steps_per_round": steps, "warmup_steps": args.warmup, "feature_cache_build_s": cache_s,
              "feature_cache": cache["line"], "skipped": skipped, "variants": []}  # fmt: skip
    for v, state in runs.items():
        entry = {"variant": v.name, "streamed": v.streamed, "workers": v.workers, "cache": v.cache,
                 "worker_processes": state["worker_processes"], "warmup_s": [x.total for x in state["warmup"]],
                 "rounds": state["rounds"], **summarize(state["rounds"], args.micro_batch)}  # fmt: skip
        result["variants"].append(entry)
    print_data_table(result)
    print(json.dumps(result))


def print_data_table(result: dict) -> None:
    print(f"owl-small-base, stage 2, float32, micro-batch {result['micro_batch']}, {result['threads']} threads; "
          f"{result['samples']} easy-vqa questions about {result['images']} images; {result['rounds']} rounds of "
          f"{result['steps_per_round']} steps per variant after {result['warmup_steps']} warm-up, medians over the "
          f"rounds; feature cache built in {result['feature_cache_build_s']:.0f} s\n")  # fmt: skip
    print("| data | workers | samples/s | waiting for data | step | samples/s without the wait | tokens a step "
          "(padded) | first step |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|")
    for e in result["variants"]:
        data = e["variant"].rsplit(",", 1)[0]
        workers = f"{e['workers']} ({e['worker_processes']} processes)" if e["workers"] else "0"
        print(f"| {data} | {workers} | {e['samples_per_s']:.2f} | {e['waiting_share']:.1%} "
              f"({e['waiting_s'] * 1e3:.0f} ms) | {e['step_s']:.2f} s | {e['compute_samples_per_s']:.2f} | "
              f"{e['tokens_per_step']:.0f} | {e['warmup_s'][0]:.1f} s |")  # fmt: skip
    for name, why in result["skipped"].items():
        print(f"{name}: {why}")
    print()


# --- start-up (--startup) -------------------------------------------------------------------------------------------

STARTUP_KINDS = ("in-memory", "streamed")
COLOURS = ("red", "green", "blue", "yellow", "black", "gray", "teal", "brown")
RGB = ((220, 30, 30), (30, 160, 40), (30, 60, 220), (230, 210, 30), (10, 10, 10), (128, 128, 128), (0, 128, 128),
       (140, 80, 20))  # fmt: skip


def synthetic_data(folder: Path, sizes: list[int]) -> dict[int, dict[str, str]]:
    """`max(sizes)` distinct 64×64 PNGs (a rectangle of one of 8 colours, placed at random) and, for each size, that
    many one-turn questions about the first `size` images ("what color is the shape?"), as a jsonl file and as tar
    shards of 1000 samples. Returns `{size: {kind: data.train}}`."""
    from PIL import Image, ImageDraw

    (folder / "images").mkdir(parents=True)
    rows = []
    for i in range(max(sizes)):
        rng = random.Random(i)
        colour = rng.randrange(len(COLOURS))
        image = Image.new("RGB", (64, 64), (255, 255, 255))
        x, y = rng.randrange(4, 40), rng.randrange(4, 40)
        ImageDraw.Draw(image).rectangle((x, y, x + rng.randrange(8, 24), y + rng.randrange(8, 24)), fill=RGB[colour])
        path = folder / "images" / f"{i}.png"
        image.save(path)
        turns = [{"from": "human", "value": "<image>\nwhat color is the shape?"},
                 {"from": "gpt", "value": COLOURS[colour]}]  # fmt: skip
        rows.append({"id": f"s-{i}", "image": str(path), "conversations": turns})
    out = {}
    for size in sizes:
        jsonl = folder / f"train-{size}.jsonl"
        jsonl.write_text("".join(json.dumps(row) + "\n" for row in rows[:size]))
        write_shards(rows[:size], str(folder / f"shards-{size}" / "train-{:05d}.tar"), per_shard=1000)
        out[size] = {"in-memory": str(jsonl), "streamed": str(folder / f"shards-{size}" / "*.tar")}
    return out


def startup_child(train: str, out: str) -> None:
    """In a fresh process: `setup()` to the end of the first optimizer step on the tiny checkpoint, and peak RSS;
    prints one JSON line."""
    cfg = load_config(None, [f"model.path={TINY_CHECKPOINT}", f"data.train={train}", "data.format=llava",
                             "policy=stage2", "train.micro_batch_size=8", "train.max_steps=1",
                             f"train.output_dir={out}"])  # fmt: skip
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    start = time.perf_counter()
    recipe = TrainRecipe(cfg)
    recipe.setup()
    set_up = time.perf_counter()
    recipe._optimizer_step([next(recipe._batches())])
    end = time.perf_counter()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"setup_s": set_up - start, "first_step_s": end - start, "peak_rss_mib": peak,
                      "rss_before_setup_mib": rss_before}))  # fmt: skip


def run_startup(args: argparse.Namespace) -> None:
    sizes = [int(n) for n in args.sizes.split(",")]
    with tempfile.TemporaryDirectory(prefix="bench-train-startup-") as tmp:
        folder = Path(tmp)
        start = time.perf_counter()
        data = synthetic_data(folder, sizes)
        made_s = time.perf_counter() - start
        measured: dict[tuple[str, int], list[dict]] = {(kind, n): [] for kind in STARTUP_KINDS for n in sizes}
        for r in range(args.repeats):  # sizes and kinds take turns, the order reversed every other repeat
            order = [(kind, n) for kind in STARTUP_KINDS for n in sizes]
            for kind, n in order if r % 2 == 0 else order[::-1]:
                command = [sys.executable, __file__, "--startup-child", data[n][kind], str(folder / f"run-{kind}-{n}")]
                done = subprocess.run(command, capture_output=True, text=True)
                if done.returncode:
                    raise RuntimeError(f"{kind}, {n} samples failed:\n{done.stderr[-3000:]}")
                measured[kind, n].append(json.loads(done.stdout.strip().splitlines()[-1]))
    result = {"model": "tests' parity checkpoint", "threads": torch.get_num_threads(), "repeats": args.repeats,
              "data_written_s": made_s, "runs": []}  # fmt: skip
    for (kind, n), runs in measured.items():
        entry = {"kind": kind, "samples": n, "measurements": runs}
        for key in ("setup_s", "first_step_s", "peak_rss_mib", "rss_before_setup_mib"):
            entry[key] = statistics.median(run[key] for run in runs)
        result["runs"].append(entry)
    for kind in STARTUP_KINDS:
        small, large = (next(e for e in result["runs"] if e["kind"] == kind and e["samples"] == n) for n in sizes)
        result[f"{kind}_ratio"] = {key: large[key] / small[key] for key in ("first_step_s", "peak_rss_mib")}
    print_startup_table(result, sizes)
    print(json.dumps(result))


def print_startup_table(result: dict, sizes: list[int]) -> None:
    print(f"tiny parity checkpoint, stage 2, micro-batch 8, {result['threads']} threads; distinct 64×64 PNGs; each "
          f"measurement in a fresh process, medians of {result['repeats']}\n")  # fmt: skip
    small, large = (f"{n // 1000}k" if n % 1000 == 0 else str(n) for n in sizes)
    print(f"| data | to the first step, {small} | {large} | {large} ÷ {small} | peak RSS, {small} | {large} | "
          f"{large} ÷ {small} |")  # fmt: skip
    print("|---|---|---|---|---|---|---|")
    for kind in STARTUP_KINDS:
        a, b = (next(e for e in result["runs"] if e["kind"] == kind and e["samples"] == n) for n in sizes)
        ratio = result[f"{kind}_ratio"]
        times = f"{a['first_step_s']:.2f} s | {b['first_step_s']:.2f} s | {ratio['first_step_s']:.2f}×"
        rss = f"{a['peak_rss_mib']:.0f} MiB | {b['peak_rss_mib']:.0f} MiB | {ratio['peak_rss_mib']:.2f}×"
        print(f"| {kind} | {times} | {rss} |")
    before = statistics.median(e["rss_before_setup_mib"] for e in result["runs"])
    print(f"\n(RSS before setup(), after the imports: {before:.0f} MiB)\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="llama-1b")
    parser.add_argument("--policies", default="stage1,stage2", help="comma-separated policy names")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--text", type=int, default=192, help="sequence length incl. the 65 visual tokens")
    parser.add_argument("--steps", type=int, help="steps per stage (default 3); with --data, per round (default 2)")
    parser.add_argument("--gradient-checkpointing", action="store_true")
    compile_help = "torch.compile each layer, as train.compile does, and time an eager step beside each compiled one"
    parser.add_argument("--compile", action="store_true", help=compile_help)
    frozen_help = "keep frozen Linear weights in float32 (autocast then casts them at every call)"
    parser.add_argument("--frozen-fp32", action="store_true", help=frozen_help)
    data_help = "time owl-small-base's steps fed in-memory or streamed, with 0 or 2 workers, with the feature cache"
    parser.add_argument("--data", action="store_true", help=data_help)
    parser.add_argument("--rounds", type=int, default=3, help="with --data: rounds in which the variants take turns")
    parser.add_argument("--warmup", type=int, default=1, help="with --data: untimed steps per variant before")
    parser.add_argument("--micro-batch", type=int, default=8, help="with --data: train.micro_batch_size")
    parser.add_argument("--images", type=int, default=64, help="with --data: easy-vqa images (about 10 rows each)")
    startup_help = "time setup() to the first step, and peak RSS, on 10k and 100k samples, in memory and streamed"
    parser.add_argument("--startup", action="store_true", help=startup_help)
    parser.add_argument("--repeats", type=int, default=3, help="with --startup: fresh processes per measurement")
    parser.add_argument("--sizes", default="10000,100000", help="with --startup: the two numbers of samples")
    parser.add_argument("--startup-child", nargs=2, metavar=("TRAIN", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.startup_child:
        startup_child(*args.startup_child)
    elif args.data:
        run_data(args)
    elif args.startup:
        run_startup(args)
    else:
        run_compute(args)


if __name__ == "__main__":
    main()
