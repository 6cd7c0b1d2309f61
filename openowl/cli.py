"""The `openowl` command line: one entry point, one subcommand per job.

openowl generate --model PATH_OR_ID --image photo.jpg --prompt "What is this?"
openowl generate --model PATH_OR_ID --input questions.jsonl --output answers.jsonl
openowl chat --model PATH_OR_ID [--image photo.jpg ...]
openowl serve --model PATH_OR_ID [--port 8000 --api-key KEY]     (an OpenAI-compatible HTTP API)
openowl demo --model PATH_OR_ID                                   (the same server; open the printed URL)
openowl eval TASK --model PATH_OR_ID [--limit N --batch-size B]     (a benchmark; --list shows them)
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Iterator
from pathlib import Path

import torch

from openowl.infer.sampling import PRESETS, SamplingParams

DEFAULT_MODEL = "owl-small"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
CHAT_HELP = """commands:
  /image PATH   attach an image to your next message (repeat for several)
  /video PATH   attach a video file to your next message
  /reset        forget the conversation
  /quit         leave (or Ctrl-D)"""


# --- shared arguments ----------------------------------------------------------------------------


def _add_model_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("model")
    group.add_argument(
        "--model",
        default=DEFAULT_MODEL,
        help=f"checkpoint folder, hub id (owner/name) or built-in model (default {DEFAULT_MODEL}: coloured shapes)",
    )
    group.add_argument("--dtype", choices=sorted(DTYPES), default="float32", help="weights dtype (default float32)")
    group.add_argument("--device", default="cpu", help="torch device: cpu, cuda, cuda:1 ... (default cpu)")
    group.add_argument(
        "--quantize", choices=["int8", "int4"], help="weight-only quantization of the language model (torchao)"
    )
    group.add_argument(
        "--compile",
        action="store_true",
        help="decode through torch.compile with a static cache: CUDA graphs on GPUs, frozen pre-packed weights on a "
        "CPU (the first answer pays minutes of compiling; the weights are then held twice)",
    )


def _add_sampling_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("sampling (flags override the preset)")
    group.add_argument("--preset", choices=sorted(PRESETS), default="greedy", help="starting point (default greedy)")
    group.add_argument("--max-new-tokens", type=int, help="most tokens to generate per answer")
    group.add_argument("--do-sample", action=argparse.BooleanOptionalAction, default=None, help="sample, not greedy")
    group.add_argument("--temperature", type=float, help="softmax temperature when sampling")
    group.add_argument("--top-k", type=int, help="sample among the k most likely tokens (0 = all)")
    group.add_argument("--top-p", type=float, help="sample within this probability mass (1 = all)")
    group.add_argument("--repetition-penalty", type=float, help="> 1 discourages repeating tokens")
    group.add_argument("--no-repeat-ngram-size", type=int, help="never repeat an n-gram of this size")
    group.add_argument("--stop", action="append", help="end the answer before this string (repeatable)")
    group.add_argument("--seed", type=int, help="random seed: the same seed gives the same text")


def _sampling(args: argparse.Namespace) -> SamplingParams:
    changes = {
        name: getattr(args, name)
        for name in (
            "max_new_tokens", "do_sample", "temperature", "top_k", "top_p",
            "repetition_penalty", "no_repeat_ngram_size", "seed",
        )
        if getattr(args, name) is not None
    }  # fmt: skip
    if args.stop:
        changes["stop"] = tuple(args.stop)
    return PRESETS[args.preset].with_(**changes)


def _engine(args: argparse.Namespace):
    from openowl import OwlForConditionalGeneration, OwlProcessor
    from openowl.infer.engine import Engine
    from openowl.infer.quantize import quantize

    processor = OwlProcessor.from_pretrained(args.model)
    model = OwlForConditionalGeneration.from_pretrained(args.model, dtype=DTYPES[args.dtype], device=args.device)
    if args.quantize:
        quantize(model, args.quantize)
    return Engine(model, processor, compile=args.compile)


def _user_prompt(processor, text: str, num_images: int, num_videos: int = 0) -> str:
    parts = [{"type": "image"}] * num_images + [{"type": "video"}] * num_videos + [{"type": "text", "text": text}]
    return processor.apply_chat_template([{"role": "user", "content": parts}])


# --- generate ------------------------------------------------------------------------------------


def cmd_generate(args: argparse.Namespace) -> int:
    from openowl.infer.engine import Request
    from openowl.processing import load_image

    if (args.prompt is None) == (args.input is None):
        raise ValueError("give either --prompt (one answer) or --input FILE.jsonl (a batch)")
    if args.input is not None and args.output is None:
        raise ValueError("--input needs --output FILE.jsonl")
    params = _sampling(args)  # bad sampling flags fail before the model loads
    if args.prompt is not None:
        images = [load_image(path) for path in args.image]  # fail fast, before the model loads
        videos = _videos(args.video)
        engine = _engine(args)
        request = Request(_user_prompt(engine.processor, args.prompt, len(images), len(videos)), images, videos)
        for delta in engine.stream(request, params):
            print(delta, end="", flush=True)
        print()
        return 0
    return _generate_file(args, params)


def _videos(paths: list[str]) -> list:
    from openowl.infer.video import load_video_frames

    return [load_video_frames(path) for path in paths]


def _read_jsonl(path: Path) -> list[dict]:
    rows = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}:{number}: not valid JSON ({err})") from err
        question = row.get("question", row.get("prompt")) if isinstance(row, dict) else None
        if not isinstance(question, str):
            raise ValueError(f"{path}:{number}: expected an object with a 'question' string")
        rows.append({
            "id": row.get("id", row.get("question_id", number)),
            "question": question,
            "images": _as_list(row.get("image", row.get("images"))),
            "videos": _as_list(row.get("video")),
        })  # fmt: skip
    return rows


def _read_answers(path: Path) -> list[dict]:
    """Answers already written; a last line cut by an interrupted run is dropped (it will be recomputed)."""
    if not path.exists():
        return []
    text = path.read_text()
    rows, lines = [], text.splitlines()
    for number, line in enumerate(lines, start=1):
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            if number != len(lines):
                raise ValueError(f"{path}:{number}: not valid JSON; fix or remove the line") from None
    if len(rows) < len(lines) or (text and not text.endswith("\n")):
        # Drop a cut last line, and end the file with a newline: the next answer must not be glued to the last one.
        path.write_text("".join(f"{x}\n" for x in lines[: len(rows)]))
    return rows


def _as_list(value) -> list:
    return [] if value is None else [value] if isinstance(value, str) else list(value)


def _generate_file(args: argparse.Namespace, params: SamplingParams) -> int:
    """Answer every question of a jsonl file; answers already in the output are kept, not recomputed."""
    from tqdm import tqdm

    from openowl.infer.engine import Request
    from openowl.processing import load_image

    source, target = Path(args.input), Path(args.output)
    if not source.is_file():
        raise FileNotFoundError(f"{source}: no such file")
    rows = _read_jsonl(source)
    done = {row["id"] for row in _read_answers(target)}
    todo = [row for row in rows if row["id"] not in done]
    if not todo:
        print(f"all {len(rows)} answers are already in {target}", file=sys.stderr)
        return 0
    engine = _engine(args)
    base = source.parent
    with target.open("a") as out, tqdm(total=len(rows), initial=len(rows) - len(todo), desc="answering") as bar:
        for start in range(0, len(todo), args.batch_size):
            batch = todo[start : start + args.batch_size]
            requests = []
            for row in batch:
                images = [load_image(base / p) for p in row["images"]]
                videos = _videos([str(base / p) for p in row["videos"]])
                prompt = _user_prompt(engine.processor, row["question"], len(images), len(videos))
                requests.append(Request(prompt, images, videos))
            for row, completion in zip(batch, engine.generate(requests, params), strict=True):
                record = {"id": row["id"], "question": row["question"], "answer": completion.text}
                record["finish_reason"] = completion.finish_reason
                out.write(json.dumps(record, ensure_ascii=False) + "\n")
            out.flush()
            bar.update(len(batch))
    return 0


# --- chat ----------------------------------------------------------------------------------------


def cmd_chat(args: argparse.Namespace) -> int:
    from openowl.infer.session import ChatSession
    from openowl.processing import load_image

    params = _sampling(args)
    pending_images = [load_image(path) for path in args.image]
    pending_videos: list = []
    engine = _engine(args)
    session = ChatSession(engine, params=params)
    interactive = sys.stdin.isatty()
    print(f"openowl chat — {args.model}\n{CHAT_HELP}", file=sys.stderr)
    for line in _input_lines(interactive):
        line = line.strip()
        if not line:
            continue
        if line.startswith("/"):
            command, _, argument = line.partition(" ")
            try:
                if command == "/quit":
                    break
                elif command == "/reset":
                    session.reset()
                    pending_images, pending_videos = [], []
                    print("(conversation cleared)", file=sys.stderr)
                elif command == "/image":
                    pending_images.append(load_image(argument.strip()))
                    print(f"(image attached: {argument.strip()})", file=sys.stderr)
                elif command == "/video":
                    pending_videos += _videos([argument.strip()])
                    print(f"(video attached: {argument.strip()})", file=sys.stderr)
                else:
                    print(f"unknown command {command}\n{CHAT_HELP}", file=sys.stderr)
            except (FileNotFoundError, ValueError, ImportError) as err:
                print(f"error: {err}", file=sys.stderr)
            continue
        print("AI: ", end="", flush=True)
        for delta in session.ask(line, images=pending_images, videos=pending_videos):
            print(delta, end="", flush=True)
        print()
        pending_images, pending_videos = [], []
    return 0


def _input_lines(interactive: bool) -> Iterator[str]:
    while True:
        if interactive:
            try:
                yield input("Human: ")
            except EOFError:
                return
        else:
            line = sys.stdin.readline()
            if not line:
                return
            yield line


# --- serve and demo ------------------------------------------------------------------------------


def _add_serve_args(parser: argparse.ArgumentParser) -> None:
    from openowl.serve.config import MediaPolicy, ServeConfig

    group = parser.add_argument_group("server")
    group.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    group.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    group.add_argument("--api-key", help="require `Authorization: Bearer KEY` (default: $OPENOWL_API_KEY, else none)")
    group.add_argument("--served-model-name", help="the model's name in the API (default: the --model folder's name)")
    group.add_argument(
        "--allow-image-host",
        action="append",
        default=[],
        metavar="HOST",
        help="a host that http(s) image URLs may name (repeatable); by default only data: URIs are accepted",
    )
    group.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    limits = parser.add_argument_group("batching and limits (the defaults are in brackets)")
    for flag, default, help_ in (
        ("--max-batch-size", ServeConfig.max_batch_size, "rows decoded together"),
        ("--max-queue", ServeConfig.max_queue, "requests that may wait for a place; beyond, 429"),
        ("--max-body-bytes", ServeConfig.max_body_bytes, "request body size"),
        ("--max-images", ServeConfig.max_images, "images and videos per request"),
        ("--max-image-pixels", MediaPolicy.max_image_pixels, "width x height of an image or frame, from its header"),
        ("--max-prompt-tokens", ServeConfig.max_prompt_tokens, "prompt tokens, visual tokens included"),
        ("--max-output-tokens", ServeConfig.max_output_tokens, "the largest max_tokens a request may ask for"),
    ):
        limits.add_argument(flag, type=int, default=default, help=f"{help_} [{default}]")


def _serve_config(args: argparse.Namespace):
    from openowl.serve.config import MediaPolicy, ServeConfig, loopback_hosts

    for name in ("max_batch_size", "max_queue", "max_body_bytes", "max_image_pixels", "max_prompt_tokens",
                 "max_output_tokens"):  # fmt: skip
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be ≥ 1")
    if args.max_images < 0:
        raise ValueError("--max-images must be ≥ 0")
    model = Path(args.model)
    media = MediaPolicy(
        max_image_pixels=args.max_image_pixels,
        max_media_bytes=args.max_body_bytes,
        allow_hosts=frozenset(host.lower() for host in args.allow_image_host),
    )
    return ServeConfig(
        model_name=args.served_model_name or (model.name if model.exists() else args.model),
        api_key=args.api_key or os.environ.get("OPENOWL_API_KEY") or None,
        allowed_hosts=loopback_hosts(args.host),
        defaults=_sampling(args),
        max_batch_size=args.max_batch_size,
        max_queue=args.max_queue,
        max_body_bytes=args.max_body_bytes,
        max_images=args.max_images,
        max_prompt_tokens=args.max_prompt_tokens,
        max_output_tokens=args.max_output_tokens,
        media=media,
    )


def cmd_serve(args: argparse.Namespace) -> int:
    try:
        import uvicorn

        from openowl.serve.api import create_app
    except ImportError as err:
        raise ImportError(f"serving needs the serve extra: pip install -e '.[serve]' ({err})") from err
    if args.compile:
        raise ValueError("--compile is for generate and chat: serve's batch changes shape at every step")
    config = _serve_config(args)  # bad flags fail before the model loads
    if config.allowed_hosts is None and config.api_key is None:
        print(f"openowl: warning: serving on {args.host} without --api-key: anyone who reaches it can use it",
              file=sys.stderr)  # fmt: skip
    app = create_app(_engine(args), config)
    host = f"[{args.host}]" if ":" in args.host else args.host
    url = f"http://{'127.0.0.1' if args.host in ('0.0.0.0', '::') else host}:{args.port}"
    if args.command == "demo":
        print(f"openowl demo: open {url}/ in a browser", file=sys.stderr, flush=True)
        if args.open:
            import threading
            import webbrowser

            threading.Timer(1.0, webbrowser.open, [f"{url}/"]).start()
    else:
        print(f"openowl serve: {config.model_name!r} at {url}/v1 (demo page at {url}/)", file=sys.stderr, flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)
    return 0


# --- eval ----------------------------------------------------------------------------------------


def cmd_eval(args: argparse.Namespace) -> int:
    from openowl.eval import results, runner, tasks

    if args.list:
        for name, task in tasks.TASKS.items():
            print(f"{name:16} {task.metric:10} {task.description}")
        print(f"{'FILE.jsonl':16} {'(inferred)':10} any benchmark in the jsonl task format (README, Evaluation)")
        return 0
    if args.compare:
        print(results.compare(args.compare), end="")
        return 0
    if args.task is None:
        raise ValueError("give a TASK: a task name or a FILE.jsonl (openowl eval --list shows the tasks)")
    task = tasks.get_task(args.task, args.metric)
    ratings = json.loads(Path(args.ratings).read_text()) if args.ratings else None
    items = task.load(args.data)[: args.limit]  # read before the model loads: data errors show at once
    params = _sampling(args)
    if args.max_new_tokens is None:
        params = params.with_(max_new_tokens=task.max_new_tokens)
    output = args.output or Path("eval_results") / task.name / runner.model_label(args.model)
    outcome = runner.evaluate(
        lambda: _engine(args), task, items, output, params, batch_size=args.batch_size, method=args.method,
        circular=args.circular, model=args.model, data=args.data, ratings=ratings,
    )  # fmt: skip
    print(results.markdown(outcome), end="")
    print(f"(answers and results in {output})", file=sys.stderr)
    return 0


# --- train ---------------------------------------------------------------------------------------


def cmd_train(args: argparse.Namespace) -> int:
    from openowl.train.config import load_config
    from openowl.train.recipe import TrainRecipe

    cfg = load_config(args.config, args.overrides)
    recipe = TrainRecipe(cfg)
    resume = None
    if args.resume is not None:
        resume = args.resume or cfg.train.output_dir
    recipe.setup(resume=resume)
    metrics = recipe.train()
    folder = recipe.export(Path(cfg.train.output_dir) / "final")  # every process takes part, the main one writes
    # Every process waits for the export, then leaves the process group: a process that exits while the group's
    # threads run can abort (seen under DeepSpeed ZeRO-3 on gloo) and fail the whole launch.
    recipe.accelerator.wait_for_everyone()
    recipe.accelerator.end_training()
    if folder is not None:
        print(json.dumps({**metrics, "model": str(folder)}))
    return 0


# --- entry point ---------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="openowl", description="mPLUG-Owl: chat about images and videos.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    gen = sub.add_parser(
        "generate",
        help="answer one question, or a jsonl file of questions",
        description="Answer one question about images (--prompt), or every line of a jsonl file (--input): "
        'objects with "question" (or "prompt"), optional "id", "image" (a path or a list, relative to the file) '
        'and "video". Answers are appended to --output as they are made; a rerun skips ids already answered.',
    )
    _add_model_args(gen)
    gen.add_argument("--image", action="append", default=[], help="an image file (repeat for several)")
    gen.add_argument("--video", action="append", default=[], help="a video file (needs PyAV)")
    gen.add_argument("--prompt", help="the question (one answer, streamed to stdout)")
    gen.add_argument("--input", help="questions.jsonl to answer in batches")
    gen.add_argument("--output", help="answers.jsonl to append to (resumable)")
    gen.add_argument("--batch-size", type=int, default=8, help="questions per batch with --input (default 8)")
    _add_sampling_args(gen)
    gen.set_defaults(func=cmd_generate)

    chat = sub.add_parser("chat", help="an interactive multi-turn chat in the terminal", description=CHAT_HELP,
                          formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    _add_model_args(chat)
    chat.add_argument("--image", action="append", default=[], help="an image for the first message (repeatable)")
    _add_sampling_args(chat)
    chat.set_defaults(func=cmd_chat)

    for name, help_ in (
        ("serve", "an OpenAI-compatible HTTP API (chat completions with images, streaming, batching)"),
        ("demo", "the API plus a web page to chat with the model in a browser"),
    ):
        server = sub.add_parser(name, help=help_, description=help_ + ". Sampling flags set the defaults that "
                                "requests override.")  # fmt: skip
        _add_model_args(server)
        _add_serve_args(server)
        if name == "demo":
            server.add_argument("--open", action="store_true", help="open the page in this machine's browser")
        _add_sampling_args(server)
        server.set_defaults(func=cmd_serve)

    ev = sub.add_parser(
        "eval",
        help="run a benchmark: easy-vqa, owleval, mme, pope, mmbench, ... or a jsonl file",
        description="Answer a benchmark's questions in batches (answers.jsonl in --output is a cache: an "
        "interrupted run continues where it stopped), score them, and write results.json and results.md.",
    )
    ev.add_argument("task", nargs="?", help="a task name (see --list) or a FILE.jsonl in the task format")
    ev.add_argument("--list", action="store_true", help="list the tasks and exit")
    ev.add_argument("--compare", nargs="+", metavar="DIR", help="print the results under these folders side by side")
    _add_model_args(ev)
    ev.add_argument("--limit", type=int, help="only the first N questions")
    ev.add_argument("--batch-size", type=int, default=8, help="questions per batch (default 8)")
    ev.add_argument("--output", help="results folder (default eval_results/TASK/MODEL)")
    ev.add_argument("--data", help="where the task's data is: the OwlEval folder, a local copy of a hub dataset, "
                    "the EgoSchema videos")  # fmt: skip
    ev.add_argument("--metric", help="override the metric (exact, vqa, yes-no, mme, hallusion, choice, caption, none)")
    ev.add_argument("--method", choices=["generate", "likelihood"], default="generate",
                    help="multiple choice: parse the generated letter, or pick the likeliest option text")  # fmt: skip
    ev.add_argument("--circular", action=argparse.BooleanOptionalAction, default=True,
                    help="multiple choice: ask every rotation of the options; right if all are (MMBench)")  # fmt: skip
    ev.add_argument("--ratings", help="owleval: ratings saved from report.html, tallied into the results")
    _add_sampling_args(ev)
    ev.set_defaults(func=cmd_eval)

    train = sub.add_parser(
        "train",
        help="train or fine-tune (stage 1, stage 2 LoRA, full LLM) from a YAML config",
        description="Train from a YAML config (see configs/), with section.key=value overrides, e.g. "
        "`openowl train --config configs/stage2_lora.yaml data.train=my.jsonl model.path=CKPT`. For several "
        "processes or machines, run it under `accelerate launch` or `torchrun`.",
    )
    train.add_argument("--config", help="YAML config file")
    train.add_argument("--resume", nargs="?", const="", help="continue from the newest checkpoint (or this folder)")
    train.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides, e.g. train.epochs=2")
    train.set_defaults(func=cmd_train)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (FileNotFoundError, ValueError, OSError, ImportError, RuntimeError) as err:
        print(f"openowl: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
