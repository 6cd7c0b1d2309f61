"""The lmms-eval adapter driven the way lmms-eval drives a model, on a tiny task made here (no network).

lmms-eval itself is too heavy to be a test dependency (torchvision, opencv, wandb, openai, ...). Its `lmms` base
class, `Instance` and model registry import with `pip install --no-deps lmms_eval loguru pytz`; when they are
there these tests use them (and check that `--model openowl` resolves through the entry point), otherwise the same
requests go through a stand-in `Instance` with lmms-eval's argument layout.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from importlib.metadata import entry_points

import pytest
from conftest import CHECKPOINT, IMAGES
from PIL import Image

from openowl.eval.likelihood import continuation_logprobs
from openowl.eval.lmms_eval import OpenOwl, model_manifest
from openowl.infer.engine import Engine, Request
from openowl.infer.sampling import SamplingParams

try:
    from lmms_eval.api.instance import Instance
except ImportError:

    @dataclass
    class Instance:
        """lmms_eval.api.instance.Instance, as far as models see it: `args` is the arguments tuple."""

        request_type: str
        arguments: tuple
        idx: int
        metadata: dict = field(default_factory=dict)

        @property
        def args(self) -> tuple:
            return self.arguments


DOCS = [
    {"image": IMAGES / "image0.jpg", "question": "What is in the picture?", "target": "a dog"},
    {"image": IMAGES / "image1.jpg", "question": "What colour is it?", "target": "red"},
    {"image": IMAGES / "image2.jpg", "question": "Where is this?", "target": "a street"},
]


def doc_to_visual(doc):
    return [Image.open(doc["image"]).convert("RGB")]


def _instance(kind: str, arguments: tuple, i: int) -> Instance:
    return Instance(request_type=kind, arguments=arguments, idx=0,
                    metadata={"task": "tiny", "doc_id": i, "repeats": 1})  # fmt: skip


@pytest.fixture(scope="module")
def engine(model, processor) -> Engine:
    return Engine(model, processor)


def _adapter(engine, batch_size: int) -> OpenOwl:
    lm = OpenOwl(engine=engine, batch_size=batch_size)
    lm.task_dict = {"tiny": {"test": DOCS}}  # lmms-eval fills this before sending requests
    return lm


def _alone(engine, text: str, image_path, params: SamplingParams) -> str:
    parts = [{"type": "image"}, {"type": "text", "text": text}]
    prompt = engine.processor.apply_chat_template([{"role": "user", "content": parts}])
    return engine.generate([Request(prompt, [Image.open(image_path).convert("RGB")])], params)[0].text


def test_generate_until_batches_and_keeps_the_order(engine):
    short = {"max_new_tokens": 3, "temperature": 0, "until": ["\n\n"]}
    longer = {"max_new_tokens": 6, "do_sample": False}
    requests = [
        _instance("generate_until", (doc["question"], kwargs, doc_to_visual, i % 3, "tiny", "test"), i)
        for i, (doc, kwargs) in enumerate(zip(DOCS + DOCS, [short, longer, short, longer, short, longer], strict=True))
    ]
    texts = _adapter(engine, batch_size=2).generate_until(requests)
    assert texts == _adapter(engine, batch_size=1).generate_until(requests)
    for request, text in zip(requests, texts, strict=True):
        context, kwargs, _, doc_id, _, _ = request.args
        params = SamplingParams(max_new_tokens=kwargs["max_new_tokens"], stop=tuple(kwargs.get("until", ())))
        assert text == _alone(engine, context, DOCS[doc_id]["image"], params)


def test_image_tags_in_the_context_place_the_images(engine):
    lm = _adapter(engine, batch_size=1)
    request = lm._request("<image>\nWhat is in the picture?", doc_to_visual, 0, "tiny", "test")
    assert request.prompt.count("<image>") == 1 and len(request.images) == 1
    assert request.prompt.index("<image>") < request.prompt.index("What is in the picture?")
    no_visual = lm._request("Just text", None, 0, "tiny", "test")
    assert "<image>" not in no_visual.prompt and no_visual.images == []


def test_loglikelihood_matches_direct_scoring(engine):
    requests = [
        _instance("loglikelihood", (doc["question"], " " + doc["target"], doc_to_visual, i, "tiny", "test"), i)
        for i, doc in enumerate(DOCS)
    ]
    requests.append(_instance("loglikelihood", ("Name it.", lambda doc: doc["target"], doc_to_visual, 1, "tiny",
                                                "test"), 3))  # fmt: skip
    lm = _adapter(engine, batch_size=2)
    scores = lm.loglikelihood(requests)
    assert len(scores) == 4 and all(isinstance(s, float) and isinstance(g, bool) for s, g in scores)
    for request, (score, _) in zip(requests, scores, strict=True):
        context, target, _, doc_id, _, _ = request.args
        continuation = target if isinstance(target, str) else target(DOCS[doc_id])
        alone = continuation_logprobs(engine, [lm._request(context, doc_to_visual, doc_id, "tiny", "test")],
                                      [continuation.strip()])[0][0]  # fmt: skip
        assert score == pytest.approx(alone, abs=1e-4) and score < 0
    with pytest.raises(NotImplementedError):
        lm.generate_until_multi_round(requests)


def test_created_from_model_args_like_lmms_eval_does():
    lm = OpenOwl.create_from_arg_string(f"pretrained={CHECKPOINT},dtype=float32", {"batch_size": 2, "device": "cpu"})
    assert lm.batch_size_per_gpu == 2 and lm.engine.model.device.type == "cpu"
    assert lm.rank == 0 and lm.world_size == 1
    with pytest.raises(ValueError, match="pretrained"):
        OpenOwl()


def test_registered_as_an_lmms_eval_model():
    (point,) = [ep for ep in entry_points(group="lmms_eval.models") if ep.name == "openowl"]
    assert point.load() is model_manifest
    try:
        from lmms_eval.models import get_model
    except ImportError:  # lmms-eval absent: the manifest needs it, and says so
        with pytest.raises(ImportError):
            model_manifest()
    else:
        assert get_model("openowl") is OpenOwl
