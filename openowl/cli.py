"""The `openowl` command line: one entry point, one subcommand per job."""

from __future__ import annotations

import argparse
import sys

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _add_model_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="checkpoint folder or hub id (owner/name)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32", help="weights dtype (default float32)")
    parser.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda (default cpu)")


def cmd_generate(args: argparse.Namespace) -> int:
    from openowl import OwlForConditionalGeneration, OwlProcessor
    from openowl.processing import build_prompt

    processor = OwlProcessor.from_pretrained(args.model)
    images = [processor.preprocess_images([path]) for path in args.image]  # fail fast on a bad image
    model = OwlForConditionalGeneration.from_pretrained(args.model, dtype=DTYPES[args.dtype], device=args.device)
    content = [{"type": "image"} for _ in args.image] + [{"type": "text", "text": args.prompt}]
    prompt = build_prompt([{"role": "user", "content": content}])
    inputs = processor.pad([processor.tokenize_prompt(prompt)])
    pixel_values = torch.cat(images).to(model.dtype) if images else None
    new_ids = model.generate(**inputs, pixel_values=pixel_values, max_new_tokens=args.max_new_tokens, do_sample=False)
    print(processor.batch_decode(new_ids, skip_special_tokens=True)[0].strip())
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="openowl", description="mPLUG-Owl: chat about images and videos.")
    sub = parser.add_subparsers(dest="command", required=True)
    gen = sub.add_parser("generate", help="answer one question about images")
    _add_model_args(gen)
    gen.add_argument("--image", action="append", default=[], help="an image file (repeat for several)")
    gen.add_argument("--prompt", required=True, help="the question")
    gen.add_argument("--max-new-tokens", type=int, default=64, help="most tokens to generate (default 64)")
    gen.set_defaults(func=cmd_generate)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (FileNotFoundError, ValueError, OSError) as err:
        print(f"openowl: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
