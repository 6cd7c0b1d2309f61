"""The vLLM plugin's tokenizer, without vLLM (it needs only transformers): the chat template renders openowl's prompt,
and prompts tokenize to openowl's ids with one image token per `<image>`."""

from __future__ import annotations

from pathlib import Path

import pytest

from openowl.constants import IMAGE_PLACEHOLDER_ID, IMAGE_TAG
from openowl.prompts import assistant_message, build_prompt, user_message
from openowl.vllm.tokenizer import owl_tokenizer

CHECKPOINT = Path(__file__).parent / "fixtures" / "parity-v1" / "checkpoint"

CONVERSATIONS = {
    "text": [user_message("What is the capital of France?")],
    "images": [user_message("Compare them.", num_images=2)],
    "turns": [user_message("Describe it.", num_images=1), assistant_message("A car."), user_message("What colour?")],
    "system": [{"role": "system", "content": "You answer in one word."}, user_message("Hi", num_images=1)],
    "plain strings": [{"role": "user", "content": "Hello"}, {"role": "assistant", "content": "Hi!"},
                      {"role": "user", "content": "Bye"}],
}  # fmt: skip


@pytest.fixture(scope="module")
def tokenizer():
    return owl_tokenizer(CHECKPOINT)


@pytest.mark.parametrize("name", sorted(CONVERSATIONS))
@pytest.mark.parametrize("generation_prompt", [True, False])
def test_chat_template_renders_openowls_prompt(tokenizer, name, generation_prompt):
    messages = CONVERSATIONS[name]
    rendered = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
    assert rendered == tokenizer.bos_token + build_prompt(messages, add_generation_prompt=generation_prompt)


def test_chat_template_refuses_unknown_roles_and_parts(tokenizer):
    with pytest.raises(Exception, match="unknown message role"):
        tokenizer.apply_chat_template([{"role": "tool", "content": "x"}], tokenize=False)
    with pytest.raises(Exception, match="image and text parts"):
        tokenizer.apply_chat_template([{"role": "user", "content": [{"type": "video"}]}], tokenize=False)


@pytest.mark.parametrize("name", sorted(CONVERSATIONS))
def test_prompts_tokenize_as_openowls_processor(tokenizer, name):
    processor = tokenizer.owl_processor
    prompt = processor.apply_chat_template(CONVERSATIONS[name])
    expected, run = [], 0
    for token in processor.tokenize_prompt(prompt):  # each block of placeholders becomes one image token
        run = run + 1 if token == IMAGE_PLACEHOLDER_ID else 0
        if token != IMAGE_PLACEHOLDER_ID:
            expected.append(token)
        elif run == processor.num_visual_tokens:
            expected.append(tokenizer.image_token_id)
            run = 0
    assert tokenizer.encode(str(prompt)) == expected
    assert tokenizer(str(prompt))["input_ids"] == expected
    # chat prompts arrive without special tokens asked for, and with the BOS the template wrote
    assert tokenizer.encode(tokenizer.bos_token + prompt, add_special_tokens=False) == expected
    assert tokenizer.encode(str(prompt), add_special_tokens=False) == expected[1:]


def test_the_image_token_lies_past_the_vocabulary_and_reads_back_as_the_tag(tokenizer):
    assert tokenizer.image_token_id == tokenizer.max_token_id == len(tokenizer.owl_processor.tokenizer)
    ids = tokenizer.encode(f"Human: {IMAGE_TAG}{IMAGE_TAG}\nHuman: Hi")
    assert ids.count(tokenizer.image_token_id) == 2
    plain = tokenizer.owl_processor.tokenizer
    assert tokenizer.convert_ids_to_tokens(ids[-3:]) == plain.convert_ids_to_tokens(ids[-3:])
    assert tokenizer.convert_ids_to_tokens(tokenizer.image_token_id) == IMAGE_TAG
    assert tokenizer.decode(ids, skip_special_tokens=True) == f"Human: {IMAGE_TAG}{IMAGE_TAG}\nHuman: Hi"


def test_truncation_keeps_the_prompts_end(tokenizer):
    ids = tokenizer.encode("Human: one two three four five\nAI: ")
    tokenizer.truncation_side = "left"
    assert tokenizer.encode("Human: one two three four five\nAI: ", truncation=True, max_length=4) == ids[-4:]


def test_a_video_tag_is_refused(tokenizer):
    with pytest.raises(ValueError, match="images, not videos"):
        tokenizer.encode("Human: <|video|>\nAI: ")
