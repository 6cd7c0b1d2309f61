"""Parity with the upstream reference implementation on every case of the fixture (tolerances from its README)."""

from __future__ import annotations

import pytest
import torch
from conftest import IMAGES
from PIL import Image

from openowl.prompts import parse_prompt
from openowl.train.data import tokenize_conversation

IMAGE_CASES = ["text_only", "one_image", "two_images", "multi_turn", "unicode"]
VISUAL_CASES = [c for c in IMAGE_CASES if c != "text_only"]
GEN_TOKENS = 24


def _case(manifest, name):
    return next(c for c in manifest["image_cases"] + manifest["video_cases"] if c["name"] == name)


@pytest.mark.parametrize("name", IMAGE_CASES)
def test_processor_matches_upstream(name, manifest, expected, processor):
    case = _case(manifest, name)
    inputs = processor(text=[case["prompt"]], images=[IMAGES / i for i in case["images"]])
    assert torch.equal(inputs["input_ids"], expected[f"{name}.input_ids"])
    if case["images"]:
        torch.testing.assert_close(inputs["pixel_values"], expected[f"{name}.pixel_values"], rtol=0, atol=1e-6)


def test_processor_batch_matches_upstream_right_padding(manifest, expected, processor):
    inputs = processor(text=manifest["batch_prompts"], images=[IMAGES / "image0.jpg"], padding_side="right")
    assert torch.equal(inputs["input_ids"], expected["batch.input_ids"])
    assert torch.equal(inputs["attention_mask"].float(), expected["batch.attention_mask"])


@pytest.mark.parametrize("name", VISUAL_CASES)
def test_vision_and_abstractor(name, expected, model):
    pixels = expected[f"{name}.pixel_values"]
    with torch.no_grad():
        vision = model.vision_model.forward_features(pixels)
        tokens = model.get_image_features(pixels)
    torch.testing.assert_close(vision, expected[f"{name}.vision_last_hidden_state"], rtol=0, atol=1e-4)
    torch.testing.assert_close(tokens, expected[f"{name}.visual_tokens"], rtol=0, atol=1e-4)
    assert tokens.shape[1] == 65


def _check_generation(model, expected, name, **visual):
    input_ids = expected[f"{name}.input_ids"]
    reference = expected[f"{name}.greedy_ids"][:, 1:]  # position 0 is transformers 4.28's filler BOS
    new_ids = model.generate(input_ids=input_ids, max_new_tokens=GEN_TOKENS, do_sample=False, **visual)
    assert torch.equal(new_ids, reference)
    with torch.no_grad():
        logits = model(input_ids=torch.cat([input_ids, reference], dim=1), **visual).logits
    n = input_ids.shape[1]
    step_logits = logits[:, n - 1 : n + 3]
    torch.testing.assert_close(step_logits, expected[f"{name}.greedy_step_logits"], rtol=0, atol=1e-3)
    return step_logits


@pytest.mark.parametrize("name", IMAGE_CASES)
def test_greedy_generation(name, expected, model):
    visual = {"pixel_values": expected[f"{name}.pixel_values"]} if name != "text_only" else {}
    _check_generation(model, expected, name, **visual)


def test_video_processor_and_generation(manifest, expected, processor, video_model):
    case = _case(manifest, "video")
    size = processor.image_size
    # The fixture's frames were squash-resized (as the video decoder does) before the video processor.
    frames = [Image.open(IMAGES / f).convert("RGB").resize((size, size), Image.BICUBIC) for f in case["frame_images"]]
    inputs = processor(text=[case["prompt"]], videos=[frames])
    assert torch.equal(inputs["input_ids"], expected["video.input_ids"])
    torch.testing.assert_close(inputs["video_pixel_values"], expected["video.video_pixel_values"], rtol=0, atol=1e-6)
    step_logits = _check_generation(
        video_model, expected, "video", video_pixel_values=expected["video.video_pixel_values"]
    )
    # The fixture's 1e-3 would also pass without the doubled-CLS quirk (that differs by ~6e-4); pin it tighter.
    torch.testing.assert_close(step_logits, expected["video.greedy_step_logits"], rtol=0, atol=5e-5)


@pytest.mark.parametrize("name", ["train_image", "train_text"])
def test_training_tokenization_and_loss(name, manifest, expected, processor, model):
    case = next(c for c in manifest["train_cases"] if c["name"] == name)
    sample = tokenize_conversation(parse_prompt(case["text"]), processor.tokenizer, case["max_length"])
    assert torch.equal(sample.input_ids, expected[f"{name}.input_ids"][0])
    for mask, stored in (("non_padding_mask",) * 2, ("non_media_mask",) * 2, ("answer_mask", "prompt_mask")):
        assert torch.equal(getattr(sample, mask), expected[f"{name}.{stored}"][0]), mask  # upstream's names
    assert sample.num_images == len(case["images"])
    pixels = expected.get(f"{name}.pixel_values")
    with torch.no_grad():
        out = model(input_ids=sample.input_ids[None], pixel_values=pixels, labels=sample.labels[None])
    torch.testing.assert_close(out.loss.reshape(1), expected[f"{name}.loss"], rtol=1e-4, atol=0)
    positions = expected[f"{name}.logit_positions"]
    torch.testing.assert_close(out.logits[0, positions], expected[f"{name}.logits_at_positions"], rtol=0, atol=1e-3)
