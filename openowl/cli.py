"""The `openowl` command line: one entry point, a table of subcommands over the feature modules.

openowl generate --model PATH_OR_ID --image photo.jpg --prompt "What is this?"
openowl generate --model PATH_OR_ID --input questions.jsonl --output answers.jsonl
openowl chat --model PATH_OR_ID [--image photo.jpg ...]
openowl serve --model PATH_OR_ID [--port 8000 --api-key KEY]     (an OpenAI-compatible HTTP API)
openowl demo --model PATH_OR_ID                                   (a web chat, and the same API, on one scheduler)
openowl eval TASK --model PATH_OR_ID [--limit N --batch-size B]     (a benchmark; --list shows them)
openowl train --config CONFIG.yaml [KEY=VALUE ...]                (stage 1, stage 2, full fine-tuning)
openowl data easy-vqa DIR                                         (owl-small's training files)
openowl data scenes DIR [--images N]                              (drawn scenes' training files)
openowl data text-answers DIR [--model M]                         (text-only questions, the LM's own answers)
openowl data cache-features CONFIG.yaml [KEY=VALUE ...]           (a frozen ViT's outputs, computed once)
openowl data shards FILE.jsonl OUT/train-{:05d}.tar                (a jsonl file as WebDataset tar shards)
openowl pack EXPORT [EXPORT ...]                                  (owl-small's shipped trained weights)
openowl path MODEL                                                (a model's checkpoint folder, for vLLM)

Each `cmd_*` function turns its flags into one call of a feature module; the logic lives there.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the heavy modules (torch, transformers) are imported by the command that runs, not by --help
    from openowl.infer.sampling import SamplingParams

DEFAULT_MODEL = "owl-small"
# The names the flags offer, spelled here so that a command's --help imports no torch; tests/test_cli.py checks
# that they are the keys of `constants.DTYPES` and `infer.sampling.PRESETS`, their owners.
DTYPE_NAMES = ("bfloat16", "float16", "float32")
PRESET_NAMES = ("greedy", "upstream", "upstream-demo")


# --- shared arguments ----------------------------------------------------------------------------


def positive_int(text: str) -> int:
    """An argparse type: a whole number of at least 1 (refused at once otherwise, before anything loads)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, not {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {value}")
    return value


def _add_model_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("model")
    group.add_argument(
        "--model",
        default=DEFAULT_MODEL,
        help=f"checkpoint folder, hub id (owner/name) or built-in model (default {DEFAULT_MODEL}: coloured shapes)",
    )
    group.add_argument("--dtype", choices=["auto", *DTYPE_NAMES], default="auto",
                       help="weights dtype (default auto: bfloat16 on a GPU, float32 on a CPU)")  # fmt: skip
    group.add_argument("--device", default="auto",
                       help="torch device: auto, cpu, cuda, cuda:1 ... (default auto: CUDA when present)")  # fmt: skip
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
    group.add_argument("--preset", choices=PRESET_NAMES, default="greedy", help="starting point (default greedy)")
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
    from openowl.infer.sampling import PRESETS

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
    from openowl.infer.prepare import load_engine

    return load_engine(args.model, dtype=args.dtype, device=args.device, quantize=args.quantize, compile=args.compile)


def _engine_settings(args: argparse.Namespace) -> dict:
    """What the answers of `_engine(args)` depend on, for the answer caches (the model is not loaded)."""
    from openowl.infer.prepare import engine_settings

    return engine_settings(args.model, args.dtype, args.device, args.quantize, args.compile)


# --- the commands --------------------------------------------------------------------------------


def cmd_generate(args: argparse.Namespace) -> int:
    from openowl.infer.answering import answer_file, user_request
    from openowl.processing import load_image
    from openowl.video import load_video_frames

    if (args.prompt is None) == (args.input is None):
        raise ValueError("give either --prompt (one answer) or --input FILE.jsonl (a batch)")
    if args.input is not None and args.output is None:
        raise ValueError("--input needs --output FILE.jsonl")
    params = _sampling(args)  # bad sampling flags fail before the model loads
    if args.input is not None:
        settings = _engine_settings(args)
        answer_file(lambda: _engine(args), Path(args.input), Path(args.output), params, args.batch_size, settings)
        return 0
    images = [load_image(path) for path in args.image]  # fail fast, before the model loads
    videos = [load_video_frames(path) for path in args.video]
    engine = _engine(args)
    for delta in engine.stream(user_request(engine, args.prompt, images, videos), params):
        print(delta, end="", flush=True)
    print()
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    from openowl.chat import run_chat
    from openowl.infer.session import ChatSession
    from openowl.processing import load_image

    params = _sampling(args)
    images = [load_image(path) for path in args.image]
    return run_chat(ChatSession(_engine(args), params=params), images, title=args.model)


def cmd_serve(args: argparse.Namespace) -> int:
    from openowl.serve.launch import run_server, serve_config

    if args.compile:
        raise ValueError("--compile is for generate and chat: serve's batch changes shape at every step")
    config = serve_config(args, _sampling(args))  # bad flags fail before the model loads
    return run_server(args, config, lambda: _engine(args))


def cmd_demo(args: argparse.Namespace) -> int:
    from openowl.serve.demo import run_demo
    from openowl.serve.launch import serve_config

    if args.compile:
        raise ValueError("--compile is for generate and chat: the demo's batch changes shape at every step")
    config = serve_config(args, _sampling(args))  # bad flags fail before the model loads
    return run_demo(lambda: _engine(args), config, args.host, args.port, open_browser=args.open)


def cmd_eval(args: argparse.Namespace) -> int:
    from openowl.eval import results, runner, tasks

    if args.list:
        for name, task in tasks.TASKS.items():
            print(f"{name:16} {task.metric:10} {task.description}")
        print(f"{'FILE.jsonl':16} {'(inferred)':10} any benchmark in the jsonl task format (docs/evaluation.md)")
        return 0
    if args.compare:
        print(results.compare(args.compare), end="")
        return 0
    if args.task is None:
        raise ValueError("give a TASK: a task name or a FILE.jsonl (openowl eval --list shows the tasks)")
    task = tasks.get_task(args.task, args.metric)
    ratings = json.loads(Path(args.ratings).read_text()) if args.ratings else None
    params = _sampling(args)
    if args.max_new_tokens is None:
        params = params.with_(max_new_tokens=task.max_new_tokens)
    items = task.load(args.data)[: args.limit]  # read before the model loads: data errors show at once
    if args.server:
        from openowl.eval.client import ServerClient

        if args.method == "likelihood":
            raise ValueError("--method likelihood scores options with a local model's logits; --server can't")
        served = ServerClient(args.server, args.served_model)
        make_engine, model, settings = lambda: served, served.model, served.settings()
    else:
        make_engine, model, settings = lambda: _engine(args), args.model, _engine_settings(args)
    output = args.output or Path("eval_results") / task.name / runner.model_label(model)
    outcome = runner.evaluate(
        make_engine, task, items, output, params, batch_size=args.batch_size, method=args.method,
        circular=args.circular, model=model, data=args.data, ratings=ratings, engine_settings=settings,
    )  # fmt: skip
    print(results.markdown(outcome), end="")
    print(f"(answers and results in {output})", file=sys.stderr)
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from openowl.train.config import load_config, split_resume
    from openowl.train.recipe import run_training

    resume, overrides = split_resume(args.resume, args.overrides)  # `--resume train.epochs=2`: an override
    metrics = run_training(load_config(args.config, overrides), resume=resume)
    if metrics is not None:
        print(json.dumps(metrics))
    return 0


def cmd_data(args: argparse.Namespace) -> int:
    if args.dataset == "cache-features":
        from openowl.train.config import load_config
        from openowl.train.recipe import run_feature_cache

        print(run_feature_cache(load_config(args.config, args.overrides))["line"])
        return 0
    if args.dataset == "shards":
        from openowl.train.stream import jsonl_to_shards

        written = jsonl_to_shards(Path(args.input), args.out, args.per_shard, args.image_root)
        print(f"{len(written)} shard(s): {written[0]} ... {written[-1]}" if written else "no rows: nothing written")
        return 0
    if args.dataset == "scenes":
        from openowl.data import scenes

        print(json.dumps(scenes.write_training_data(Path(args.out), args.images, args.seed, args.questions_per_image)))
        return 0
    if args.dataset == "text-answers":
        from openowl.data import text_answers
        from openowl.infer.answering import answer_file
        from openowl.infer.prepare import engine_settings, load_engine
        from openowl.infer.sampling import SamplingParams

        out, params = Path(args.out), SamplingParams(max_new_tokens=args.max_new_tokens)
        answer_file(lambda: load_engine(args.model), text_answers.write_questions(out), out / text_answers.ANSWERS,
                    params, batch_size=16, engine_settings=engine_settings(args.model))  # fmt: skip
        print(json.dumps(text_answers.write_samples(out)))
        return 0
    from openowl.data.easy_vqa import write_training_data

    print(json.dumps(write_training_data(Path(args.out), args.questions_per_image, args.yes_no_per_image)))
    return 0


def cmd_pack(args: argparse.Namespace) -> int:
    from openowl.owl_small.pack import pack

    digest = pack([Path(p) for p in args.exports], Path(args.out))
    print(f"{args.out}: {Path(args.out).stat().st_size / 1e6:.1f} MB, sha256 {digest}")
    return 0


def cmd_path(args: argparse.Namespace) -> int:
    from openowl.loading import resolve_checkpoint

    print(resolve_checkpoint(args.model, args.revision))
    return 0


# --- the parsers ---------------------------------------------------------------------------------


def _generate_args(parser: argparse.ArgumentParser) -> None:
    _add_model_args(parser)
    parser.add_argument("--image", action="append", default=[], help="an image file (repeat for several)")
    parser.add_argument("--video", action="append", default=[], help="a video file (needs PyAV)")
    parser.add_argument("--prompt", help="the question (one answer, streamed to stdout)")
    parser.add_argument("--input", help="questions.jsonl to answer in batches")
    parser.add_argument("--output", help="answers.jsonl to append to (resumable)")
    parser.add_argument("--batch-size", type=positive_int, default=8,
                        help="questions per batch with --input (default 8)")  # fmt: skip
    _add_sampling_args(parser)


def _chat_args(parser: argparse.ArgumentParser) -> None:
    _add_model_args(parser)
    parser.add_argument("--image", action="append", default=[], help="an image for the first message (repeatable)")
    _add_sampling_args(parser)


def _server_args(parser: argparse.ArgumentParser) -> None:
    from openowl.serve.launch import add_serve_arguments

    _add_model_args(parser)
    add_serve_arguments(parser)
    if parser.prog.endswith(" demo"):
        parser.add_argument("--open", action="store_true", help="open the page in this machine's browser")
    _add_sampling_args(parser)


def _eval_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("task", nargs="?", help="a task name (see --list) or a FILE.jsonl in the task format")
    parser.add_argument("--list", action="store_true", help="list the tasks and exit")
    parser.add_argument("--compare", nargs="+", metavar="DIR", help="print the results under these folders side by "
                        "side")  # fmt: skip
    _add_model_args(parser)
    parser.add_argument("--limit", type=positive_int, help="only the first N questions")
    parser.add_argument("--batch-size", type=positive_int, default=8, help="questions per batch (default 8)")
    parser.add_argument("--output", help="results folder (default eval_results/TASK/MODEL)")
    parser.add_argument("--data", help="where the task's data is: the OwlEval folder, a local copy of a hub dataset, "
                        "the EgoSchema videos")  # fmt: skip
    parser.add_argument("--metric", help="override the metric (exact, vqa, yes-no, pope, mme, hallusion, choice, "
                        "caption, none)")  # fmt: skip
    parser.add_argument(
        "--method", choices=["generate", "likelihood"], default="generate",
        help="multiple choice: parse the generated letter, or pick the likeliest option text",
    )  # fmt: skip
    parser.add_argument(
        "--circular", action=argparse.BooleanOptionalAction, default=None,
        help="multiple choice: ask every rotation of the options; right if all are (default: the benchmark's own "
        "protocol, on for MMBench and jsonl files, off for SEED-Bench and EgoSchema)",
    )  # fmt: skip
    parser.add_argument("--ratings", help="owleval: ratings saved from report.html, tallied into the results")
    parser.add_argument("--server", metavar="URL", help="ask a served model instead: an OpenAI-compatible API root "
                        "(http://127.0.0.1:8000/v1), by the openai client, --batch-size requests at once")  # fmt: skip
    parser.add_argument("--served-model", help="with --server: the model id to ask (default: the first it lists)")
    _add_sampling_args(parser)


def _train_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="YAML config file")
    parser.add_argument("--resume", nargs="?", const="", metavar="FOLDER",
                        help="continue from the newest checkpoint (or this folder); a KEY=VALUE after it stays an "
                        "override")  # fmt: skip
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides, e.g. train.epochs=2")


def _data_args(parser: argparse.ArgumentParser) -> None:
    kinds = parser.add_subparsers(dest="dataset", required=True)
    easy = kinds.add_parser("easy-vqa", help="write owl-small's training files")
    easy.add_argument("out", help="the folder to write them into")
    easy.add_argument("--questions-per-image", type=int, help="cap on stage-2 questions per image (default: all)")
    easy.add_argument("--yes-no-per-image", type=int, default=6,
                      help="generated yes/no questions per image for stage 2b (default: 6)")  # fmt: skip
    cache = kinds.add_parser(
        "cache-features", help="compute a frozen ViT's outputs for the training images once, into data.features",
        description="Run the training config's frozen ViT over every training image (eval transform) and store its "
        "outputs in data.features (safetensors shards, keyed by the sha256 of each image file); a rerun continues "
        "an interrupted build. Under `accelerate launch` the processes share the shards.",
    )  # fmt: skip
    cache.add_argument("config", help="the training YAML config")
    cache.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides, e.g. data.features=DIR")
    shards = kinds.add_parser(
        "shards", help="write a training jsonl file and its images as WebDataset tar shards (for streamed training)",
        description="Each row becomes KEY.json (its fields) and KEY.jpg / KEY.0.png, ... (its image files' bytes); "
        "train on them with data.train='OUT/*.tar'.",
    )  # fmt: skip
    shards.add_argument("input", help="the jsonl file (image paths relative to it, or to --image-root)")
    shards.add_argument("out", help="the shard names, with one {} for the shard number: shards/train-{:05d}.tar")
    shards.add_argument("--per-shard", type=int, default=1000, help="samples per shard (default: 1000)")
    shards.add_argument("--image-root", help="the folder image paths are relative to (default: the file's)")
    drawn = kinds.add_parser("scenes", help="draw scenes and write their training files (captions, questions)")
    drawn.add_argument("out", help="the folder to write them into")
    drawn.add_argument("--images", type=positive_int, default=4000, help="scenes to draw (default: 4000)")
    drawn.add_argument("--seed", type=int, default=0, help="the drawing's seed (default: 0)")
    drawn.add_argument("--questions-per-image", type=positive_int, default=4,
                       help="one-image questions per scene (default: 4)")  # fmt: skip
    text = kinds.add_parser("text-answers", help="text-only questions with a model's own answers (text_train.jsonl)")
    text.add_argument("out", help="the folder to write text_train.jsonl into")
    text.add_argument("--model", default="owl-small-base", help="the model whose answers to keep (default: "
                      "owl-small-base, the untrained LM)")  # fmt: skip
    text.add_argument("--max-new-tokens", type=positive_int, default=64,
                      help="longer answers are left out (default: 64)")  # fmt: skip


def _pack_args(parser: argparse.ArgumentParser) -> None:
    from openowl.owl_small.assemble import TRAINED_WEIGHTS

    parser.add_argument("exports", nargs="+", help="the runs' export folders, in the order they ran")
    parser.add_argument("--out", default=str(TRAINED_WEIGHTS), help="the file to write (default: the shipped one)")


def _path_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", help="a checkpoint folder, a built-in model (owl-small) or a hub id")
    parser.add_argument("--revision", help="a hub revision (branch, tag or commit)")


_SERVE_HELP = "an OpenAI-compatible HTTP API (chat completions with images, streaming, batching)"
_DEMO_HELP = "a web page to chat with the model about images in a browser (Gradio)"
# name -> (help, description, add the arguments, run)
COMMANDS: dict[str, tuple[str, str | None, Callable, Callable]] = {
    "generate": (
        "answer one question, or a jsonl file of questions",
        "Answer one question about images (--prompt), or every line of a jsonl file (--input): objects with "
        '"question" (or "prompt"), optional "id", "image" (a path or a list, relative to the file) and "video". '
        "Answers are appended to --output as they are made; a rerun skips ids already answered.",
        _generate_args, cmd_generate,
    ),
    "chat": ("an interactive multi-turn chat in the terminal", None, _chat_args, cmd_chat),
    "serve": (_SERVE_HELP, _SERVE_HELP + ". Sampling flags set the defaults that requests override.", _server_args,
              cmd_serve),
    "demo": (_DEMO_HELP, _DEMO_HELP + ", over the server's batching scheduler (pip install -e '.[demo]'). Sampling "
             "flags set the page's defaults; with --api-key the page asks for it as the password.", _server_args,
             cmd_demo),
    "eval": (
        "run a benchmark: easy-vqa, owleval, mme, pope, mmbench, ... or a jsonl file",
        "Answer a benchmark's questions in batches (answers.jsonl in --output is a cache: an interrupted run "
        "continues where it stopped), score them, and write results.json and results.md.",
        _eval_args, cmd_eval,
    ),
    "train": (
        "train or fine-tune (stage 1, stage 2 LoRA, full LLM) from a YAML config",
        "Train from a YAML config (see configs/), with section.key=value overrides, e.g. `openowl train --config "
        "configs/stage2_lora.yaml data.train=my.jsonl model.path=CKPT`. For several processes or machines, run it "
        "under `accelerate launch` or `torchrun`.",
        _train_args, cmd_train,
    ),
    "data": ("write training files (easy-vqa: owl-small's recipe; tar shards) or a frozen ViT's feature cache", None,
             _data_args, cmd_data),
    "path": ("print the local checkpoint folder of a model (a built-in one is built, a hub id downloaded, first)",
             "Print the checkpoint folder that a model name stands for, for tools that take folders: "
             '`vllm serve "$(openowl path owl-small)"`.', _path_args, cmd_path),
    "pack": ("collect the trained weights of owl-small's LoRA runs into its shipped file", None, _pack_args, cmd_pack),
}  # fmt: skip


def build_parser(commands: list[str] | None = None) -> argparse.ArgumentParser:
    """The parser; `commands`: the subcommands whose flags are added (default all). `main` adds only the one it
    runs, so that `openowl --help` imports nothing heavy and each command imports only what its flags need."""
    parser = argparse.ArgumentParser(prog="openowl", description="mPLUG-Owl: chat about images and videos.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (help_, description, add_arguments, run) in COMMANDS.items():
        if name == "chat":
            from openowl.chat import CHAT_HELP

            description = CHAT_HELP
        command = sub.add_parser(name, help=help_, description=description or help_,
                                 formatter_class=argparse.RawDescriptionHelpFormatter if name == "chat" else
                                 argparse.HelpFormatter)  # fmt: skip
        if commands is None or name in commands:
            add_arguments(command)
        command.set_defaults(func=run)
    return parser


# Lines that optional packages log while they are imported, whatever the command: torchao's "Failed to load
# ..._C_*.so" (kernels built for other GPUs) and torch's "... is an Enum subclass ..." from torchao's pytree
# registrations. transformers imports torchao when it is installed (its quantizer module), so they are silenced
# here rather than avoided.
QUIET_LOGGERS = ("torchao", "torch.utils._pytree")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    args = build_parser([argv[0]] if argv and argv[0] in COMMANDS else []).parse_args(argv)
    try:
        return args.func(args)
    except (FileNotFoundError, ValueError, OSError, ImportError, RuntimeError) as err:
        print(f"openowl: error: {one_line(err)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


def one_line(err: BaseException) -> str:
    """An error as one line: its message with the whitespace collapsed (a library's message may span several)."""
    return " ".join(str(err).split()) or type(err).__name__


if __name__ == "__main__":
    sys.exit(main())
