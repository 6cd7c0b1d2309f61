"""The inference stack on the CPU: batching, the KV cache, sampling, streaming, stop strings, chat sessions, video
files and int8 quantization, on the parity checkpoint and on a randomly initialised `tiny` model."""

from __future__ import annotations

import copy
import functools

import pytest
import torch
from conftest import IMAGES, VIDEO_CHECKPOINT
from PIL import Image

import openowl.infer.session as session_module
from openowl import OwlForConditionalGeneration, OwlProcessor, build_prompt
from openowl.config import get_preset
from openowl.infer.engine import Detokenizer, Engine, Request
from openowl.infer.fuse import FusedLlamaAttention
from openowl.infer.generate import (
    ChunkedLayer,
    DecodeStep,
    decode_one_token,
    forward_step,
    generate_tokens,
    new_cache,
    prefill,
    static_cache,
)
from openowl.infer.prepare import prepare_for_inference
from openowl.infer.quantize import Int8WeightOnlyLinear
from openowl.infer.sampling import SamplingParams, apply_repetition_penalty, banned_ngram_tokens, sample_next
from openowl.infer.session import ChatSession

GREEDY = SamplingParams(max_new_tokens=10)
STATIC_EAGER = DecodeStep(decode_one_token, static_cache=True)  # a compiled step's static caches, without compiling
UNICODE_TEXT = "Voilà, c'est très élégant — 这是猫头鹰 🦉! Ça  va ?\nOui 🦉🦉 fin."


def _prompt(text: str, images: int = 0, videos: int = 0) -> str:
    parts = [{"type": "image"}] * images + [{"type": "video"}] * videos + [{"type": "text", "text": text}]
    return build_prompt([{"role": "user", "content": parts}])


def _requests() -> list[Request]:
    """Prompts of different lengths with 0, 1 and 2 images (so the batch is left-padded)."""
    return [
        Request(_prompt("Hi")),
        Request(_prompt("Describe this image in a lot of detail, please, and name every colour.", 1),
                [IMAGES / "image0.jpg"]),
        Request(_prompt("Compare them.", 2), [IMAGES / "image1.jpg", IMAGES / "image2.jpg"]),
    ]  # fmt: skip


@pytest.fixture(scope="module")
def engine(model, processor) -> Engine:
    return Engine(model, processor, step=prepare_for_inference(model))


@pytest.fixture(scope="module")
def tiny(processor) -> Engine:
    """A `tiny` preset model, every weight matrix drawn from N(0, 0.02) under a fixed seed (norms stay at 1)."""
    torch.manual_seed(1234)
    config = get_preset("tiny")
    model = OwlForConditionalGeneration(config)
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() >= 2:
                param.normal_(0.0, 0.02)
    model.eval()
    tiny_processor = OwlProcessor(
        processor.tokenizer, image_size=config.vision.image_size, num_visual_tokens=config.num_visual_tokens
    )
    return Engine(model, tiny_processor, step=prepare_for_inference(model))


# --- batching ------------------------------------------------------------------------------------


@pytest.mark.parametrize("which", ["fixture", "tiny"])
def test_batch_equals_one_by_one(which, engine, tiny):
    eng = engine if which == "fixture" else tiny
    requests = _requests()
    batch = eng.generate(requests, GREEDY)
    assert [c.prompt_tokens for c in batch] == [len(eng.processor.tokenize_prompt(r.prompt)) for r in requests]
    assert len({c.prompt_tokens for c in batch}) == 3  # really padded
    for request, together in zip(requests, batch, strict=True):
        alone = eng.generate([request], GREEDY)[0]
        assert together.token_ids == alone.token_ids
        assert together.text == alone.text
        assert together.finish_reason == alone.finish_reason == "length"
        assert len(alone.token_ids) == GREEDY.max_new_tokens


def test_sampled_batch_equals_one_by_one(tiny):
    params = SamplingParams(max_new_tokens=8, do_sample=True, temperature=1.0, seed=7)
    requests = _requests()[:2]
    batch = tiny.generate(requests, params)
    for request, together in zip(requests, batch, strict=True):
        assert together.token_ids == tiny.generate([request], params)[0].token_ids


def test_reproduces_fixture_greedy_ids(manifest, expected, engine):
    case = next(c for c in manifest["image_cases"] if c["name"] == "one_image")
    reference = expected["one_image.greedy_ids"][0, 1:].tolist()
    request = Request(case["prompt"], [IMAGES / name for name in case["images"]])
    completion = engine.generate([request], SamplingParams(max_new_tokens=len(reference)))[0]
    assert type(engine.model.language_model.model.layers[0].self_attn) is FusedLlamaAttention  # fused projections
    if 2 in reference:  # the engine stops at EOS, the reference ran on
        reference = reference[: reference.index(2)]
    assert completion.token_ids == reference
    assert completion.text == engine.processor.decode(
        reference, skip_special_tokens=True, clean_up_tokenization_spaces=False
    )


# --- the KV cache --------------------------------------------------------------------------------


def test_incremental_decoding_equals_full_forward(model, processor):
    """prefill + forward_step over a left-padded batch give the logits of one full forward of each row alone."""
    long_ids = processor.tokenize_prompt(_prompt("What is in this picture? Tell me everything.", 1))
    short_ids = processor.tokenize_prompt(_prompt("Hi"))
    batch = processor.pad([long_ids, short_ids], padding_side="left")
    assert batch["attention_mask"][1, 0] == 0  # the second row is padded
    features = model.get_image_features(processor.preprocess_images([IMAGES / "image0.jpg"]))
    continuation = torch.tensor([[450, 4799, 338, 7254, 29889], [1576, 3186, 13, 8015, 29991]])

    steps = []
    with torch.no_grad():
        cache = new_cache(model)
        logits, mask = prefill(model, batch["input_ids"], batch["attention_mask"], cache, image_features=features)
        steps.append(logits)
        for t in range(continuation.shape[1]):
            mask = torch.cat([mask, mask.new_ones(2, 1)], dim=1)
            steps.append(forward_step(model, model.embed_text(continuation[:, t : t + 1]), mask, cache))
    assert cache.get_seq_length() == batch["input_ids"].shape[1] + continuation.shape[1]
    incremental = torch.stack(steps, dim=1)  # (2, 1 + T, V): predictions after the prompt and each new token

    for row, (ids, feats) in enumerate([(long_ids, features), (short_ids, None)]):
        full_ids = torch.tensor([ids + continuation[row].tolist()])
        with torch.no_grad():
            full = model(inputs_embeds=model.embed_inputs(full_ids, image_features=feats)).logits
        wanted = full[0, len(ids) - 1 :]
        torch.testing.assert_close(incremental[row], wanted, rtol=0, atol=1e-4)


# --- sampling ------------------------------------------------------------------------------------


def test_lookahead_changes_no_token_and_runs_one_step_ahead(tiny):
    """Queuing the next step before yielding a token (the default on CUDA) gives the same tokens; a caller that
    stops early finds that step run: the cache then also holds the last token it was given."""
    prompts = [_prompt("Hi"), _prompt("Tell me a long story about two owls and a cat.")]
    batch = tiny.processor.pad([tiny.processor.tokenize_prompt(p) for p in prompts], padding_side="left")
    params = SamplingParams(max_new_tokens=6, repetition_penalty=1.3, no_repeat_ngram_size=2)

    def run(lookahead: bool, cache=None):
        return generate_tokens(
            tiny.model, batch["input_ids"], batch["attention_mask"], params, cache=cache, lookahead=lookahead
        )

    assert [t.tolist() for t in run(True)] == [t.tolist() for t in run(False)]
    for lookahead in (False, True):
        cache = new_cache(tiny.model)
        tokens = run(lookahead, cache)
        for _ in range(3):
            next(tokens)
        assert cache.get_seq_length() == batch["input_ids"].shape[1] + 2 + lookahead


@pytest.mark.parametrize("lookahead", [False, True])
def test_generated_tokens_join_the_history_of_the_repetition_controls(tiny, lookahead):
    """Each token a step yields counts for the next steps' bans. The decoding step here always ranks the vocabulary
    the same way, so without the bans every token after the first would be its first choice."""
    ids = tiny.processor.tokenize_prompt(_prompt("Hi"))
    batch = tiny.processor.pad([ids])
    vocab = tiny.model.language_model.config.vocab_size

    def same_ranking(model, token, *args):
        decode_one_token(model, token, *args)  # the cache still grows step by step
        return torch.linspace(1.0, 0.0, vocab).expand(len(token), vocab)

    params = SamplingParams(max_new_tokens=12, no_repeat_ngram_size=1)
    tokens = generate_tokens(
        tiny.model, batch["input_ids"], batch["attention_mask"], params, decode=same_ranking, lookahead=lookahead
    )
    out = [int(t[0]) for t in tokens]
    assert len(set(out)) == len(out) and not set(out) & set(ids)
    assert out[1:] == [t for t in range(vocab) if t not in {*ids, out[0]}][:11]


def test_compiled_engine_reuses_its_static_caches(tiny):
    """The compiled engine keeps one static cache per (rows, length) between requests (a new one makes CUDA graphs
    record again). A reused cache is zeroed and gives the dynamic cache's tokens; a stream started while another
    holds the cache gets a cache of its own."""
    requests = _requests()
    params = SamplingParams(max_new_tokens=5)
    expected = [t.tolist() for t in tiny.token_stream(requests, params)[0]]
    engine = Engine(copy.deepcopy(tiny.model), tiny.processor, step=STATIC_EAGER)  # the static-cache path, uncompiled
    pool = engine.static_caches
    assert [t.tolist() for t in engine.token_stream(requests, params)[0]] == expected
    (key, cache), *others = pool._free.items()
    assert key == (3, 256) and not others and cache.get_seq_length() > 0
    assert [t.tolist() for t in engine.token_stream(requests, params)[0]] == expected
    assert pool._free[key] is cache

    first, second = engine.token_stream(requests, params)[0], engine.token_stream(requests, params)[0]
    steps = [(a.tolist(), b.tolist()) for a, b in zip(first, second, strict=True)]
    assert [a for a, _ in steps] == [b for _, b in steps] == expected
    assert len(pool._free) == 1 and pool._free[key] is not cache  # the one given back last is kept


def test_sampling_is_seeded(tiny):
    request = Request(_prompt("Tell me a story."))
    params = SamplingParams(max_new_tokens=12, do_sample=True, temperature=1.0, seed=3)
    first = tiny.generate([request], params)[0]
    assert tiny.generate([request], params)[0].token_ids == first.token_ids
    others = {tuple(tiny.generate([request], params.with_(seed=s))[0].token_ids) for s in (4, 5)}
    assert tuple(first.token_ids) not in others
    assert len(others) == 2


def test_top_k_one_is_greedy(tiny):
    request = _requests()[1]
    greedy = tiny.generate([request], GREEDY)[0]
    sampled = tiny.generate([request], GREEDY.with_(do_sample=True, top_k=1, temperature=0.7, seed=11))[0]
    assert sampled.token_ids == greedy.token_ids


def test_repetition_penalty():
    logits = torch.tensor([[1.0, 0.9, -0.1, -0.2], [-1.0, -1.5, 0.1, 0.08]])
    # Positive logits are divided, negative ones multiplied; a token seen twice is penalised once.
    penalised = apply_repetition_penalty(logits.clone(), [[0, 0, 3], [0]], 2.0)
    torch.testing.assert_close(penalised, torch.tensor([[0.5, 0.9, -0.1, -0.4], [-2.0, -1.5, 0.1, 0.08]]))
    params = SamplingParams(repetition_penalty=2.0)
    assert sample_next(logits, params, [[0], [2]]).tolist() == [1, 3]  # 1.0 -> 0.5 < 0.9; 0.1 -> 0.05 < 0.08
    assert sample_next(logits, SamplingParams(), [[0], [2]]).tolist() == [0, 2]
    assert torch.equal(logits[0], torch.tensor([1.0, 0.9, -0.1, -0.2]))  # the caller's logits are untouched
    negative = torch.tensor([[-1.0, -1.2]])  # a seen token with a negative logit gets less likely, not more
    assert sample_next(negative, SamplingParams(repetition_penalty=1.5), [[0]]).item() == 1


def test_no_repeat_ngram():
    assert banned_ngram_tokens([1, 2, 3, 1, 2], 3) == [3]
    assert sorted(banned_ngram_tokens([5, 6, 5, 7, 5], 2)) == [6, 7]
    assert banned_ngram_tokens([1, 2, 3], 2) == []
    assert sorted(set(banned_ngram_tokens([4, 8, 4], 1))) == [4, 8]
    assert banned_ngram_tokens([1], 2) == []
    assert banned_ngram_tokens([1, 2, 1], 0) == []
    logits = torch.tensor([[0.0, 0.0, 0.0, 3.0, 2.0]])
    params = SamplingParams(no_repeat_ngram_size=3)
    assert sample_next(logits, params, [[1, 2, 3, 1, 2]]).item() == 4  # 3 would repeat "1 2 3"
    assert sample_next(logits, params, [[1, 2, 3, 1, 4]]).item() == 3
    sampled = SamplingParams(no_repeat_ngram_size=3, do_sample=True, seed=0)
    draws = {sample_next(logits, sampled, [[1, 2, 3, 1, 2]]).item() for _ in range(50)}
    assert 3 not in draws


def test_top_k_and_top_p_restrict_the_draws():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    gen = torch.Generator().manual_seed(0)

    def draws(**kw):
        params = SamplingParams(do_sample=True, **kw)
        return {sample_next(logits, params, [[]], [gen]).item() for _ in range(200)}

    assert draws(top_p=0.45) == {0}
    assert draws(top_p=0.7) == {0, 1}
    assert draws(top_k=2) == {0, 1}
    assert draws() == {0, 1, 2, 3}


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"max_new_tokens": 0}, "max_new_tokens"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"temperature": 0.0, "do_sample": True}, "temperature"),
        ({"top_k": -1}, "top_k"),
        ({"repetition_penalty": 0.0}, "repetition_penalty"),
    ],
)
def test_sampling_params_validation(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SamplingParams(**kwargs)


def test_sampling_params_accepts_greedy_temperature_zero_and_drops_empty_stops():
    params = SamplingParams(temperature=0.0, stop=("", "x"))
    assert params.stop == ("x",)


# --- streaming and detokenization ----------------------------------------------------------------


@pytest.mark.parametrize(
    "which, params",
    [("fixture", GREEDY.with_(max_new_tokens=16)), ("tiny", SamplingParams(max_new_tokens=16, do_sample=True, seed=5))],
)
def test_stream_concatenates_to_generate(which, params, engine, tiny):
    eng = engine if which == "fixture" else tiny
    request = _requests()[1]
    deltas = list(eng.stream(request, params))
    completion = eng.generate([request], params)[0]
    assert "".join(deltas) == completion.text
    assert all(deltas)  # `stream` yields no empty deltas
    assert len(deltas) > 1


def _feed(tokenizer, ids, stop=()):
    detok = Detokenizer(tokenizer, tuple(stop), frozenset({tokenizer.eos_token_id}))
    deltas = [detok.add(i) for i in ids]
    deltas.append(detok.finish())
    return detok, deltas


@pytest.mark.parametrize("text", [UNICODE_TEXT, "🦉 first, then words", "  two leading spaces", "\nnewline first"])
def test_detokenizer_never_splits_characters(text, processor):
    tokenizer = processor.tokenizer
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if text == UNICODE_TEXT:
        pieces = tokenizer.convert_ids_to_tokens(ids)
        assert "<0xF0>" in pieces and "<0x9F>" in pieces  # 🦉 really is byte-fallback tokens
    reference = tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)
    detok, deltas = _feed(tokenizer, ids)
    assert not any("\ufffd" in d for d in deltas)
    assert "".join(deltas) == reference == detok.text
    assert deltas[-1] == ""  # nothing was held back
    assert detok.finish_reason == "length"


def test_detokenizer_decodes_a_long_answer_in_windows(processor):
    """A long answer (this repository's README: code, tables, accents, emoji) comes out exactly as one decode of all
    its tokens, and each step decodes a few tokens, not the whole answer."""
    from pathlib import Path

    tokenizer = processor.tokenizer
    text = (Path(__file__).parents[1] / "README.md").read_text()[:6000] + " " + UNICODE_TEXT
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    decoded = []

    class Counting:
        eos_token_id = tokenizer.eos_token_id

        def decode(self, window, **kwargs):
            decoded.append(len(window))
            return tokenizer.decode(window, **kwargs)

    detok, deltas = _feed(Counting(), ids, stop=["</s>"])
    assert len(ids) > 1000
    assert "".join(deltas) == tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)
    assert max(decoded) <= 8 and sum(decoded) < 6 * len(ids)


def test_detokenizer_keeps_leading_spaces(processor):
    """A token's "▁" becomes one space, once: not dropped at a delta boundary, not doubled; double spaces stay."""
    tokenizer = processor.tokenizer
    text = "Hello world  and  more 🦉 end"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    pieces = tokenizer.convert_ids_to_tokens(ids)
    assert pieces[1] == "▁world" and pieces.count("▁") >= 2  # a double space is a bare "▁" + "▁and"
    detok, deltas = _feed(tokenizer, ids)
    assert (
        "".join(deltas) == text == tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)
    )
    assert deltas[:2] == ["Hello", " world"]
    # An answer whose first token is a bare "▁" (a space before byte-fallback characters) keeps that space.
    owl = tokenizer.convert_tokens_to_ids(["▁", "<0xF0>", "<0x9F>", "<0xA6>", "<0x89>"])
    prefix = tokenizer("Hi", add_special_tokens=False)["input_ids"]
    detok, deltas = _feed(tokenizer, [*prefix, *owl])
    assert "".join(deltas) == "Hi 🦉" and "\ufffd" not in "".join(deltas)


def test_detokenizer_eos_and_text_after_invalid_bytes(processor):
    tokenizer = processor.tokenizer
    hello = tokenizer("Bonjour", add_special_tokens=False)["input_ids"]
    world = tokenizer(" monde", add_special_tokens=False)["input_ids"]
    newline, lone_lead_byte = 13, 3 + 0xC5  # <0x0A>, <0xC5>: a UTF-8 lead byte never completed
    detok, deltas = _feed(tokenizer, [*hello, newline, lone_lead_byte, *world])
    assert detok.text.endswith("monde")  # text after invalid bytes is not lost
    assert "".join(deltas) == detok.text
    detok, deltas = _feed(tokenizer, [*hello, tokenizer.eos_token_id, *world])
    assert detok.text == "Bonjour" and detok.finish_reason == "stop" and detok.ids == hello


class _RewritingTokenizer:
    """A decoder that rewrites earlier text once a later token arrives (as byte-level decoders do on bad UTF-8)."""

    pieces = {1: "ab", 2: "cd", 3: "ef", 9: ""}

    def decode(self, ids, **kwargs):
        text = "".join(self.pieces[i] for i in ids)
        return text.replace("ab", "\ufffd\ufffd\ufffd") if 9 in ids else text


def test_detokenizer_goes_on_after_the_decoder_rewrites_earlier_text():
    detok = Detokenizer(_RewritingTokenizer())
    deltas = [detok.add(i) for i in (1, 9, 2, 3)] + [detok.finish()]
    assert deltas[0] == "ab"
    assert detok.text.endswith("cdef")  # what follows is not dropped
    assert "".join(deltas) == detok.text


def test_detokenizer_stop_string_spanning_tokens(processor):
    tokenizer = processor.tokenizer
    ids = tokenizer("Hello world, this is fine", add_special_tokens=False)["input_ids"]
    detok, deltas = _feed(tokenizer, ids, stop=["d, th"])
    assert detok.text == "Hello worl" and detok.finish_reason == "stop"
    assert "".join(deltas) == "Hello worl"
    # A held-back start of a stop string that never completes is released.
    detok, deltas = _feed(tokenizer, ids, stop=["world!"])
    assert "".join(deltas) == "Hello world, this is fine" and detok.finish_reason == "length"


def _token_offsets(tokenizer, ids):
    return [len(tokenizer.decode(ids[: k + 1], skip_special_tokens=True)) for k in range(len(ids))]


def _stop_inside(engine, request, params):
    """The full greedy text, and a 4-character stop string straddling two tokens near its middle."""
    full = engine.generate([request], params)[0]
    offsets = _token_offsets(engine.processor.tokenizer, full.token_ids)
    for k in range(len(offsets) // 2, len(offsets) - 1):
        start = offsets[k] - 2
        stop = full.text[start : start + 4]
        if offsets[k] - offsets[k - 1] >= 2 and offsets[k + 1] - offsets[k] >= 2 and full.text.find(stop) == start:
            return full, stop, start
    pytest.fail(f"no usable stop string in {full.text!r}")


def test_stop_string_from_greedy_output(engine):
    request = _requests()[1]
    params = GREEDY.with_(max_new_tokens=16)
    full, stop, start = _stop_inside(engine, request, params)
    stopped = engine.generate([request], params.with_(stop=(stop,)))[0]
    assert stopped.text == full.text[:start]
    assert stopped.finish_reason == "stop"
    deltas = list(engine.stream(request, params.with_(stop=(stop,))))
    assert "".join(deltas) == full.text[:start]
    assert not any(stop in d for d in deltas)


def test_stop_string_in_a_batch_with_a_row_that_runs_out(engine):
    """A row that stopped on a stop string keeps its cut text when another row runs to the token budget."""
    requests = _requests()
    params = GREEDY.with_(max_new_tokens=16)
    full, stop, start = _stop_inside(engine, requests[1], params)
    other = engine.generate([requests[0]], params)[0]
    assert stop not in other.text
    batch = engine.generate([requests[1], requests[0]], params.with_(stop=(stop,)))
    assert (batch[0].text, batch[0].finish_reason) == (full.text[:start], "stop")
    assert (batch[1].text, batch[1].finish_reason) == (other.text, "length")
    streamed = ["", ""]
    for deltas in engine.stream_batch([requests[1], requests[0]], params.with_(stop=(stop,))):
        streamed = [s + d for s, d in zip(streamed, deltas, strict=True)]
    assert streamed == [full.text[:start], other.text]


# --- chat sessions -------------------------------------------------------------------------------


def _say(session: ChatSession, text: str, **kwargs) -> str:
    """One whole turn: the answer's deltas joined."""
    return "".join(session.ask(text, **kwargs))


def _without_cache(engine: Engine, session: ChatSession, params: SamplingParams) -> str:
    """The last answer recomputed from scratch: the same prompt ids, every image encoded again, a new cache."""
    fresh = Engine(engine.model, engine.processor)
    ids = torch.tensor([session.last_prompt_ids])
    image_features = fresh.image_features(session.images)
    video_features = fresh.video_features(session.videos)
    detok = Detokenizer(engine.processor.tokenizer, params.stop, engine.eos_ids)
    for token in generate_tokens(engine.model, ids, torch.ones_like(ids), params, image_features, video_features):
        detok.add(int(token[0]))
        if detok.finish_reason:
            break
    else:
        detok.finish()
    return detok.text


def _assert_cache_matches_fresh_prefill(session: ChatSession):
    """The session's cached keys and values of the last prompt equal those of a fresh prefill of it."""
    engine = session.engine
    ids = session.last_prompt_ids
    image_features = engine.image_features(session.images)
    video_features = engine.video_features(session.videos)
    fresh = new_cache(engine.model)
    with torch.no_grad():
        prefill(engine.model, torch.tensor([ids]), torch.ones(1, len(ids), dtype=torch.long), fresh,
                image_features, video_features)  # fmt: skip
    for mine, theirs in zip(session._cache.layers, fresh.layers, strict=True):
        torch.testing.assert_close(mine.keys[:, :, : len(ids)], theirs.keys, rtol=0, atol=1e-5)
        torch.testing.assert_close(mine.values[:, :, : len(ids)], theirs.values, rtol=0, atol=1e-5)


def test_chat_session_reuses_the_cache(engine):
    params = SamplingParams(max_new_tokens=6)
    session = ChatSession(engine, params=params)
    first = _say(session, "Describe this image.", images=[Image.open(IMAGES / "image0.jpg")])
    # The first turn is exactly the upstream prompt.
    processor = engine.processor
    assert session.last_prompt_ids == processor.tokenize_prompt(processor.apply_chat_template(session.messages[:-1]))
    assert session.last_prefill_tokens == len(session.last_prompt_ids)
    assert first == _without_cache(engine, session, params)

    second = _say(session, "And what else?")
    assert session.messages[-1] == {"role": "assistant", "content": second}
    assert 0 < session.last_prefill_tokens < 20  # only the new question: the image block and the answer are cached
    assert second == _without_cache(engine, session, params)

    # A new image in a later turn: only it is looked up (older images are in the KV cache), and its block is run.
    lookups = engine.image_cache.hits + engine.image_cache.misses
    third = _say(session, "Compare with this one.", images=[Image.open(IMAGES / "image1.jpg")])
    assert engine.image_cache.hits + engine.image_cache.misses - lookups == 1
    assert engine.model.num_visual_tokens < session.last_prefill_tokens < engine.model.num_visual_tokens + 30
    assert third == _without_cache(engine, session, params)
    assert len(session.images) == 2

    # The same picture again, as another object: its features come from the image cache.
    hits = engine.image_cache.hits
    fourth = _say(session, "Again?", images=[Image.open(IMAGES / "image0.jpg")])
    assert engine.image_cache.hits - hits == 1
    assert fourth == _without_cache(engine, session, params)
    _assert_cache_matches_fresh_prefill(session)

    session.reset()
    assert session.messages == [] and session.images == [] and session.ids == []
    assert session._cache.get_seq_length() == 0
    fresh = _say(session, "Describe this image.", images=[IMAGES / "image0.jpg"])
    assert fresh == first and session.last_prefill_tokens == len(session.last_prompt_ids)


def test_chat_session_decodes_with_the_engines_step_and_cache_pool(engine):
    """A session runs its engine's decode step (the one a compiled engine compiled), and a step that wants static
    caches gets one from the engine's pool for the whole conversation, given back on reset: the answers are those
    of the eager step with its growing cache."""
    params = SamplingParams(max_new_tokens=6)
    eager = ChatSession(engine, params=params)
    calls = []

    def counting(*args):
        calls.append(1)
        return decode_one_token(*args)

    static = Engine(engine.model, engine.processor, step=DecodeStep(counting, static_cache=True))
    session = ChatSession(static, params=params, max_length=512)
    assert session._cache is not None and not static.static_caches._free
    for text, images in (("Describe this image.", [IMAGES / "image0.jpg"]), ("And what else?", [])):
        assert _say(session, text, images=images) == _say(eager, text, images=images)
    assert len(calls) == 2 * (params.max_new_tokens - 1)
    borrowed = session._cache
    session.reset()
    assert session._cache is borrowed and not static.static_caches._free  # given back, then taken again, zeroed
    assert session._cache.get_seq_length() == 0
    with pytest.raises(ValueError, match="512 positions"):
        _say(session, "Hi " * 600)


def test_chat_session_history_layout(engine):
    """Each answer is followed by EOS (as in upstream training data) and the next turn starts with "\nHuman:"."""
    params = SamplingParams(max_new_tokens=4)
    session = ChatSession(engine, params=params)
    _say(session, "Hello there.")
    first_prompt = list(session.last_prompt_ids)
    _say(session, "What is this?", images=[Image.open(IMAGES / "image1.jpg")])
    tokenizer = engine.processor.tokenizer
    rest = session.last_prompt_ids[len(first_prompt) :]
    eos_at = rest.index(tokenizer.eos_token_id)
    answer_ids = rest[:eos_at]
    assert tokenizer.decode(answer_ids, skip_special_tokens=True) == session.messages[1]["content"]
    turn = rest[eos_at + 1 :]
    expected = engine.processor.tokenize_prompt("\nHuman: <image>\nHuman: What is this?\nAI: ", add_bos=False)
    assert turn == expected
    _assert_cache_matches_fresh_prefill(session)


def test_chat_session_takes_tags_in_text_as_text(engine):
    """A tag typed in the text is characters, not an image (issue 22): only attached images are images."""
    session = ChatSession(engine, params=SamplingParams(max_new_tokens=3))
    _say(session, "What is <image> here?")
    assert -1 not in session.last_prompt_ids and "<image>" in engine.processor.decode(session.last_prompt_ids)
    assert session.messages[0]["content"][-1]["text"] == "What is <image> here?"


def test_chat_session_bad_image_leaves_history_untouched(engine, tmp_path):
    session = ChatSession(engine, params=SamplingParams(max_new_tokens=3))
    _say(session, "Hello.")
    before = copy.deepcopy(session.messages)
    with pytest.raises(FileNotFoundError):
        _say(session, "Look.", images=[tmp_path / "missing.jpg"])
    assert session.messages == before and session.images == []
    ids_before = list(session.ids)
    with pytest.raises(FileNotFoundError):
        _say(session, "Look.", images=[tmp_path / "missing.jpg"])
    assert session.ids == ids_before
    _say(session, "Still there?")
    assert len(session.messages) == 4


@pytest.mark.parametrize("lookahead", [False, True])
def test_chat_session_system_prompt_and_stop(engine, lookahead, monkeypatch):
    """With `lookahead` (generate_tokens' default on CUDA) a turn cut short has also fed its last token to the
    cache: the history must still be what the cache holds."""
    monkeypatch.setattr(session_module, "generate_tokens", functools.partial(generate_tokens, lookahead=lookahead))
    params = SamplingParams(max_new_tokens=8)
    session = ChatSession(engine, system="You are terse.", params=params)
    answer = _say(session, "Hi")
    assert session.messages[0] == {"role": "system", "content": "You are terse."}
    assert answer == _without_cache(engine, session, params)
    session.reset()
    assert session.messages == [{"role": "system", "content": "You are terse."}]
    # A turn cut by a stop string records the cut text, and the next turn still matches a fresh computation.
    stop = answer[len(answer) // 2 : len(answer) // 2 + 2]
    cut = _say(session, "Hi", params=params.with_(stop=(stop,)))
    assert cut == answer[: answer.index(stop)]
    assert session.messages[-1] == {"role": "assistant", "content": cut}
    assert _say(session, "Go on.") == _without_cache(engine, session, params)
    _assert_cache_matches_fresh_prefill(session)


# --- video ---------------------------------------------------------------------------------------


FRAME_COLOURS = [(10 + 12 * i, 250 - 12 * i, 60 if i % 2 else 190) for i in range(20)]


def _write_video(path, colours=FRAME_COLOURS, size=64):
    import av
    import numpy as np

    last_error = None
    for codec in ("libx264", "mpeg4"):
        try:
            with av.open(str(path), "w") as container:
                stream = container.add_stream(codec, rate=10)
                stream.width = stream.height = size
                stream.pix_fmt = "yuv420p"
                for colour in colours:
                    frame = np.empty((size, size, 3), np.uint8)
                    frame[...] = colour
                    for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                        container.mux(packet)
                for packet in stream.encode():
                    container.mux(packet)
            return path
        except Exception as err:  # an encoder missing from this PyAV build: try the next
            last_error = err
    pytest.skip(f"PyAV can't encode a test video here: {last_error}")


def _which_frames(frames) -> list[int]:
    """The index in FRAME_COLOURS of each frame's colour (lossy compression moves colours by a few units)."""
    found = []
    for frame in frames:
        colour = torch.tensor(frame.getpixel((frame.width // 2, frame.height // 2)), dtype=torch.float32)
        distances = (torch.tensor(FRAME_COLOURS, dtype=torch.float32) - colour).abs().amax(dim=1)
        assert distances.min() <= 10, colour
        found.append(int(distances.argmin()))
    return found


@pytest.fixture(scope="module")
def video_file(tmp_path_factory):
    pytest.importorskip("av")
    return _write_video(tmp_path_factory.mktemp("video") / "colours.mp4")


def test_load_video_frames_picks_segment_centres(video_file):
    from openowl.video import load_video_frames, segment_centre_indices

    indices = segment_centre_indices(len(FRAME_COLOURS), 4)
    assert indices == sorted(set(indices)) and len(indices) == 4
    frames = load_video_frames(video_file)
    assert len(frames) == 4
    assert all(frame.mode == "RGB" and frame.size == (224, 224) for frame in frames)
    assert _which_frames(frames) == indices
    assert [f.size for f in load_video_frames(video_file, num_frames=2, size=56)] == [(56, 56)] * 2


def test_load_video_frames_converts_only_the_chosen_frames(video_file, monkeypatch):
    """A long video must not be held in memory as one RGB image per frame."""
    import av

    from openowl.video import load_video_frames

    converted = []
    to_image = av.VideoFrame.to_image

    def counting(frame, *args, **kwargs):
        converted.append(frame)
        return to_image(frame, *args, **kwargs)

    monkeypatch.setattr(av.VideoFrame, "to_image", counting)
    assert len(load_video_frames(video_file, num_frames=4)) == 4
    assert len(converted) == 4


def test_load_video_frames_short_video(tmp_path):
    pytest.importorskip("av")
    from openowl.video import load_video_frames

    path = _write_video(tmp_path / "short.mp4", FRAME_COLOURS[:3])
    frames = load_video_frames(path, num_frames=4, size=32)
    assert len(frames) == 4 and all(f.size == (32, 32) for f in frames)
    assert _which_frames(frames) == [0, 0, 1, 2]  # fewer frames than asked for: some are repeated


def test_segment_centre_indices():
    from openowl.video import segment_centre_indices

    assert segment_centre_indices(20, 4) == [2, 7, 12, 16]
    assert segment_centre_indices(3, 4)[-1] <= 2  # never past the end
    assert all(0 <= i < 100 for i in segment_centre_indices(100, 8))


def test_load_video_frames_errors(tmp_path):
    pytest.importorskip("av")
    from openowl.video import load_video_frames

    with pytest.raises(FileNotFoundError, match="missing.mp4"):
        load_video_frames(tmp_path / "missing.mp4")
    corrupt = tmp_path / "corrupt.mp4"
    corrupt.write_bytes(b"\x00\x00\x00\x18ftypmp42" + bytes(range(256)) * 4)
    with pytest.raises(ValueError, match="corrupt.mp4"):
        load_video_frames(corrupt)
    (tmp_path / "empty.mp4").write_bytes(b"")
    with pytest.raises(ValueError, match="empty.mp4"):
        load_video_frames(tmp_path / "empty.mp4")


def test_video_turn_in_a_chat_session(video_model, video_file):
    from openowl.video import load_video_frames

    video_processor = OwlProcessor.from_pretrained(VIDEO_CHECKPOINT)
    engine = Engine(video_model, video_processor)
    frames = load_video_frames(video_file, size=video_processor.image_size)
    params = SamplingParams(max_new_tokens=6)
    session = ChatSession(engine, params=params)
    answer = _say(session, "What happens in the video?", videos=[frames])
    prompt = video_processor.apply_chat_template(session.messages[:-1])
    assert "<|video|>" in prompt
    alone = Engine(video_model, video_processor).generate([Request(prompt, videos=[frames])], params)[0]
    assert answer == alone.text and len(alone.token_ids) == 6
    follow_up = _say(session, "And then?")
    assert session.last_prefill_tokens < len(session.last_prompt_ids) - video_model.num_visual_tokens
    assert engine.video_cache.misses == 1  # the video was encoded once, for the turn that brought it
    assert follow_up == _without_cache(engine, session, params)
    # Batched with a text-only row, the video row gives what it gives alone.
    batch = engine.generate([Request(prompt, videos=[frames]), Request(_prompt("Hi"))], params)
    assert batch[0].token_ids == alone.token_ids
    assert batch[1].token_ids == engine.generate([Request(_prompt("Hi"))], params)[0].token_ids


# --- quantization --------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_weight_only_quantization_is_close_to_bf16(tiny, mode):
    pytest.importorskip("torchao")
    from torchao.utils import TorchAOBaseTensor

    from openowl.infer.quantize import quantize

    model = copy.deepcopy(tiny.model).to(torch.bfloat16)
    ids = torch.tensor([tiny.processor.tokenize_prompt(_prompt("Describe this image.", 1))])
    pixels = tiny.processor.preprocess_images([IMAGES / "image0.jpg"]).to(torch.bfloat16)
    with torch.no_grad():
        reference = model(input_ids=ids, pixel_values=pixels).logits.float()
    assert quantize(model, mode, group_size=32) is model  # the tiny LM is 64 wide: groups of 32
    linears = [m for m in model.language_model.modules() if isinstance(m, torch.nn.Linear)]
    if mode == "int8":  # on a CPU: plain int8 tensors, torchao's values
        assert not linears
        int8 = [m for m in model.language_model.modules() if isinstance(m, Int8WeightOnlyLinear)]
        assert len(int8) == 7 * model.language_model.config.num_hidden_layers + 1  # q k v o, gate up down; the head
        assert all(m.weight.dtype == torch.int8 and m.scale.dtype == torch.bfloat16 for m in int8)
    else:
        assert linears and all(isinstance(m.weight, TorchAOBaseTensor) for m in linears)
    vision = [m for m in model.vision_model.modules() if isinstance(m, torch.nn.Linear)]
    assert vision and not any(isinstance(m.weight, TorchAOBaseTensor) for m in vision)  # vision stays as it was
    with torch.no_grad():
        quantized = model(input_ids=ids, pixel_values=pixels).logits.float()
    similarity = torch.nn.functional.cosine_similarity(reference[0], quantized[0], dim=-1)
    assert similarity.min() > (0.99 if mode == "int8" else 0.98)  # 4 bits lose more (measured 0.9999, 0.988)
    assert not torch.equal(reference, quantized)  # something really changed
    completion = Engine(model, tiny.processor).generate([Request(_prompt("Hi"))], SamplingParams(max_new_tokens=4))[0]
    assert len(completion.token_ids) == 4


def test_cpu_int8_skips_widths_its_kernel_cannot_read(tiny):
    """PyTorch's CPU int8 kernel reads 16 inputs at a time (in bf16 it crashes or returns garbage otherwise): a
    Linear whose input width is not a multiple of 16 stays in full precision, and the model still runs."""
    pytest.importorskip("torchao")
    from openowl.infer.quantize import quantize

    model = copy.deepcopy(tiny.model).to(torch.bfloat16)
    mlp = model.language_model.model.layers[0].mlp
    width = mlp.down_proj.in_features + 8
    mlp.up_proj = torch.nn.Linear(mlp.up_proj.in_features, width, bias=False, dtype=torch.bfloat16)
    mlp.gate_proj = torch.nn.Linear(mlp.gate_proj.in_features, width, bias=False, dtype=torch.bfloat16)
    mlp.down_proj = torch.nn.Linear(width, mlp.down_proj.out_features, bias=False, dtype=torch.bfloat16)
    quantize(model, "int8")
    assert type(mlp.down_proj) is torch.nn.Linear and mlp.down_proj.weight.dtype == torch.bfloat16
    assert isinstance(mlp.up_proj, Int8WeightOnlyLinear) and isinstance(mlp.gate_proj, Int8WeightOnlyLinear)
    completion = Engine(model, tiny.processor).generate([Request(_prompt("Hi"))], SamplingParams(max_new_tokens=3))[0]
    assert len(completion.token_ids) == 3


def test_int8_linear_matches_its_dequantized_weight():
    """Both paths of the CPU int8 Linear (PyTorch's int8 kernel for a few rows, a dequantized GEMM for more)
    compute x @ (int8 * scale).T + bias."""
    torch.manual_seed(0)
    weight = torch.randint(-127, 128, (48, 32), dtype=torch.int8)
    scale, bias = torch.rand(48) / 100, torch.randn(48)
    layer = Int8WeightOnlyLinear(weight, scale, bias)
    for rows in (1, 40):
        x = torch.randn(2, rows, 32)
        expected = x @ (weight.float() * scale[:, None]).T + bias
        torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)


def test_int8_layers_share_one_dequantized_buffer_and_autograd_gets_its_own():
    """Many rows dequantize into one buffer per thread (layer after layer, larger and smaller), each product the
    right one; a product autograd will go back through keeps a weight of its own, so the next layer can't overwrite
    what the backward reads."""
    from openowl.infer import quantize

    torch.manual_seed(0)
    layers = [
        Int8WeightOnlyLinear(torch.randint(-127, 128, (n, 32), dtype=torch.int8), torch.rand(n) / 100, None)
        for n in (48, 96, 16)
    ]
    x = torch.randn(40, 32)
    with torch.no_grad():
        outs = [layer(x) for layer in layers]
    buffers = {quantize._scratch.buffer.data_ptr()}
    with torch.no_grad():
        outs += [layer(x) for layer in layers]
    assert {quantize._scratch.buffer.data_ptr()} == buffers and quantize._scratch.buffer.numel() >= 96 * 32
    for layer, out in zip(layers * 2, outs, strict=True):
        torch.testing.assert_close(out, x @ (layer.weight.float() * layer.scale[:, None]).T, rtol=1e-5, atol=1e-5)
    wanted = x.clone().requires_grad_()
    (layers[0](wanted).sum() + layers[2](wanted).sum()).backward()
    expected = (layers[0].weight.float() * layers[0].scale[:, None]).sum(0)
    expected += (layers[2].weight.float() * layers[2].scale[:, None]).sum(0)
    torch.testing.assert_close(wanted.grad, expected.expand(40, 32), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("rows", [1, 3, 8])
def test_int8_product_sum_is_the_dequantized_product(rows):
    """The form compiled CUDA decoding gives int8 Linears (CUDA itself: `benchmarks/cuda_check.py`)."""
    from openowl.infer.quantize import int8_product_sum

    torch.manual_seed(0)
    weight, scale = torch.randint(-127, 128, (48, 64), dtype=torch.int8), torch.rand(48) / 100
    x = torch.randn(rows, 64)
    expected = x @ (weight.float() * scale[:, None]).T
    torch.testing.assert_close(int8_product_sum(x, weight, scale), expected, rtol=1e-5, atol=1e-5)
    bf16 = int8_product_sum(x.bfloat16(), weight, scale.bfloat16())
    assert bf16.dtype == torch.bfloat16 and bf16.shape == (rows, 48)
    torch.testing.assert_close(
        bf16.float(),
        x.bfloat16().float() @ (weight.float() * scale.bfloat16().float()[:, None]).T,
        rtol=1e-2,
        atol=1e-2,
    )


def test_preparing_puts_the_decode_kernels_in_for_eager_decoding_only(tiny):
    from openowl.infer.kernels import ATTENTION, DecodeLinear, PackedLinear, can_pack, cpu_kernels

    model = copy.deepcopy(tiny.model).to(torch.bfloat16)
    lm = model.language_model
    Engine(model, tiny.processor)  # the engine itself changes nothing
    assert not any(type(m) is DecodeLinear for m in lm.modules())
    prepare_for_inference(model)
    linears = [m for m in lm.modules() if isinstance(m, torch.nn.Linear)]
    assert len(linears) == 9 * lm.config.num_hidden_layers + 1  # 7 projections, fused q/k/v and gate/up, the head
    assert all(type(m) is DecodeLinear for m in linears)
    assert lm.config._attn_implementation == (ATTENTION if cpu_kernels() else "sdpa")
    assert not any(isinstance(m, DecodeLinear) for m in model.vision_model.modules())
    vision = [m for m in model.vision_model.modules() if isinstance(m, torch.nn.Linear)]
    assert vision and all(type(m) is (PackedLinear if can_pack() else torch.nn.Linear) for m in vision)  # AMX
    prepare_for_inference(model, compile=True)  # under torch.compile: inductor's GEMMs and PyTorch's attention
    assert all(type(m) is torch.nn.Linear for m in linears) and lm.config._attn_implementation == "sdpa"
    assert tiny.model.language_model.config._attn_implementation == "sdpa"  # float32: nothing to gain


@pytest.mark.parametrize("mode", ["bf16", "int8"])
def test_compiled_cpu_decoding_runs_inductors_gemms_on_frozen_weights(tiny, mode):
    """On a CPU, the compiled decoding step freezes the weights so that inductor runs its own pre-packed GEMMs
    (AMX for bf16; for int8 in place of PyTorch's int8 kernel: the fast paths of the README's figures), and
    computes the logits of the eager step."""
    from torch._dynamo.utils import counters

    from openowl.infer.prepare import compiled_decode

    model = copy.deepcopy(tiny.model).to(torch.bfloat16)
    if mode == "int8":
        pytest.importorskip("torchao")
        from openowl.infer.quantize import quantize

        quantize(model, "int8")
    batch = tiny.processor.pad([tiny.processor.tokenize_prompt(_prompt("Describe this image.", 1))])
    prepare_for_inference(model, compile=True)  # plain Linears
    features = Engine(model, tiny.processor).image_features([IMAGES / "image0.jpg"])
    cache = static_cache(model, 128)
    with torch.no_grad():
        logits, mask = prefill(model, batch["input_ids"], batch["attention_mask"], cache, features)
        token, used = logits.argmax(-1), mask.shape[1]
        full = torch.cat([mask, mask.new_zeros(1, 128 - used)], dim=1)
        full[:, used] = 1
        positions = torch.tensor([[used]])
        counters.clear()
        fast = compiled_decode(model)(model, token, full, positions, cache).float()
        slow = decode_one_token(model, token, full, positions, cache).float()  # rewrites the same cache slot
    per_layer = 4  # the engine fuses q/k/v and gate/up, int8 ones too
    layers = model.language_model.config.num_hidden_layers
    assert counters["inductor"]["cpp_templated_kernel_counter"] >= per_layer * layers
    assert torch.nn.functional.cosine_similarity(fast, slow).item() > 0.9999


def test_unknown_quantization_mode_raises(tiny):
    pytest.importorskip("torchao")
    from openowl.infer.quantize import quantize

    with pytest.raises(ValueError, match="int2"):
        quantize(tiny.model, "int2")
    assert all(type(p) is torch.nn.Parameter for p in tiny.model.parameters())  # left untouched


def test_chunked_cache_layer_holds_what_concatenation_holds():
    """Prefill, steps across chunk boundaries, a crop, a batch selection and a replaced tensor: the layer's keys
    and values are always those of plain concatenation, and steps inside a chunk write in place."""
    torch.manual_seed(0)
    layer, keys, values = ChunkedLayer(), None, None
    layer.chunk = 4

    def step(n: int, rows: int = 3) -> None:
        nonlocal keys, values
        k, v = torch.randn(rows, 2, n, 5), torch.randn(rows, 2, n, 5)
        keys = k if keys is None else torch.cat([keys, k], dim=2)
        values = v if values is None else torch.cat([values, v], dim=2)
        out = layer.update(k, v)
        assert torch.equal(out[0], keys) and torch.equal(out[1], values)
        assert torch.equal(layer.keys, keys) and layer.get_seq_length() == keys.shape[2]

    step(3)  # prefill
    buffer = layer.keys.data_ptr()
    step(1)
    assert layer.keys.data_ptr() == buffer  # in place, inside the first chunk
    step(1)
    step(6)  # across two boundaries
    layer.crop(-4)
    keys, values = keys[:, :, :-4], values[:, :, :-4]
    step(2)
    index = torch.tensor([2, 0])
    layer.batch_select_indices(index)
    keys, values = keys[index], values[index]
    step(1, rows=2)
    layer.keys, layer.values = layer.keys[:, :, 3:], layer.values[:, :, 3:]  # as the server drops padding columns
    keys, values = keys[:, :, 3:], values[:, :, 3:]
    step(2, rows=2)
