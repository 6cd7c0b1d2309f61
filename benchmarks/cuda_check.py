"""CUDA checks that the CPU test suite cannot make: parity on the GPU, half precision, quantization, compiled decoding.

python benchmarks/cuda_check.py        # prints one line per check, then a JSON line; exits 1 on a failure
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

from openowl import OwlForConditionalGeneration, OwlProcessor
from openowl.infer.engine import Engine, Request
from openowl.infer.generate import decode_one_token, prefill, static_cache
from openowl.infer.prepare import compiled_decode, prepare_for_inference
from openowl.infer.quantize import quantize
from openowl.infer.sampling import SamplingParams

FIXTURE = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "parity-v1"
CASES = ["text_only", "one_image", "two_images", "multi_turn", "unicode"]


def compiled_step_cosine(engine: Engine, request: Request) -> float:
    """Cosine between the logits of one compiled decoding step and the eager step's, after the same prefill."""
    model, processor = engine.model, engine.processor
    batch = processor.pad([processor.tokenize_prompt(request.prompt)])
    cache, length = static_cache(model, 256), 256
    step = compiled_decode(model)
    with torch.no_grad():
        logits, mask = prefill(
            model, batch["input_ids"].to(model.device), batch["attention_mask"], cache,
            engine.image_features(request.images),
        )  # fmt: skip
        token, used = logits.argmax(-1), mask.shape[1]
        full = torch.cat([mask, mask.new_zeros(1, length - used)], dim=1)
        full[:, used] = 1
        positions = torch.tensor([[used]], device=model.device)
        for _ in range(3):  # past cudagraph trees' warm-up and recording: a replay
            fast = step(model, token, full, positions, cache).float().clone()
        slow = decode_one_token(model, token, full, positions, cache).float()  # rewrites the same cache slot
    return torch.nn.functional.cosine_similarity(fast, slow).item()


def main() -> int:
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    device = torch.device("cuda")
    expected = load_file(FIXTURE / "expected.safetensors")
    manifest = json.loads((FIXTURE / "manifest.json").read_text())
    results: dict[str, object] = {"card": torch.cuda.get_device_name(device)}

    model = OwlForConditionalGeneration.from_pretrained(FIXTURE / "checkpoint", dtype=torch.float32, device=device)

    def fixture_case(name: str) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, bool]:
        """A fixture case's ids, pixels and upstream greedy ids, and whether `model.generate` gives those ids."""
        ids = expected[f"{name}.input_ids"].to(device)
        pixels = expected.get(f"{name}.pixel_values")
        pixels = None if pixels is None else pixels.to(device)
        reference = expected[f"{name}.greedy_ids"][:, 1:].to(device)
        new = model.generate(input_ids=ids, pixel_values=pixels, max_new_tokens=24, do_sample=False)
        return ids, pixels, reference, bool(torch.equal(new, reference))

    worst = 0.0
    for name in CASES:
        ids, pixels, reference, results[f"greedy_{name}"] = fixture_case(name)
        with torch.no_grad():
            logits = model(input_ids=torch.cat([ids, reference], 1), pixel_values=pixels).logits
        n = ids.shape[1]
        worst = max(worst, (logits[:, n - 1 : n + 3].cpu() - expected[f"{name}.greedy_step_logits"]).abs().max().item())
    results["step_logits_max_abs_diff"] = worst
    results["step_logits_within_1e-3"] = worst <= 1e-3

    processor = OwlProcessor.from_pretrained(FIXTURE / "checkpoint")
    images = {c["name"]: [FIXTURE / "images" / i for i in c["images"]] for c in manifest["image_cases"]}
    requests = [Request(c["prompt"], images[c["name"]]) for c in manifest["image_cases"]]
    params = SamplingParams(max_new_tokens=16)
    engine = Engine(model, processor, step=prepare_for_inference(model))
    batch = [c.token_ids for c in engine.generate(requests, params)]
    alone = [engine.generate([r], params)[0].token_ids for r in requests]
    results["batch_equals_one_by_one_fp32"] = batch == alone
    compiled = Engine(model, processor, step=prepare_for_inference(model, compile=True))
    results["compiled_equals_eager_fp32"] = [c.token_ids for c in compiled.generate(requests, params)] == batch
    for name in CASES:  # the engines fused the projections (infer/fuse.py): the upstream tokens still
        results[f"fused_greedy_{name}"] = fixture_case(name)[3]

    for dtype in (torch.bfloat16, torch.float16):
        half = OwlForConditionalGeneration.from_pretrained(FIXTURE / "checkpoint", dtype=dtype, device=device)
        half_engine = Engine(half, processor, step=prepare_for_inference(half))
        text = half_engine.generate(requests[:2], params)
        results[f"generates_{str(dtype)[6:]}"] = all(len(c.token_ids) > 0 for c in text)
        if dtype == torch.bfloat16:
            step_cos = compiled_step_cosine(half_engine, requests[1])
            results["bf16_compiled_step_cosine"] = step_cos
            results["bf16_compiled_step_close"] = step_cos > 0.999
        inputs = {k: expected[f"one_image.{k}"].to(device) for k in ("input_ids", "pixel_values")}
        with torch.no_grad():
            ref = half(**inputs).logits.float()
        for mode in ("int8", "int4"):
            if mode == "int4" and dtype != torch.bfloat16:
                continue
            q = OwlForConditionalGeneration.from_pretrained(FIXTURE / "checkpoint", dtype=dtype, device=device)
            try:
                quantize(q, mode, group_size=32)
                with torch.no_grad():
                    out = q(**inputs).logits.float()
                cos = torch.nn.functional.cosine_similarity(out.flatten(), ref.flatten(), dim=0).item()
                results[f"{mode}_{str(dtype)[6:]}_cosine"] = cos
                if mode == "int8" and dtype == torch.bfloat16:
                    step_cos = compiled_step_cosine(Engine(q, processor, step=prepare_for_inference(q)), requests[1])
                    results["int8_bf16_compiled_step_cosine"] = step_cos
                    results["int8_bf16_compiled_step_close"] = step_cos > 0.999
            except Exception as err:  # report, don't hide
                results[f"{mode}_{str(dtype)[6:]}_error"] = f"{type(err).__name__}: {err}"[:300]

    failed = [k for k, v in results.items() if v is False or k.endswith("_error")]
    for key, value in results.items():
        print(f"{key:40s} {value}")
    print(json.dumps({**results, "failed": failed}))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
