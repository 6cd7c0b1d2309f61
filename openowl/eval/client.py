"""Evaluating a served model: each question sent to an OpenAI-compatible server (`openowl serve`, vLLM's) with the
official `openai` client, as a user of the server would ask it, instead of to an engine in this process
(`openowl eval TASK --server URL`; docs/evaluation.md).

A conversation's earlier turns go with their answers as they were given, images as base64 PNG `image_url` parts
before the turn's text (the order the local path writes them in). A batch's requests go out at once, one per
thread, so that the server batches them as it does any concurrent clients.
"""

from __future__ import annotations

import base64
import io
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

from PIL import Image

from openowl.infer.sampling import SamplingParams

Turn = tuple[str, Sequence[Image.Image], str | None]  # a question, its images, and the answer it got (None: the last)


class ServerClient:
    """A chat-completions client for one server and model.

    Args:
        base_url: the server's API root, e.g. http://127.0.0.1:8000/v1.
        model: the served model's id; default: the first the server lists (`/v1/models`).
        api_key: default `OPENAI_API_KEY`, else "none" (a server without keys ignores it).
    """

    def __init__(self, base_url: str, model: str | None = None, api_key: str | None = None, timeout: float = 600):
        try:
            from openai import OpenAI
        except ImportError as err:
            raise ImportError("--server needs the openai client: pip install 'openowl[eval]' (or openai)") from err
        key = api_key or os.environ.get("OPENAI_API_KEY") or "none"
        self.base_url = base_url
        self.client = OpenAI(base_url=base_url, api_key=key, timeout=timeout, max_retries=2)
        self.model = model or self.client.models.list().data[0].id

    def settings(self) -> dict:
        """What the answers depend on, for the eval's settings.json: the server and the model it serves."""
        return {"server": self.base_url, "served_model": self.model}

    def answer(self, conversations: Sequence[Sequence[Turn]], params: SamplingParams) -> list[tuple[str, str]]:
        """The answer to the last turn of each conversation, with its finish reason, asked concurrently."""
        with ThreadPoolExecutor(max_workers=max(1, len(conversations))) as pool:
            return list(pool.map(lambda turns: self._ask(turns, params), conversations))

    def _ask(self, turns: Sequence[Turn], params: SamplingParams) -> tuple[str, str]:
        reply = self.client.chat.completions.create(model=self.model, messages=messages(turns), **request_args(params))
        choice = reply.choices[0]
        return choice.message.content or "", choice.finish_reason or "stop"


def messages(turns: Sequence[Turn]) -> list[dict]:
    """OpenAI chat messages for a conversation: each turn's images then its text, and the answers between."""
    out = []
    for text, images, answer in turns:
        parts = [{"type": "image_url", "image_url": {"url": data_url(image)}} for image in images]
        out.append({"role": "user", "content": [*parts, {"type": "text", "text": text}]})
        if answer is not None:
            out.append({"role": "assistant", "content": answer})
    return out


def data_url(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def request_args(params: SamplingParams) -> dict:
    """The OpenAI request fields for `params`: greedy is temperature 0."""
    args: dict = {"max_tokens": params.max_new_tokens, "temperature": params.temperature if params.do_sample else 0.0}
    if params.do_sample and params.top_p < 1.0:
        args["top_p"] = params.top_p
    if params.seed is not None:
        args["seed"] = params.seed
    if params.stop:
        args["stop"] = list(params.stop)
    unsupported = [name for name, on in (("top_k", params.top_k), ("repetition_penalty", params.repetition_penalty
                   != 1.0), ("no_repeat_ngram_size", params.no_repeat_ngram_size)) if on]  # fmt: skip
    if unsupported:
        raise ValueError(f"--server sends OpenAI's sampling fields only; unset {', '.join(unsupported)}")
    return args
