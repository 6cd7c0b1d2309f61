"""The `openowl` command line: one entry point, one subcommand per job.

openowl generate --model PATH_OR_ID --image photo.jpg --prompt "What is this?"
openowl generate --model PATH_OR_ID --input questions.jsonl --output answers.jsonl
openowl chat --model PATH_OR_ID [--image photo.jpg ...]
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterator
from pathlib import Path

import torch

from openowl.infer.sampling import PRESETS, SamplingParams

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
CHAT_HELP = """commands:
  /image PATH   attach an image to your next message (repeat for several)
  /video PATH   attach a video file to your next message
  /reset        forget the conversation
  /quit         leave (or Ctrl-D)"""


# --- shared arguments ----------------------------------------------------------------------------


def _add_model_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("model")
    group.add_argument("--model", required=True, help="checkpoint folder or hub id (owner/name)")
    group.add_argument("--dtype", choices=sorted(DTYPES), default="float32", help="weights dtype (default float32)")
    group.add_argument("--device", default="cpu", help="torch device: cpu, cuda, cuda:1 ... (default cpu)")
    group.add_argument(
        "--quantize", choices=["int8", "int4"], help="weight-only quantization of the language model (torchao)"
    )
    group.add_argument(
        "--compile", action="store_true", help="decode through torch.compile with a static cache (best on GPUs)"
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
    if recipe.accelerator.is_main_process:
        folder = recipe.export(Path(cfg.train.output_dir) / "final")
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
