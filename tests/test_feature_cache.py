"""The frozen-encoder feature cache (`openowl.train.features`): losses and a short training run equal to encoding on
the fly (eval transform, float32), the refusals (a trained ViT, augmented images), resumable and sharded builds, a
cache of another ViT or transform refused, undecodable images skipped and counted, and `openowl data
cache-features` end to end."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest
import torch
import yaml
from conftest import CHECKPOINT, IMAGES

from openowl import OwlForConditionalGeneration
from openowl.cli import main
from openowl.constants import IGNORE_INDEX
from openowl.prompts import DEFAULT_SYSTEM, parse_prompt
from openowl.train import features
from openowl.train.config import load_config
from openowl.train.data import Sample, TrainDataset, collate, model_inputs
from openowl.train.features import FeatureCache, build_feature_cache, check_cacheable, image_key
from openowl.train.policy import POLICIES
from openowl.train.recipe import TrainRecipe, run_feature_cache, run_settings
from openowl.train.transforms import eval_transform

PICTURES = [IMAGES / f"image{i}.jpg" for i in range(3)]


def _samples(images: list[Path]) -> list[Sample]:
    """One image sample per image, then a text-only one."""
    out = [
        Sample(f"img{i}", parse_prompt(f"{DEFAULT_SYSTEM}\nHuman: <image>\nHuman: What is it?\nAI: Number {i}."), [p])
        for i, p in enumerate(images)
    ]
    return out + [Sample("txt", parse_prompt(f"{DEFAULT_SYSTEM}\nHuman: Name a bird.\nAI: An owl."))]


def _write_data(folder: Path, n: int = 12) -> Path:
    """Upstream-format jsonl: samples with one image, and text-only ones (a batch of these takes the dummy path)."""
    lines = []
    for i in range(n):
        if i % 4 == 3:
            lines.append({"text": f"{DEFAULT_SYSTEM}\nHuman: Name a bird.\nAI: An owl number {i}."})
        else:
            text = f"{DEFAULT_SYSTEM}\nHuman: <image>\nHuman: What is in the picture?\nAI: A photo, number {i}."
            lines.append({"text": text, "image": [str(PICTURES[i % 3])]})
    path = folder / "train.jsonl"
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    return path


def _overrides(tmp_path: Path, **more) -> list[str]:
    settings = {
        "model.path": str(CHECKPOINT), "data.train": str(_write_data(tmp_path)), "data.max_length": 160,
        "data.augment": False, "policy": "stage2-abstractor", "optim.lr": 1e-3, "optim.warmup_steps": 0,
        "train.micro_batch_size": 2, "train.grad_accum": 2, "train.max_steps": 3, "train.seed": 5,
        "train.output_dir": str(tmp_path / "run"),
    }  # fmt: skip
    settings.update(more)
    return [f"{k}={v}" for k, v in settings.items()]


def _contents(folder: Path) -> dict[str, torch.Tensor]:
    cache = FeatureCache(folder)
    return {key: cache.get(key) for key in cache._shard_of()}


class CountingViT:
    """Wraps a model's ViT forward to count the images it encodes."""

    def __init__(self, model, monkeypatch):
        self.images = 0
        forward = model.vision_model.forward

        def counting(pixel_values, *args, **kwargs):
            self.images += pixel_values.shape[0]
            return forward(pixel_values, *args, **kwargs)

        monkeypatch.setattr(model.vision_model, "forward", counting)


# --- (a) the same losses and the same training as encoding on the fly ------------------------------------------


def test_cached_features_give_the_loss_of_encoding_on_the_fly(tmp_path, model, processor):
    summary = build_feature_cache(model, processor, [p.read_bytes() for p in PICTURES], tmp_path / "cache")
    assert summary["cached"] == 3 and summary["complete"]
    cache = FeatureCache(tmp_path / "cache", model, processor)
    key = image_key(PICTURES[1].read_bytes())
    with torch.no_grad():
        direct = model.vision_model(eval_transform(PICTURES[1], processor.image_size)[None])[0]
    assert cache.get(key).dtype == torch.float32 and cache.get(key).shape == cache.shape == direct.shape
    torch.testing.assert_close(cache.get(key), direct)

    samples = _samples([PICTURES[0], PICTURES[1], PICTURES[0]])
    on_the_fly = TrainDataset(samples, processor, 160, train=True, augment=False)
    cached = TrainDataset(samples, processor, 160, train=True, augment=False, features=cache)
    assert len(cached) == len(on_the_fly) == 4
    item = cached[0]
    assert item["pixel_values"] is None and item["vision_tokens"].shape == (1, *cache.shape)
    pad = processor.tokenizer.pad_token_id
    for rows in ([0, 1, 2, 3], [3], [2, 0]):  # images and text mixed; text only
        fly, from_cache = (collate([d[i] for i in rows], pad) for d in (on_the_fly, cached))
        assert fly["num_images"] == from_cache["num_images"]
        with torch.no_grad():
            loss = model(**model_inputs(fly)).loss
            torch.testing.assert_close(model(**model_inputs(from_cache)).loss, loss)
    with pytest.raises(ValueError, match="not both"):
        model.embed_inputs(fly["input_ids"], pixel_values=fly["pixel_values"], vision_tokens=cached[0]["vision_tokens"])
    reopened = pickle.loads(pickle.dumps(cache))  # as a DataLoader worker gets it
    assert torch.equal(reopened.get(key), cache.get(key))


def test_training_from_the_cache_ends_with_the_weights_of_training_on_pixels(tmp_path):
    """stage2-abstractor (the abstractor trained in full on the cached ViT outputs, LoRA on the LLM with its
    dropout), text-only batches among them: the same losses and the same final weights as pixels on the fly."""
    runs = {}
    for name in ("pixels", "cache"):
        (tmp_path / name).mkdir()
        more = {"data.features": str(tmp_path / "cache" / "features")} if name == "cache" else {}
        cfg = load_config(None, _overrides(tmp_path / name, **more))
        if name == "cache":
            assert run_feature_cache(cfg)["complete"]
        recipe = TrainRecipe(cfg)
        recipe.setup()
        assert (recipe.dataset.features is None) == (name == "pixels") and len(recipe.dataset) == 12
        micro = [part.tolist() for batch in recipe.sampler.batches(0) for part in torch.tensor(batch).tensor_split(2)]
        assert not any(recipe.dataset.samples[i].images for i in micro[5])  # the last step's: the dummy image path
        recipe.train()
        losses = [json.loads(line)["loss"] for line in (tmp_path / name / "run" / "metrics.jsonl").open()]
        runs[name] = losses, {k: v.detach().clone() for k, v in recipe.trainable.items()}
        settings = run_settings(cfg, 1)
    assert settings["data.features"].startswith("sha256:")  # by content: a moved cache still resumes
    torch.testing.assert_close(torch.tensor(runs["cache"][0]), torch.tensor(runs["pixels"][0]))
    assert any(k.startswith("abstractor.") for k in runs["cache"][1])
    for key, value in runs["pixels"][1].items():
        torch.testing.assert_close(runs["cache"][1][key], value, msg=key)


# --- (b) refused where a cache would be wrong --------------------------------------------------------------------


def test_a_trained_vit_or_augmented_images_are_refused_saying_why(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match=r"trains it \(vision: full\)"):
        check_cacheable(POLICIES["stage1"], augment=False)
    with pytest.raises(ValueError, match="random crop and flip every epoch.*data.augment=false"):
        check_cacheable(POLICIES["stage2"], augment=True)
    check_cacheable(POLICIES["stage2"], augment=False)
    monkeypatch.setattr("openowl.train.recipe.load_model", lambda m: pytest.fail("the model loaded"))
    for change in ({"data.augment": True}, {"policy": "stage1"}):
        args = _overrides(tmp_path, **{"data.features": str(tmp_path / "f"), **change})
        with pytest.raises(ValueError, match="data.features: a feature cache needs"):
            load_config(None, args)
    cfg = load_config(None, _overrides(tmp_path, **{"data.features": str(tmp_path / "f")}))
    cfg.data.augment = True  # a config built in code is refused by the job and the recipe too
    with pytest.raises(ValueError, match="data.augment=false"):
        run_feature_cache(cfg)
    cfg.data.augment, cfg.data.features = False, None
    with pytest.raises(ValueError, match="data.features is not set"):
        run_feature_cache(cfg)


# --- (c) resumable and sharded -----------------------------------------------------------------------------------


def _images() -> list[tuple[str, bytes]]:
    """Five distinct images (three files, two of them re-encoded) and a duplicate."""
    from io import BytesIO

    from PIL import Image

    out = [(p.name, p.read_bytes()) for p in PICTURES]
    for i, quality in ((0, 60), (1, 50)):
        buffer = BytesIO()
        Image.open(PICTURES[i]).save(buffer, format="JPEG", quality=quality)
        out.append((f"requality{i}", buffer.getvalue()))
    return [*out[:2], out[0], *out[2:]]  # image0 twice


def test_a_killed_or_damaged_build_resumes_without_recomputing_complete_shards(tmp_path, model, processor,
                                                                               monkeypatch):  # fmt: skip
    reference = tmp_path / "reference"
    summary = build_feature_cache(model, processor, _images(), reference, shard_size=2, batch_size=3)
    assert summary["images"] == 5 and summary["duplicates"] == 1 and summary["shards"] == 3
    expected = _contents(reference)
    assert len(expected) == 5

    def killed_after(n):
        for i, item in enumerate(_images()):
            if i == n:
                raise KeyboardInterrupt  # the process dies after shard 0, in the middle of shard 1's group
            yield item

    folder = tmp_path / "cache"
    with pytest.raises(KeyboardInterrupt):
        build_feature_cache(model, processor, killed_after(4), folder, shard_size=2)
    assert sorted(p.name for p in folder.iterdir()) == ["features-00000.safetensors"]  # whole shards only
    first = (folder / "features-00000.safetensors").stat().st_mtime_ns
    (folder / ".features-00001.safetensors.x1.tmp").write_bytes(b"half a shard")  # left by a SIGKILL mid-write
    (folder / "features-00002.safetensors").write_bytes(b"damaged")
    vit = CountingViT(model, monkeypatch)
    summary = build_feature_cache(model, processor, _images(), folder, shard_size=2)
    assert vit.images == 3 and summary["cached"] == 3 and summary["already_cached"] == 2 and summary["complete"]
    assert (folder / "features-00000.safetensors").stat().st_mtime_ns == first  # not rewritten
    assert not list(folder.glob(".*.tmp"))
    got = _contents(folder)
    assert got.keys() == expected.keys() and all(torch.equal(got[k], expected[k]) for k in expected)

    (folder / "features-00002.safetensors").unlink()  # the last shard lost
    summary = build_feature_cache(model, processor, _images(), folder, shard_size=2)
    assert vit.images == 4 and summary["cached"] == 1 and summary["already_cached"] == 4
    assert all(torch.equal(_contents(folder)[k], expected[k]) for k in expected)
    vit.images = 0
    build_feature_cache(model, processor, _images(), folder, shard_size=2)
    assert vit.images == 0  # complete: the ViT never runs


def test_processes_share_the_shards_and_the_last_one_writes_the_manifest(tmp_path, model, processor):
    build_feature_cache(model, processor, _images(), tmp_path / "one", shard_size=2)
    folder = tmp_path / "two"
    first = build_feature_cache(model, processor, _images(), folder, shard_size=2, rank=0, world=2)
    assert not first["complete"] and not (folder / "cache.json").exists()
    assert first["cached"] == 3 and first["other_processes"] == 2  # shards 0 and 2
    second = build_feature_cache(model, processor, _images(), folder, shard_size=2, rank=1, world=2)
    assert second["complete"] and second["cached"] == 2 and second["already_cached"] == 3
    one, two = _contents(tmp_path / "one"), _contents(folder)
    assert one.keys() == two.keys() and all(torch.equal(one[k], two[k]) for k in one)
    assert (folder / "cache.json").read_text() == (tmp_path / "one" / "cache.json").read_text()


# --- (d) another ViT or another transform ------------------------------------------------------------------------


def test_a_cache_of_another_vit_or_transform_is_refused(tmp_path, model, processor, monkeypatch):
    folder = tmp_path / "cache"
    build_feature_cache(model, processor, [p.read_bytes() for p in PICTURES], folder)
    other = OwlForConditionalGeneration.from_pretrained(CHECKPOINT)
    with torch.no_grad():
        other.vision_model.embeddings.patch_embed.weight[0, 0, 0, 0] += 0.5
    with pytest.raises(ValueError, match=r"the ViT's weights differ\): vision_model: cache 'sha256:"):
        FeatureCache(folder, other, processor)
    monkeypatch.setattr(processor, "image_mean", (0.5, 0.5, 0.5))
    with pytest.raises(ValueError, match=r"image transform differs\): image_mean: cache \[0.48"):
        FeatureCache(folder, model, processor)
    monkeypatch.undo()
    vit = CountingViT(other, monkeypatch)  # rebuilt by the other ViT: every shard is computed again
    build_feature_cache(other, processor, [p.read_bytes() for p in PICTURES], folder)
    assert vit.images == 3
    FeatureCache(folder, other, processor)
    with pytest.raises(FileNotFoundError, match="build has not finished"):
        FeatureCache(tmp_path / "nothing")


# --- (e) undecodable images and cache misses ---------------------------------------------------------------------


def test_undecodable_images_are_skipped_and_counted_and_misses_skip_the_sample(tmp_path, model, processor):
    truncated = tmp_path / "truncated.jpg"
    truncated.write_bytes(PICTURES[0].read_bytes()[:5000])  # a valid header, cut data
    images = [("good.jpg", PICTURES[1].read_bytes()), ("cut.jpg", truncated.read_bytes()), b"not an image at all"]
    summary = build_feature_cache(model, processor, images, tmp_path / "cache", shard_size=2)
    assert summary["cached"] == 1 and summary["skipped"] == 2 and summary["complete"]
    assert summary["skipped_names"][0].startswith("cut.jpg (") and summary["skipped_names"][1].startswith("image #2")
    assert "2 skipped (cut.jpg" in features.describe(summary, tmp_path / "cache")
    manifest = json.loads((tmp_path / "cache" / "cache.json").read_text())
    assert manifest["images"] == 1 and manifest["skipped"] == 2 and len(manifest["shards"]) == 2
    again = build_feature_cache(model, processor, images, tmp_path / "cache", shard_size=2)
    assert again["skipped"] == 2 and again["already_cached"] == 1  # counted again from the shards' metadata

    cache = FeatureCache(tmp_path / "cache", model, processor)
    samples = _samples([truncated, PICTURES[2], PICTURES[1]])  # a bad image, an image not in the cache, a good one
    dataset = TrainDataset(samples, processor, 160, augment=False, features=cache)
    items = [dataset[i] for i in range(4)]
    for item in items[:2]:
        assert (item["labels"] == IGNORE_INDEX).all() and item["vision_tokens"].abs().sum() == 0
        assert item["vision_tokens"].shape == (1, *cache.shape)
    assert (items[2]["labels"] != IGNORE_INDEX).any()
    assert sorted(dataset.failed) == ["img0", "img1"] and "is not in the feature cache" in dataset.failed["img1"]
    assert str(PICTURES[2]) in dataset.failed["img1"]
    batch = collate(items, processor.tokenizer.pad_token_id)
    assert batch["vision_tokens"].shape == (3, *cache.shape) and batch["pixel_values"] is None
    with torch.no_grad():
        assert torch.isfinite(model(**model_inputs(batch)).loss)
    with pytest.raises(KeyError, match="image a.jpg"):
        cache.get("0" * 64, name="a.jpg")


# --- (f) the command ---------------------------------------------------------------------------------------------


def test_the_cache_features_command_end_to_end(tmp_path, capsys):
    config = tmp_path / "config.yaml"
    sections = {"model": {"path": str(CHECKPOINT)}, "policy": "stage2",
                "data": {"train": str(_write_data(tmp_path)), "augment": False}}  # fmt: skip
    config.write_text(yaml.safe_dump(sections))
    features_dir = tmp_path / "features"
    command = ["data", "cache-features", str(config), f"data.features={features_dir}"]
    assert main(command) == 0
    line = capsys.readouterr().out.strip()
    assert line.startswith(f"feature cache {features_dir}: 3 images (6 duplicates), 3 cached now")
    assert line.endswith("complete")
    assert main(command) == 0
    assert "0 cached now, 3 already cached" in capsys.readouterr().out
    assert FeatureCache(features_dir, OwlForConditionalGeneration.from_pretrained(CHECKPOINT))
    assert main(["data", "cache-features", str(config)]) == 2
    assert "data.features is not set" in capsys.readouterr().err
    assert main([*command, "policy=stage1"]) == 2
    assert "needs a frozen ViT" in capsys.readouterr().err
