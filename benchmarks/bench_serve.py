"""Serving benchmark: total tokens/s of N concurrent clients against the same N requests sent one after another.

    python benchmarks/bench_serve.py --preset tiny

Writes a model of the preset's shape with N(0, 0.02) weights (and the fixture's LLaMA tokenizer) to a temporary
folder, starts `openowl serve` on it in a subprocess on a free loopback port, and times, in interleaved rounds:

- sequential: the N requests one after another;
- concurrent: the N requests at once (the scheduler decodes them in the same steps).

Every request is an image of its own and a question, greedy, streamed over server-sent events, `--new-tokens` long.
Tokens are counted from each stream's `usage`. The server's metrics give the mean rows per decoding step (how full the
batch was). Then, once: the gaps between one stream's chunks while a `--long-prompt`-token prompt arrives mid-stream
(its prefill runs `--prefill-chunk` tokens per step, between the stream's decoding steps; `--prefill-chunk 100000`
shows the stall of prefilling it at once). Prints a table and, last, one JSON line with the medians and the ratio.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import torch
from PIL import Image

from openowl import OwlForConditionalGeneration, OwlProcessor, get_preset

ROOT = Path(__file__).resolve().parents[1]
TOKENIZER = ROOT / "tests" / "fixtures" / "parity-v1" / "checkpoint"
MODEL_NAME = "bench"


def write_random_model(preset: str, folder: Path) -> None:
    """A checkpoint of the preset's shape: weight matrices N(0, 0.02), norms at 1, the real tokenizer."""
    torch.manual_seed(0)
    config = get_preset(preset)
    model = OwlForConditionalGeneration(config)
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() >= 2:
                param.normal_(0.0, 0.02)
    model.save_pretrained(folder)
    tokenizer = OwlProcessor.from_pretrained(TOKENIZER).tokenizer
    processor = OwlProcessor(tokenizer, image_size=config.vision.image_size, num_visual_tokens=config.num_visual_tokens)
    processor.save_pretrained(folder)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(folder: Path, port: int, batch: int, prefill_chunk: int) -> subprocess.Popen:
    command = [sys.executable, "-m", "openowl", "serve", "--model", str(folder), "--port", str(port),
               "--served-model-name", MODEL_NAME, "--max-batch-size", str(batch), "--max-queue", str(4 * batch),
               "--prefill-chunk", str(prefill_chunk), "--log-level", "warning"]  # fmt: skip
    server = subprocess.Popen(command)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"the server exited with code {server.returncode}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return server
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    server.terminate()
    raise RuntimeError("the server did not start within 300 s")


def image_uri(index: int) -> str:
    colour = ((53 * index) % 256, (97 * index) % 256, (151 * index) % 256)
    image = Image.effect_noise((96, 96), 40).convert("RGB")
    image = Image.blend(image, Image.new("RGB", image.size, colour), 0.6)
    out = io.BytesIO()
    image.save(out, "PNG")
    return "data:image/png;base64," + base64.b64encode(out.getvalue()).decode()


def request_body(index: int, new_tokens: int) -> dict:
    parts = [{"type": "image_url", "image_url": {"url": image_uri(index)}},
             {"type": "text", "text": f"Describe picture number {index} in detail."}]  # fmt: skip
    return {"model": MODEL_NAME, "messages": [{"role": "user", "content": parts}], "max_tokens": new_tokens,
            "temperature": 0, "stream": True, "stream_options": {"include_usage": True}}  # fmt: skip


async def one_request(http: httpx.AsyncClient, body: dict) -> tuple[int, float]:
    """Stream one answer. -> (completion tokens, seconds)."""
    start = time.perf_counter()
    tokens = 0
    async with http.stream("POST", "/v1/chat/completions", json=body) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if line.startswith("data: {") and '"usage"' in line:
                tokens = json.loads(line[6:]).get("usage", {}).get("completion_tokens", tokens)
    return tokens, time.perf_counter() - start


async def run_mode(url: str, bodies: list[dict], concurrent: bool) -> dict:
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=httpx.Limits(max_connections=64)) as http:
        before = metrics(url)
        start = time.perf_counter()
        if concurrent:
            results = await asyncio.gather(*(one_request(http, body) for body in bodies))
        else:
            results = [await one_request(http, body) for body in bodies]
        seconds = time.perf_counter() - start
        after = metrics(url)
    tokens = sum(t for t, _ in results)
    steps = after["openowl_decode_steps_total"] - before["openowl_decode_steps_total"]
    generated = after["openowl_generation_tokens_total"] - before["openowl_generation_tokens_total"]
    return {"tokens": tokens, "seconds": seconds, "tok_s": tokens / seconds,
            "latency_p50_s": statistics.median(s for _, s in results),
            "rows_per_step": generated / max(steps, 1)}  # fmt: skip


async def stall(url: str, body: dict, long_prompt: int) -> dict:
    """The gaps between one stream's chunks while a `long_prompt`-token prompt arrives after its 8th chunk."""
    times: list[float] = []
    long_body = {"model": MODEL_NAME, "messages": [{"role": "user", "content": "the " * long_prompt}],
                 "max_tokens": 1, "stream": True}  # fmt: skip
    async with httpx.AsyncClient(base_url=url, timeout=600) as http:

        async def stream() -> None:
            async with http.stream("POST", "/v1/chat/completions", json=body) as response:
                response.raise_for_status()
                async for line in response.aiter_lines():
                    if line.startswith("data: {"):
                        times.append(time.perf_counter())

        task = asyncio.create_task(stream())
        while len(times) < 8 and not task.done():
            await asyncio.sleep(0.001)
        await one_request(http, long_body)
        await task
    gaps = [b - a for a, b in zip(times, times[1:], strict=False)]
    return {"long_prompt": long_prompt, "max_gap_s": max(gaps), "median_gap_s": statistics.median(gaps)}


def metrics(url: str) -> dict[str, float]:
    lines = httpx.get(f"{url}/metrics", timeout=10).text.splitlines()
    return {k: float(v) for k, v in (line.rsplit(" ", 1) for line in lines if not line.startswith("#"))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="tiny", help="model shape (tiny, llama-1b, ...)")
    parser.add_argument("--clients", type=int, default=8, help="requests per round (and the batch size)")
    parser.add_argument("--new-tokens", type=int, default=64, help="tokens per answer")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds of each mode (medians reported)")
    parser.add_argument("--long-prompt", type=int, default=900, help="tokens of the prompt that arrives mid-stream")
    parser.add_argument("--prefill-chunk", type=int, default=256, help="the server's --prefill-chunk")
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", str(torch.get_num_threads()))

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / args.preset
        write_random_model(args.preset, folder)
        port = free_port()
        server = start_server(folder, port, args.clients, args.prefill_chunk)
        url = f"http://127.0.0.1:{port}"
        try:
            bodies = [request_body(i, args.new_tokens) for i in range(args.clients)]
            asyncio.run(run_mode(url, bodies[:2], concurrent=True))  # warm-up
            runs: dict[str, list[dict]] = {"sequential": [], "concurrent": []}
            for _ in range(args.rounds):
                for mode in runs:
                    runs[mode].append(asyncio.run(run_mode(url, bodies, concurrent=mode == "concurrent")))
            gaps = asyncio.run(stall(url, request_body(0, 4 * args.new_tokens), args.long_prompt))
        finally:
            server.terminate()
            server.wait(30)

    medians = {mode: {key: statistics.median(r[key] for r in rs) for key in rs[0]} for mode, rs in runs.items()}
    ratio = medians["concurrent"]["tok_s"] / medians["sequential"]["tok_s"]
    print(f"\n{args.clients} requests x {args.new_tokens} tokens, preset {args.preset}, {args.rounds} rounds (medians)")
    print(f"{'mode':<12}{'tokens':>8}{'seconds':>10}{'tok/s':>10}{'p50 latency':>14}{'rows/step':>11}")
    for mode, m in medians.items():
        print(f"{mode:<12}{m['tokens']:>8.0f}{m['seconds']:>10.2f}{m['tok_s']:>10.1f}{m['latency_p50_s']:>13.2f}s"
              f"{m['rows_per_step']:>11.2f}")  # fmt: skip
    per_round = [c["tok_s"] / s["tok_s"] for c, s in zip(runs["concurrent"], runs["sequential"], strict=True)]
    print(f"concurrent / sequential throughput: {ratio:.2f}x (rounds: {', '.join(f'{r:.2f}' for r in per_round)})")
    print(
        f"a stream's gaps while a {args.long_prompt}-token prompt arrives (--prefill-chunk {args.prefill_chunk}): "
        f"max {gaps['max_gap_s'] * 1000:.0f} ms, median {gaps['median_gap_s'] * 1000:.0f} ms"
    )
    result = {"preset": args.preset, "clients": args.clients, "new_tokens": args.new_tokens, "rounds": args.rounds,
              "threads": int(os.environ["OMP_NUM_THREADS"]), "sequential": medians["sequential"],
              "concurrent": medians["concurrent"], "ratio": ratio, "ratio_per_round": per_round,
              "prefill_chunk": args.prefill_chunk, "stall": gaps}  # fmt: skip
    print(json.dumps(result))


if __name__ == "__main__":
    main()
