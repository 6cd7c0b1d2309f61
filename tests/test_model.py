"""Unit tests of the composed model on randomly initialised tiny presets: shapes, the splice, the loss, padding,
the BLOOM text model and the configs. CPU, seconds."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
import torch.nn.functional as F
from conftest import CHECKPOINT
from transformers import AutoModelForCausalLM

from openowl import OwlConfig, OwlForConditionalGeneration, get_preset
from openowl.config import PRESETS
from openowl.constants import IMAGE_PLACEHOLDER_ID, VIDEO_PLACEHOLDER_ID
from openowl.model.owl import PreAppliedLayerNorm

NV = 65  # visual tokens per image / video in the tiny presets (64 queries + vit_eos)
SIZE = 56  # the tiny presets' image size
IMG = [IMAGE_PLACEHOLDER_ID] * NV
VID = [VIDEO_PLACEHOLDER_ID] * NV


def _randomize(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Fresh models have zero `query_tokens`, `vit_eos`, position embeddings and norm biases, which would make
    every image look alike; give every parameter random values (norm weights around 1)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.dim() == 1 and name.endswith("weight"):  # LayerNorm / RMSNorm scales
                param.copy_(1.0 + 0.1 * torch.randn(param.shape, generator=gen))
            else:
                param.copy_(0.02 * torch.randn(param.shape, generator=gen))
    return model.eval()


def _build(config: OwlConfig, seed: int = 0) -> OwlForConditionalGeneration:
    torch.manual_seed(seed)
    return _randomize(OwlForConditionalGeneration(config), seed)


@pytest.fixture(scope="module")
def tiny():
    return _build(get_preset("tiny"))


@pytest.fixture(scope="module")
def tiny_video():
    return _build(get_preset("tiny-video"), seed=1)


def _bloom_config() -> OwlConfig:
    config = get_preset("tiny")
    config.text_config = {
        "model_type": "bloom",
        "hidden_size": 64,
        "n_layer": 2,
        "n_head": 4,
        "vocab_size": 1000,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "pad_token_id": 3,
    }
    return config


@pytest.fixture(scope="module")
def bloom():
    return _build(_bloom_config(), seed=2)


def _pixels(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(seed))


def _video(b: int, t: int = 4, seed: int = 0) -> torch.Tensor:
    return torch.randn(b, 3, t, SIZE, SIZE, generator=torch.Generator().manual_seed(seed))


def _ids(*rows: list[int]) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.long)


def _blocks(ids: torch.Tensor, row: int, placeholder: int) -> list[int]:
    """Start positions of the placeholder blocks of one row (every NV positions of the placeholder)."""
    positions = (ids[row] == placeholder).nonzero().flatten().tolist()
    return positions[::NV]


# --- shapes --------------------------------------------------------------------------------------


@torch.no_grad()
def test_shapes(tiny, tiny_video):
    pixels = _pixels(3)
    assert tiny.vision_model.forward_features(pixels).shape == (3, 17, 64)  # CLS + 4x4 patches
    assert tiny.get_image_features(pixels).shape == (3, NV, 64)
    assert tiny_video.get_video_features(_video(2, t=4)).shape == (2, NV, 64)
    ids = _ids([1, 450, *IMG, 13, 29901], [1, 910, 338, *IMG, 29871])
    logits = tiny(input_ids=ids, pixel_values=pixels[:2]).logits
    assert logits.shape == (2, ids.shape[1], 32000)
    assert torch.isfinite(logits).all()


@torch.no_grad()
def test_images_get_distinct_features(tiny):
    features = tiny.get_image_features(_pixels(2))
    assert not torch.allclose(features[0, :-1], features[1, :-1])
    # The last token is the learned vit_eos, the same for every image.
    torch.testing.assert_close(features[0, -1], features[1, -1], rtol=0, atol=0)
    torch.testing.assert_close(features[0, -1], tiny.abstractor.vit_eos[0, 0], rtol=0, atol=0)


@torch.no_grad()
def test_single_frame_video_is_an_image(tiny):
    pixels = _pixels(2)
    video = pixels.unsqueeze(2)  # (B, 3, 1, H, W)
    torch.testing.assert_close(tiny.get_video_features(video), tiny.get_image_features(pixels))


def test_multi_frame_video_needs_temporal_modules(tiny):
    with pytest.raises(ValueError, match="no temporal modules"):
        tiny.get_video_features(_video(1, t=4))


# --- the splice ----------------------------------------------------------------------------------


@torch.no_grad()
def test_splice_puts_visual_tokens_at_placeholders(tiny):
    ids = _ids([1, 450, 4996, *IMG, 13, *[29950] * 64], [1, *IMG, 29871, *IMG, 319])
    pixels = _pixels(3)
    embeds = tiny.embed_inputs(ids, pixel_values=pixels)
    features = tiny.get_image_features(pixels)
    text = tiny.embed_text(ids)
    # Reading order: sample 0's image, then sample 1's two images.
    starts = [(0, p) for p in _blocks(ids, 0, -1)] + [(1, p) for p in _blocks(ids, 1, -1)]
    assert starts == [(0, 3), (1, 1), (1, 67)]
    for k, (row, pos) in enumerate(starts):
        torch.testing.assert_close(embeds[row, pos : pos + NV], features[k], rtol=0, atol=0)
    text_positions = ids >= 0
    torch.testing.assert_close(embeds[text_positions], text[text_positions], rtol=0, atol=0)
    # Precomputed features give the same embeddings as pixels.
    torch.testing.assert_close(tiny.embed_inputs(ids, image_features=features), embeds, rtol=0, atol=0)


@torch.no_grad()
def test_adjacent_image_blocks_are_two_images(tiny):
    """Upstream finds the start of each run of negative ids, so `<image><image>` became ONE image."""
    ids = _ids([1, 450, *IMG, *IMG, 13, 29901])
    pixels = _pixels(2, seed=3)
    features = tiny.get_image_features(pixels)
    embeds = tiny.embed_inputs(ids, pixel_values=pixels)
    torch.testing.assert_close(embeds[0, 2 : 2 + NV], features[0], rtol=0, atol=0)
    torch.testing.assert_close(embeds[0, 2 + NV : 2 + 2 * NV], features[1], rtol=0, atol=0)
    assert not torch.allclose(embeds[0, 2 + NV : 2 + 2 * NV - 1], features[0, :-1])
    # And they reach the LM: the second image changes the logits after it.
    other = torch.cat([pixels[:1], _pixels(1, seed=4)])
    last = tiny(input_ids=ids, pixel_values=pixels).logits[0, -1]
    assert not torch.allclose(last, tiny(input_ids=ids, pixel_values=other).logits[0, -1])


@pytest.mark.parametrize(
    ("rows", "n_images", "match"),
    [
        ([[1, 5, *IMG, 6]], 2, r"1 <image> placeholder\(s\) but 2 image\(s\)"),  # too many images
        ([[1, 5, *IMG, 6, *IMG, 7]], 1, r"2 <image> placeholder\(s\) but 1 image\(s\)"),  # too few
        ([[1, 5, *IMG, 6], [1, 5, 6, *[2] * NV]], 0, r"1 <image> placeholder\(s\) but 0 image\(s\)"),  # none
        ([[1, 5, 6]], 1, r"0 <image> placeholder\(s\) but 1 image\(s\)"),  # images, no placeholder
        ([[1, 5, *[IMAGE_PLACEHOLDER_ID] * 60, 6]], 1, r"60 image placeholder ids, not a multiple of 65"),  # cut
        ([[1, 5, *IMG, *[IMAGE_PLACEHOLDER_ID] * 5, 6]], 2, r"70 image placeholder ids, not a multiple of 65"),
    ],
)
def test_image_count_mismatch_raises(tiny, rows, n_images, match):
    pixels = _pixels(n_images) if n_images else None
    with pytest.raises(ValueError, match=match):
        tiny.embed_inputs(_ids(*rows), pixel_values=pixels)


def test_video_count_mismatch_raises(tiny_video):
    with pytest.raises(ValueError, match=r"1 <\|video\|> placeholder\(s\) but 0 video\(s\)"):
        tiny_video.embed_inputs(_ids([1, 5, *VID, 6]))
    with pytest.raises(ValueError, match=r"0 <\|video\|> placeholder\(s\) but 2 video\(s\)"):
        tiny_video.embed_inputs(_ids([1, 5, 6]), video_pixel_values=_video(2, t=2))
    with pytest.raises(ValueError, match=r"64 video placeholder ids, not a multiple of 65"):
        tiny_video.embed_inputs(_ids([1, *VID[:-1], 6]), video_pixel_values=_video(1, t=2))
    # Image placeholders are not video placeholders: a video given for an <image> block is an error.
    with pytest.raises(ValueError, match="<image>"):
        tiny_video.embed_inputs(_ids([1, *IMG, 6]), video_pixel_values=_video(1, t=2))


def test_unknown_negative_ids_raise(tiny):
    with pytest.raises(ValueError, match="negative ids other than the placeholders"):
        tiny.embed_inputs(_ids([1, 5, -3, 6]))


@torch.no_grad()
def test_video_splice(tiny_video):
    ids = _ids([1, 450, *VID, 13, 29901], [1, *VID, 29871, 319, 29901])
    videos = _video(2, t=4, seed=5)
    embeds = tiny_video.embed_inputs(ids, video_pixel_values=videos)
    features = tiny_video.get_video_features(videos)
    torch.testing.assert_close(embeds[0, 2 : 2 + NV], features[0], rtol=0, atol=0)
    torch.testing.assert_close(embeds[1, 1 : 1 + NV], features[1], rtol=0, atol=0)
    text = tiny_video.embed_text(ids)
    torch.testing.assert_close(embeds[ids >= 0], text[ids >= 0], rtol=0, atol=0)
    assert not torch.allclose(features[0, :-1], features[1, :-1])
    # The temporal path matters: the frames in another order give other tokens.
    assert not torch.allclose(tiny_video.get_video_features(videos.flip(2))[:, :-1], features[:, :-1])


@torch.no_grad()
def test_images_and_video_in_one_prompt(tiny_video):
    """Several images and a video in one sample of the video model: each image gets its own tokens (upstream's
    video `generate` gave every image of a sample the first one's)."""
    ids = _ids([1, *IMG, 13, *VID, 29871, *IMG, 319])
    pixels, video = _pixels(2, seed=6), _video(1, t=4, seed=7)
    embeds = tiny_video.embed_inputs(ids, pixel_values=pixels, video_pixel_values=video)
    images = tiny_video.get_image_features(pixels)
    torch.testing.assert_close(embeds[0, 1 : 1 + NV], images[0], rtol=0, atol=0)
    v = 1 + NV + 1
    torch.testing.assert_close(embeds[0, v : v + NV], tiny_video.get_video_features(video)[0], rtol=0, atol=0)
    i2 = v + NV + 1
    torch.testing.assert_close(embeds[0, i2 : i2 + NV], images[1], rtol=0, atol=0)
    logits = tiny_video(input_ids=ids, pixel_values=pixels, video_pixel_values=video).logits
    assert logits.shape == (1, ids.shape[1], 32000) and torch.isfinite(logits).all()


# --- loss ----------------------------------------------------------------------------------------


def _manual_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    targets = labels[:, 1:].clone()
    targets[targets < 0] = -100
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=-100)


@torch.no_grad()
def test_loss_is_manual_cross_entropy(tiny):
    ids = _ids([1, 450, 4996, *IMG, 13, 29950, 7889, 29901, 319], [1, *IMG, 910, 338, 263, 1243, 29871, 2, 2])
    labels = ids.clone()
    labels[0, :5] = -100  # a prompt part
    labels[1, -2:] = -100  # padding
    out = tiny(input_ids=ids, pixel_values=_pixels(2), labels=labels)
    expected = _manual_loss(out.logits, labels)
    torch.testing.assert_close(out.loss, expected, rtol=1e-6, atol=1e-6)
    # The mean runs over all supervised tokens of the batch, not per sample.
    n0 = int((labels[0, 1:] >= 0).sum())
    n1 = int((labels[1, 1:] >= 0).sum())
    per_row = [_manual_loss(out.logits[i : i + 1], labels[i : i + 1]) for i in range(2)]
    torch.testing.assert_close(out.loss, (per_row[0] * n0 + per_row[1] * n1) / (n0 + n1), rtol=1e-5, atol=1e-6)
    assert out.loss > 5  # a random model over 32000 pieces: ~ln(32000)


@torch.no_grad()
def test_placeholder_labels_are_ignored(tiny):
    ids = _ids([1, 450, *IMG, 13, 29950, 7889, 29901])
    pixels = _pixels(1)
    out = tiny(input_ids=ids, pixel_values=pixels, labels=ids)  # labels hold -1 at the image
    masked = ids.masked_fill(ids < 0, -100)
    torch.testing.assert_close(out.loss, tiny(input_ids=ids, pixel_values=pixels, labels=masked).loss)
    torch.testing.assert_close(out.loss, _manual_loss(out.logits, masked))
    assert out.past_key_values is None  # a loss forward fills no KV cache
    assert tiny(input_ids=ids, pixel_values=pixels, labels=ids, use_cache=True).past_key_values is not None


def test_all_ignored_labels_give_zero_loss_not_nan(tiny):
    ids = _ids([1, 450, *IMG, 13, 29950])
    out = tiny(input_ids=ids, pixel_values=_pixels(1), labels=torch.full_like(ids, -100))
    assert torch.isfinite(out.loss) and out.loss.item() == 0.0
    out.loss.backward()
    grad = tiny.query_tokens.grad
    assert grad is None or (torch.isfinite(grad).all() and not grad.any())
    tiny.zero_grad(set_to_none=True)


# --- padding and generation ----------------------------------------------------------------------


@pytest.mark.parametrize("which", ["tiny", "bloom"])
@torch.no_grad()
def test_left_padding_matches_unpadded(which, request):
    model = request.getfixturevalue(which)
    short = [1, 450, *IMG, 13, 901, 319]
    long = [1, 910, 338, 263, 243, 871, *IMG, 871, 251]  # ids < 1000: the BLOOM model's vocabulary
    pixels = _pixels(2, seed=8)
    pad = len(long) - len(short)
    ids = _ids([2] * pad + short, long)
    mask = torch.ones_like(ids)
    mask[0, :pad] = 0
    batched = model(input_ids=ids, attention_mask=mask, pixel_values=pixels).logits[:, -1]
    alone_short = model(input_ids=_ids(short), pixel_values=pixels[:1]).logits[0, -1]
    alone_long = model(input_ids=_ids(long), pixel_values=pixels[1:]).logits[0, -1]
    torch.testing.assert_close(batched[0], alone_short, rtol=0, atol=1e-5)
    torch.testing.assert_close(batched[1], alone_long, rtol=0, atol=1e-5)
    # The mask matters: attending to the padding changes the short prompt's logits.
    unmasked = model(input_ids=ids, pixel_values=pixels).logits[0, -1]
    assert not torch.allclose(unmasked, alone_short, atol=1e-5)


@torch.no_grad()
def test_left_padding_position_ids_start_at_zero(tiny):
    """RoPE is relative, so the logits alone can't see the positions; check what the LM is given."""
    seen = {}

    def spy(module, args, kwargs):
        seen["position_ids"] = kwargs.get("position_ids")

    handle = tiny.language_model.register_forward_pre_hook(spy, with_kwargs=True)
    try:
        ids = _ids([2, 2, 1, 450, 13], [1, 910, 338, 263, 29871])
        mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
        tiny(input_ids=ids, attention_mask=mask)
        assert seen["position_ids"].tolist() == [[0, 0, 0, 1, 2], [0, 1, 2, 3, 4]]
        explicit = torch.tensor([[5, 6, 7, 8, 9]] * 2)
        tiny(input_ids=ids, attention_mask=mask, position_ids=explicit)
        assert torch.equal(seen["position_ids"], explicit)
    finally:
        handle.remove()


@torch.no_grad()
def test_batched_left_padded_generation_matches_single(tiny):
    short = [1, 450, 4996, *IMG, 13, 29901, 319]
    long = [1, 910, 338, 263, 1243, *IMG, 29871]
    pixels = _pixels(2, seed=9)
    pad = len(long) - len(short)
    ids = _ids([2] * pad + short, long)
    mask = torch.ones_like(ids)
    mask[0, :pad] = 0
    batched = tiny.generate(ids, attention_mask=mask, pixel_values=pixels, max_new_tokens=5, do_sample=False)
    assert batched.shape == (2, 5)  # only the new tokens
    assert torch.equal(batched[0], tiny.generate(_ids(short), pixel_values=pixels[:1], max_new_tokens=5)[0])
    assert torch.equal(batched[1], tiny.generate(_ids(long), pixel_values=pixels[1:], max_new_tokens=5)[0])


# --- BLOOM ---------------------------------------------------------------------------------------


def test_bloom_keeps_embedding_layernorm_keys(bloom):
    norm = bloom.language_model.transformer.word_embeddings_layernorm
    assert isinstance(norm, PreAppliedLayerNorm)
    keys = set(bloom.state_dict())
    assert {
        "language_model.transformer.word_embeddings.weight",
        "language_model.transformer.word_embeddings_layernorm.weight",
        "language_model.transformer.word_embeddings_layernorm.bias",
    } <= keys
    assert not bloom._lm_uses_positions  # ALiBi: no position ids


@torch.no_grad()
def test_bloom_visual_tokens_bypass_embedding_layernorm(bloom):
    ids = _ids([1, 450, *IMG, 13, 999])
    pixels = _pixels(1)
    embeds = bloom.embed_inputs(ids, pixel_values=pixels)
    tr = bloom.language_model.transformer
    norm = tr.word_embeddings_layernorm
    manual_text = F.layer_norm(tr.word_embeddings(ids.clamp(min=0)), (64,), norm.weight, norm.bias, norm.eps)
    text = ids >= 0
    torch.testing.assert_close(embeds[text], manual_text[text], rtol=0, atol=1e-6)
    features = bloom.get_image_features(pixels)
    assert features.shape == (1, NV, 64)
    torch.testing.assert_close(embeds[0, 2 : 2 + NV], features[0], rtol=0, atol=0)  # not normalised
    logits = bloom(input_ids=ids, pixel_values=pixels).logits
    assert logits.shape == (1, ids.shape[1], 1000) and torch.isfinite(logits).all()


@torch.no_grad()
def test_bloom_text_only_matches_plain_bloom(bloom):
    """The LayerNorm runs exactly once on text: the owl's BLOOM equals a stock BLOOM with the same weights."""
    plain = AutoModelForCausalLM.from_config(bloom.config.build_text_config()).eval()
    plain.load_state_dict(bloom.language_model.state_dict())
    ids = _ids([1, 450, 13, 999, 5, 77], [3, 3, 1, 42, 43, 44])
    mask = torch.ones_like(ids)
    mask[1, :2] = 0
    ours = bloom(input_ids=ids, attention_mask=mask).logits
    theirs = plain(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(ours[0], theirs[0], rtol=0, atol=1e-5)
    torch.testing.assert_close(ours[1, 2:], theirs[1, 2:], rtol=0, atol=1e-5)


# --- configs -------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_config_round_trip(name, tmp_path):
    config = get_preset(name)
    data = config.to_dict()
    assert data["model_type"] == "mplug-owl"
    assert OwlConfig.from_dict(data) == config
    assert OwlConfig.from_dict(json.loads(json.dumps(data))) == config
    config.to_json_file(tmp_path / "config.json")
    assert OwlConfig.from_json_file(tmp_path / "config.json") == config


def test_presets_are_fresh_copies():
    a = get_preset("tiny")
    a.text_config["hidden_size"] = 1
    a.vision.hidden_size = 1
    assert get_preset("tiny").text_config["hidden_size"] == 64
    assert get_preset("tiny").vision.hidden_size == 64


def test_upstream_config_json_gives_tiny_shapes():
    data = json.loads((CHECKPOINT / "config.json").read_text())
    config = OwlConfig.from_dict(data)
    tiny = get_preset("tiny")
    assert config.vision == tiny.vision
    assert config.abstractor == tiny.abstractor
    assert config.num_query_tokens == 64 and config.num_visual_tokens == 65
    assert not config.video
    # transformers 4.28's generic fields are dropped; the architecture stays.
    assert "id2label" not in config.text_config and "transformers_version" not in config.text_config
    for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size"):
        assert config.text_config[key] == tiny.text_config[key], key
    with torch.device("meta"):
        ours = OwlForConditionalGeneration(config).state_dict()
        theirs = OwlForConditionalGeneration(tiny).state_dict()
    assert {k: v.shape for k, v in ours.items()} == {k: v.shape for k, v in theirs.items()}


def test_config_errors(tmp_path):
    good = get_preset("tiny").to_dict()
    with pytest.raises(ValueError, match="unknown model_type 'llava'"):
        OwlConfig.from_dict({**good, "model_type": "llava"})
    with pytest.raises(ValueError, match="unknown model_type None"):
        OwlConfig.from_dict({k: v for k, v in good.items() if k != "model_type"})
    with pytest.raises(ValueError, match="visual_abstractor_config"):
        OwlConfig.from_dict({k: v for k, v in good.items() if k != "visual_abstractor_config"})
    text = {k: v for k, v in good["text_config"].items() if k != "model_type"}
    with pytest.raises(ValueError, match="text_config has no 'model_type'"):
        OwlConfig.from_dict({**good, "text_config": text})
    bad = tmp_path / "config.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="config.json: not valid JSON"):
        OwlConfig.from_json_file(bad)
    bad.write_text(json.dumps({**good, "model_type": "llama"}))
    with pytest.raises(ValueError, match=r"config\.json: unknown model_type 'llama'"):
        OwlConfig.from_json_file(bad)


def test_unknown_preset_lists_presets():
    with pytest.raises(KeyError) as info:
        get_preset("nope")
    message = str(info.value)
    assert "'nope'" in message
    for name in PRESETS:
        assert name in message


def _count(config: OwlConfig) -> int:
    with torch.device("meta"):
        model = OwlForConditionalGeneration(config)
    return sum(p.numel() for p in model.parameters())


def test_7b_parameter_counts():
    """docs/upstream.md, Parameter counts: 7,123,068,928 parameters; Video checkpoint: 29.56 M temporal ones more."""
    image = _count(get_preset("mplug-owl-7b"))
    assert image == 7_123_068_928
    video = _count(get_preset("mplug-owl-7b-video"))
    # 24 adapters (ln 2·1024, down 512·1024+512, conv 512·3+512, up 1024·512+1024), temporal queries 64·1024,
    # temporal_visual_fc 4096·1024+4096.
    adapters = 24 * (2 * 1024 + 512 * 1024 + 512 + 512 * 3 + 512 + 1024 * 512 + 1024)
    assert video - image == adapters + 64 * 1024 + 4096 * 1024 + 4096 == 29_564_928


def test_7b_preset_matches_spec_shapes():
    config = get_preset("mplug-owl-7b")
    assert dataclasses.asdict(config.vision)["hidden_size"] == 1024 and config.vision.num_positions == 257
    assert config.abstractor.intermediate_size == 2816
    with torch.device("meta"):
        sd = OwlForConditionalGeneration(config).state_dict()
    assert sd["abstractor.encoder.layers.0.crossattention.output.mlp.w1.weight"].shape == (2816, 1024)
    assert sd["vision_model.encoder.layers.0.self_attn.query_key_value.weight"].shape == (3072, 1024)
    assert sd["vision_model.embeddings.patch_embed.weight"].shape == (1024, 3, 14, 14)
    assert "vision_model.embeddings.patch_embed.bias" not in sd
    assert sd["abstractor.vit_eos"].shape == (1, 1, 4096)
    assert sd["language_model.lm_head.weight"].shape == (32000, 4096)
