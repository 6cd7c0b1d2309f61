"""The lmms-eval adapter: `lmms-eval --model openowl --model_args pretrained=PATH_OR_ID --tasks mme`.

lmms-eval (0.7) finds external models through the `lmms_eval.models` entry-point group; openowl's pyproject.toml
declares `openowl = "openowl.eval.lmms_eval:model_manifest"`, so installing openowl is enough. `OpenOwl` answers
lmms-eval's requests with openowl's engine: `generate_until` (batched, one batch per generation-settings group)
and `loglikelihood` (continuation log-probabilities). Prompts are built by `processor.apply_chat_template`; the
model is loaded by `infer.prepare.load_engine`, as `openowl generate` loads it.

Without lmms-eval installed the class still imports (on a stand-in base with the same interface), so the same
requests can be sent to it directly, as the tests do.
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

from openowl.constants import IMAGE_TAG
from openowl.eval.likelihood import continuation_logprobs
from openowl.infer.engine import Engine, Request
from openowl.infer.prepare import load_engine
from openowl.infer.sampling import SamplingParams
from openowl.prompts import user_message
from openowl.video import load_video_frames

try:
    from lmms_eval.api.model import lmms as _Base
except ImportError:  # lmms-eval is heavy (torchvision, opencv, wandb, ...): the adapter works without it

    class _Base:
        """The part of `lmms_eval.api.model.lmms` the adapter relies on."""

        is_simple = True

        def __init__(self) -> None:
            self._rank, self._world_size, self.task_dict = 0, 1, {}

        @property
        def rank(self) -> int:
            return self._rank

        @property
        def world_size(self) -> int:
            return self._world_size

        @classmethod
        def create_from_arg_string(cls, arg_string: str, additional_config: dict | None = None):
            args = dict(part.split("=", 1) for part in arg_string.split(",") if part.strip())
            return cls(**args, **{k: v for k, v in (additional_config or {}).items() if v is not None})


VIDEO_SUFFIXES = {".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v"}


def model_manifest():
    """The `lmms_eval.models` entry point: registers `--model openowl`."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(model_id="openowl", simple_class_path="openowl.eval.lmms_eval.OpenOwl")


class OpenOwl(_Base):
    """An openowl checkpoint as an lmms-eval model (`--model_args pretrained=...,dtype=bfloat16,device=cuda`)."""

    is_simple = True

    def __init__(
        self,
        pretrained: str | None = None,
        dtype: str = "float32",
        device: str | None = None,
        batch_size: int | str = 1,
        max_new_tokens: int | str = 256,
        engine: Engine | None = None,
        **unused,
    ) -> None:
        super().__init__()
        if engine is None:
            if pretrained is None:
                raise ValueError("give pretrained=PATH_OR_ID in --model_args")
            engine = load_engine(pretrained, dtype, device or "auto")
        self.engine = engine
        self.batch_size_per_gpu = int(batch_size) if str(batch_size).isdigit() else 1
        self.max_new_tokens = int(max_new_tokens)

    # --- requests ----------------------------------------------------------------------------------

    def generate_until(self, requests) -> list[str]:
        """Each request's args: (context, generation kwargs, doc_to_visual, doc_id, task, split)."""
        groups: dict[str, list[int]] = defaultdict(list)
        for i, request in enumerate(requests):
            groups[json.dumps(request.args[1], sort_keys=True, default=str)].append(i)
        out: list[str] = [""] * len(requests)
        for indices in groups.values():
            params = self._params(requests[indices[0]].args[1])
            for start in range(0, len(indices), self.batch_size_per_gpu):
                chunk = indices[start : start + self.batch_size_per_gpu]
                batch = [self._request(requests[i].args[0], *requests[i].args[2:]) for i in chunk]
                for i, completion in zip(chunk, self.engine.generate(batch, params), strict=True):
                    out[i] = completion.text
        return out

    def loglikelihood(self, requests) -> list[tuple[float, bool]]:
        """Each request's args: (context, continuation or doc_to_target, doc_to_visual, doc_id, task, split)."""
        out: list[tuple[float, bool]] = []
        for start in range(0, len(requests), self.batch_size_per_gpu):
            chunk = requests[start : start + self.batch_size_per_gpu]
            batch, continuations = [], []
            for request in chunk:
                context, target, doc_to_visual, doc_id, task, split = request.args
                continuation = target if isinstance(target, str) else target(self.task_dict[task][split][doc_id])
                batch.append(self._request(context, doc_to_visual, doc_id, task, split))
                continuations.append(str(continuation).lstrip())  # the prompt already ends in "AI: "
            out += continuation_logprobs(self.engine, batch, continuations)
        return out

    def generate_until_multi_round(self, requests) -> list[str]:
        raise NotImplementedError("openowl's lmms-eval adapter does not implement multi-round generation")

    # --- helpers -----------------------------------------------------------------------------------

    def _request(self, context: str, doc_to_visual, doc_id, task, split) -> Request:
        visuals = [] if doc_to_visual is None else doc_to_visual(self.task_dict[task][split][doc_id]) or []
        images, videos = [], []
        for visual in visuals:
            if isinstance(visual, str | Path) and Path(visual).suffix.lower() in VIDEO_SUFFIXES:
                videos.append(load_video_frames(visual))
            else:
                images.append(visual)
        message = _user_turn(str(context), len(images), len(videos))
        return Request(self.engine.processor.apply_chat_template([message]), images, videos)

    def _params(self, kwargs: dict) -> SamplingParams:
        until = kwargs.get("until") or []
        temperature = float(kwargs.get("temperature") or 0)
        return SamplingParams(
            max_new_tokens=int(kwargs.get("max_new_tokens") or self.max_new_tokens),
            do_sample=bool(kwargs.get("do_sample")) or temperature > 0,
            temperature=temperature or 1.0,
            top_p=float(kwargs.get("top_p") or 1.0),
            stop=tuple([until] if isinstance(until, str) else until),
        )


def _user_turn(context: str, num_images: int, num_videos: int) -> dict:
    """The user message: images where the context has `<image>` tags (when they match in number), else first."""
    chunks = context.split(IMAGE_TAG)
    if num_images and len(chunks) - 1 == num_images:
        parts = []
        for k, chunk in enumerate(chunks):
            if k:
                parts.append({"type": "image"})
            if chunk.strip():
                parts.append({"type": "text", "text": chunk.strip()})
        return {"role": "user", "content": [{"type": "video"}] * num_videos + parts}
    return user_message("".join(chunks).strip(), num_images, num_videos)
