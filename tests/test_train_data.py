"""Training data: the readers, the image transforms, the dataset, collate and the length-grouped sampler."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import pytest
import torch
from conftest import IMAGES
from PIL import Image

from openowl.constants import IGNORE_INDEX
from openowl.prompts import DEFAULT_SYSTEM, build_prompt, parse_prompt, render_conversation
from openowl.train.data import (
    LengthGroupedSampler,
    Sample,
    TrainDataset,
    caption_messages,
    collate,
    llava_messages,
    model_inputs,
    read_samples,
    tokenize_conversation,
)
from openowl.train.transforms import (
    eval_transform,
    make_generator,
    random_resized_crop_box,
    sample_train_params,
    train_transform,
)

IMAGE0, IMAGE1, IMAGE2 = (IMAGES / f"image{i}.jpg" for i in range(3))


def _train_case(manifest, name):
    return next(c for c in manifest["train_cases"] if c["name"] == name)


def _write_jsonl(path: Path, records) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


def _convo(*lines: str) -> str:
    return "\n".join([DEFAULT_SYSTEM, *lines])


def _text(messages) -> str:
    """Messages as upstream's conversation text."""
    return build_prompt(messages, add_generation_prompt=False)


# --- readers -------------------------------------------------------------------------------------


def test_upstream_jsonl(tmp_path):
    (tmp_path / "img").mkdir()
    text = _convo("Human: <image>", "Human: Hi", "AI: Hello")
    path = _write_jsonl(
        tmp_path / "train.jsonl",
        [
            {"text": text, "image": ["img/a.jpg"], "task_type": "llava_sft"},
            "",
            {"text": _convo("Human: Name a bird.", "AI: Owl."), "task_type": "sharegpt_chat_sft"},
            {"id": "x7", "text": _convo("Human: <image>", "Human: <image>", "AI: Two."), "image": ["a.jpg", "b.jpg"]},
        ],
    )
    samples = read_samples(path)
    assert [s.id for s in samples] == ["1", "3", "x7"]
    assert samples[0] == Sample("1", parse_prompt(text), [tmp_path / "img" / "a.jpg"])
    assert samples[1].images == []
    assert samples[2].images == [tmp_path / "a.jpg", tmp_path / "b.jpg"]
    rooted = read_samples(path, image_root="/data", format="upstream")
    assert rooted[0].images == [Path("/data/img/a.jpg")]


def test_llava_conversion_exact():
    conversations = [
        {"from": "human", "value": "<image>\nWhat is in the picture?"},
        {"from": "gpt", "value": "A small owl sitting on a branch."},
        {"from": "human", "value": "What colour is it?"},
        {"from": "gpt", "value": "Brown and white."},
    ]
    assert _text(llava_messages(conversations)) == (
        f"{DEFAULT_SYSTEM}\nHuman: <image>\nHuman: What is in the picture?\nAI: A small owl sitting on a branch.\n"
        "Human: What colour is it?\nAI: Brown and white."
    )
    tag_last = [{"from": "human", "value": "Describe it.\n<image>"}, {"from": "gpt", "value": "An owl."}]
    assert _text(llava_messages(tag_last)) == _convo("Human: <image>", "Human: Describe it.", "AI: An owl.")
    two = [{"from": "human", "value": "<image>\n<image>"}, {"from": "gpt", "value": "Two owls."}]
    assert _text(llava_messages(two)) == _convo("Human: <image>", "Human: <image>", "AI: Two owls.")


def test_llava_files_json_and_jsonl(tmp_path, manifest):
    record = {
        "id": "000001",
        "image": "coco/owl.jpg",
        "conversations": [
            {"from": "human", "value": "<image>\nWhat is in the picture?"},
            {"from": "gpt", "value": "A small owl sitting on a branch."},
            {"from": "human", "value": "What colour is it?"},
            {"from": "gpt", "value": "Brown and white."},
        ],
    }
    text_only = {"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}]}
    (tmp_path / "llava.json").write_text(json.dumps([record, text_only], indent=2))
    samples = read_samples(tmp_path / "llava.json", image_root=tmp_path / "images")
    assert samples[0] == Sample(
        "000001", parse_prompt(_train_case(manifest, "train_image")["text"]), [tmp_path / "images/coco/owl.jpg"]
    )
    assert samples[1] == Sample("1", parse_prompt(_convo("Human: Hi", "AI: Hello")), [])
    jsonl = read_samples(_write_jsonl(tmp_path / "llava.jsonl", [record, text_only]))
    assert [s.id for s in jsonl] == ["000001", "2"] and jsonl[0].messages == samples[0].messages


def test_caption_pairs(tmp_path):
    path = _write_jsonl(tmp_path / "captions.jsonl", [{"image": "a.jpg", "caption": "An owl on a branch. "}])
    (sample,) = read_samples(path)
    text = f"{DEFAULT_SYSTEM}\nHuman: <image>\nAI: An owl on a branch."
    assert sample == Sample("1", parse_prompt(text), [tmp_path / "a.jpg"])
    assert _text(caption_messages("An owl.")) == _convo("Human: <image>", "AI: An owl.")


@pytest.mark.parametrize(
    "text",
    [
        _convo("Human: <image>", "Human: What is it?", "AI: An owl.", "Human: And?", "AI: Brown."),
        "A system line of our own\nHuman: two\nlines\nAI: ",
        "Human: <image>",  # no system line: the whole text is one
    ],
)
def test_upstream_text_parses_into_messages_and_renders_back(text):
    messages = parse_prompt(text)
    assert _text(messages) == text
    assert messages[0]["role"] == ("user" if text.startswith(DEFAULT_SYSTEM) else "system")
    pieces = render_conversation(messages)
    assert "".join(piece for piece, _ in pieces) == text
    assert [piece for piece, answer in pieces if answer] == [
        line[len("AI: ") :] for line in text.split("\n") if line.startswith("AI: ") and line != "AI: "
    ]


@pytest.mark.parametrize(
    ("records", "format", "match"),
    [
        (['{"text": "ok"}', "{not json"], "auto", r"bad\.jsonl:2: not valid JSON"),
        ([{"text": "a"}, {"text": 3}], "auto", r"bad\.jsonl:2: 'text' must be a string"),
        ([{"text": "a"}, ["x"]], "auto", r"bad\.jsonl:2: expected a JSON object"),
        ([{"text": "Human: <image>"}], "auto", r"bad\.jsonl:1: the text has 1 <image> tag\(s\) but 0 image"),
        ([{"caption": "x"}], "auto", r"bad\.jsonl:1: no 'image' field"),
        ([{"conversations": [{"from": "bot", "value": "x"}]}], "auto", r"bad\.jsonl:1: turn 0 has an unknown 'from'"),
        ([{"question": "x"}], "auto", r"bad\.jsonl:1: can't tell the format"),
        ([{"text": "a"}], "llava", r"bad\.jsonl:1: 'conversations' must be a non-empty list"),
        ([{"text": "a"}], "sharegpt", r"unknown format"),
    ],
)
def test_malformed_records(tmp_path, records, format, match):
    path = _write_jsonl(tmp_path / "bad.jsonl", records)
    with pytest.raises(ValueError, match=match):
        read_samples(path, format=format)


# --- transforms ----------------------------------------------------------------------------------


def test_eval_transform_is_the_processor(processor):
    for image in (IMAGE0, IMAGE1):
        expected = processor.preprocess_images([image])[0]
        assert torch.equal(
            eval_transform(image, processor.image_size, processor.image_mean, processor.image_std), expected
        )


def test_train_transform_params_vary_and_stay_in_range():
    width, height = Image.open(IMAGE0).size
    boxes, flips = set(), set()
    for seed in range(200):
        (left, top, right, bottom), flip = sample_train_params(width, height, make_generator(seed))
        w, h = right - left, bottom - top
        assert left >= 0 and top >= 0 and right <= width and bottom <= height
        assert 0.5 - 0.01 <= w * h / (width * height) <= 1.0 + 0.01
        assert 3 / 4 - 0.02 <= w / h <= 4 / 3 + 0.02
        boxes.add((left, top, right, bottom))
        flips.add(flip)
    assert len(boxes) > 150 and flips == {True, False}
    # An image too elongated for any try falls back to the largest centre crop within the ratio range.
    assert random_resized_crop_box(1000, 10, make_generator(0)) == (493, 0, 506, 10)


def test_train_transform_applies_its_params(processor):
    size = processor.image_size
    for seed in range(6):
        out = train_transform(IMAGE0, size, make_generator(seed), processor.image_mean, processor.image_std)
        assert out.shape == (3, size, size) and out.dtype == torch.float32
        image = Image.open(IMAGE0).convert("RGB")
        box, flip = sample_train_params(image.width, image.height, make_generator(seed))
        manual = image.crop(box).resize((size, size), Image.BICUBIC)
        if flip:
            manual = manual.transpose(Image.FLIP_LEFT_RIGHT)
        assert torch.equal(out, eval_transform(manual, size, processor.image_mean, processor.image_std))


# --- the dataset ---------------------------------------------------------------------------------


def _samples(manifest) -> list[Sample]:
    image, text = _train_case(manifest, "train_image"), _train_case(manifest, "train_text")
    return [
        Sample("img", parse_prompt(image["text"]), [IMAGE0]),
        Sample("txt", parse_prompt(text["text"]), []),
        Sample(
            "two",
            parse_prompt(_convo("Human: <image>", "Human: <image>", "Human: Compare.", "AI: Same")),
            [str(IMAGE1), IMAGE2],
        ),
    ]


def test_upstream_sample_matches_fixture_tokens(tmp_path, manifest, expected, processor):
    case = _train_case(manifest, "train_image")
    path = _write_jsonl(
        tmp_path / "train.jsonl", [{"text": case["text"], "image": ["image0.jpg"], "task_type": "llava_sft"}]
    )
    samples = read_samples(path, image_root=IMAGES)
    dataset = TrainDataset(samples, processor, case["max_length"], train=False)
    item = dataset[0]
    reference = tokenize_conversation(parse_prompt(case["text"]), processor.tokenizer, case["max_length"])
    n = len(item["input_ids"])
    assert n == reference.length == dataset.lengths[0] < case["max_length"] + 1
    assert torch.equal(item["input_ids"], expected["train_image.input_ids"][0][:n])
    assert (expected["train_image.input_ids"][0][n:] == processor.tokenizer.pad_token_id).all()
    assert torch.equal(item["labels"], reference.labels[:n])
    assert (item["labels"] != IGNORE_INDEX).sum() == reference.num_supervised > 0
    assert torch.equal(item["pixel_values"], expected["train_image.pixel_values"])
    assert item["id"] == "1"


def test_collate_and_forward_loss(manifest, expected, processor, model):
    dataset = TrainDataset(_samples(manifest)[:2], processor, 400, train=False)
    batch = collate([dataset[0], dataset[1]], processor.tokenizer.pad_token_id)
    lengths = dataset.lengths
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape == (2, max(lengths))
    short = 1 if lengths[1] < lengths[0] else 0
    n = lengths[short]
    assert torch.equal(batch["attention_mask"].sum(1), torch.tensor(lengths))
    assert (batch["input_ids"][short, n:] == processor.tokenizer.pad_token_id).all()
    assert (batch["labels"][short, n:] == IGNORE_INDEX).all()
    assert batch["pixel_values"].shape == (1, 3, processor.image_size, processor.image_size)
    assert batch["num_images"] == [1, 0] and batch["ids"] == ["img", "txt"]
    with torch.no_grad():
        loss = model(**model_inputs(batch)).loss
    # Padding changes nothing: the batch loss is the token-weighted mean of the fixture's per-sample losses.
    counts = [(dataset[i]["labels"][1:] >= 0).sum().item() for i in range(2)]
    losses = [expected["train_image.loss"].item(), expected["train_text.loss"].item()]
    reference = sum(c * x for c, x in zip(counts, losses, strict=True)) / sum(counts)
    assert math.isfinite(loss.item())
    assert loss.item() == pytest.approx(reference, rel=1e-4)


def test_mixed_batch_with_train_transform_and_text_only_batch(manifest, processor, model):
    dataset = TrainDataset(_samples(manifest), processor, 400, train=True, seed=3)
    batch = collate([dataset[i] for i in range(3)], processor.tokenizer.pad_token_id)
    assert batch["num_images"] == [1, 0, 2]
    assert batch["pixel_values"].shape == (3, 3, processor.image_size, processor.image_size)
    assert batch["pixel_values"].dtype == torch.float32
    with torch.no_grad():
        assert torch.isfinite(model(**model_inputs(batch)).loss)
    text_only = collate([dataset[1]], processor.tokenizer.pad_token_id)
    assert text_only["pixel_values"] is None and text_only["num_images"] == [0]
    with torch.no_grad():
        assert torch.isfinite(model(**model_inputs(text_only)).loss)


def test_train_pixels_deterministic_per_seed_epoch_index(manifest, processor):
    again = Sample("img-again", parse_prompt(_train_case(manifest, "train_image")["text"]), [IMAGE0])
    samples = _samples(manifest) + [again]
    dataset = TrainDataset(samples, processor, 400, train=True, seed=7)
    first = dataset[0]["pixel_values"]
    assert first.shape == (1, 3, processor.image_size, processor.image_size) and first.dtype == torch.float32
    assert torch.equal(dataset[0]["pixel_values"], first)
    assert torch.equal(TrainDataset(samples, processor, 400, seed=7)[0]["pixel_values"], first)
    assert not torch.equal(dataset[3]["pixel_values"], first)  # same image, another index
    assert not torch.equal(TrainDataset(samples, processor, 400, seed=8)[0]["pixel_values"], first)
    dataset.set_epoch(1)
    epoch1 = dataset[0]["pixel_values"]
    assert not torch.equal(epoch1, first)
    dataset.set_epoch(0)
    assert torch.equal(dataset[0]["pixel_values"], first)
    two = dataset[2]["pixel_values"]
    assert two.shape[0] == 2 and not torch.equal(two[0], two[1])
    assert not torch.equal(first[0], processor.preprocess_images([IMAGE0])[0])


def test_unsupervised_samples_dropped_with_one_warning(manifest, processor, caplog):
    long_question = "Please describe every feather of this owl in great detail. " * 8
    samples = _samples(manifest)[1:2] + [
        Sample(f"long{i}", parse_prompt(_convo(f"Human: {long_question}", "AI: It is brown.")), []) for i in range(7)
    ]
    with caplog.at_level(logging.WARNING, logger="openowl.train.data"):
        dataset = TrainDataset(samples, processor, max_length=60)
    assert dataset.ids == ["txt"]
    warnings = [r for r in caplog.records if r.name == "openowl.train.data"]
    assert len(warnings) == 1
    message = warnings[0].getMessage()
    assert "dropped 7 of 8 samples" in message and "'long0'" in message and "and 2 more" in message
    assert [sample_id for sample_id, _ in dataset.skipped] == [f"long{i}" for i in range(7)]
    assert "skipped 7 of 8 samples" in dataset.report()


def test_missing_and_corrupt_images_skipped_and_reported(tmp_path, manifest, processor, caplog):
    corrupt = tmp_path / "corrupt.jpg"
    corrupt.write_bytes(b"this is not a jpeg" * 10)
    missing = tmp_path / "missing.jpg"
    one_image = parse_prompt(_train_case(manifest, "train_image")["text"])
    samples = _samples(manifest) + [
        Sample("gone", one_image, [missing]),
        Sample("broken", one_image, [corrupt]),
        Sample("also-broken", one_image, [corrupt]),
        Sample("tags", one_image, []),
    ]
    with caplog.at_level(logging.WARNING, logger="openowl.train.data"):
        dataset = TrainDataset(samples, processor, 400)
    assert dataset.ids == ["img", "txt", "two"]
    skipped = dict(dataset.skipped)
    assert list(skipped) == ["gone", "broken", "also-broken", "tags"]
    assert skipped["gone"].startswith("missing image") and str(missing) in skipped["gone"]
    assert skipped["broken"].startswith("unreadable image") and str(corrupt) in skipped["broken"]
    assert "1 <image> tag(s) but 0 image(s)" in skipped["tags"]
    report = dataset.report()
    assert report.startswith("skipped 4 of 7 samples")
    assert all(sample_id in report for sample_id in skipped)
    assert len([r for r in caplog.records if r.name == "openowl.train.data"]) == 1
    assert len(dataset) == 3 and [dataset[i]["id"] for i in range(3)] == ["img", "txt", "two"]


def test_truncated_jpeg_caught_by_decode_check_else_skipped_at_load_naming_the_sample(
    tmp_path, manifest, processor, model, caplog
):
    """A truncated JPEG passes "verify"; when it fails to load at batch time the sample is skipped (no supervised
    token, black pixels in its image's place), counted and named, and nothing raises, in every epoch."""
    truncated = tmp_path / "truncated.jpg"
    truncated.write_bytes(IMAGE0.read_bytes()[:5000])  # a valid header: verify() accepts it
    samples = [Sample("cut-file", parse_prompt(_train_case(manifest, "train_image")["text"]), [truncated])]
    samples += _samples(manifest)[1:2]
    decoded = TrainDataset(samples, processor, 400, check_images="decode")
    assert len(decoded) == 1 and decoded.skipped[0][0] == "cut-file" and "truncated" in decoded.skipped[0][1]
    verified = TrainDataset(samples, processor, 400)
    assert len(verified) == 2
    with caplog.at_level(logging.WARNING, logger="openowl.train.data"):
        item = verified[0]
    assert "'cut-file'" in caplog.text and "truncated" in caplog.text
    assert (item["labels"] == IGNORE_INDEX).all() and item["pixel_values"].abs().sum() == 0
    assert item["pixel_values"].shape == (1, 3, processor.image_size, processor.image_size)
    verified.set_epoch(1)
    batch = collate([verified[0], verified[1]], processor.tokenizer.pad_token_id)
    with torch.no_grad():
        assert torch.isfinite(model(**model_inputs(batch)).loss)  # only the text sample's tokens count
    assert [sample_id for sample_id, _ in verified.skipped] == ["cut-file"]  # once, however often it is met
    assert "skipped 1 of 2 samples" in verified.report() and "cut-file" in verified.report()
    summary = verified.summary()
    assert summary["failed_to_load"] == ["cut-file"] and summary["skipped"] == 1 and summary["samples"] == 2
    with pytest.raises(ValueError, match="check_images"):
        TrainDataset(samples, processor, 400, check_images="yes")


def test_a_sample_whose_image_block_truncation_drops_is_skipped_and_counted(processor, caplog):
    """Truncation dropped the image block: the sample would train as text-only on an answer about the image."""
    greeting = "AI: Hello there, what would you like to know about your pictures today?"
    text = _convo("Human: Hi", greeting, "Human: <image>", "Human: What is it?", "AI: An owl.")
    kept = _convo("Human: <image>", "Human: What is it?", "AI: An owl.")
    samples = [Sample("cut", parse_prompt(text), [IMAGE0]), Sample("whole", parse_prompt(kept), [IMAGE0])]
    with caplog.at_level(logging.WARNING, logger="openowl.train.data"):
        dataset = TrainDataset(samples, processor, max_length=125)
    assert dataset.ids == ["whole"]
    assert dataset.skipped == [("cut", "truncation to max_length=125 dropped 1 of its 1 image(s)")]
    assert "skipped 1 of 2 samples" in dataset.report() and "dropped 1 of its 1 image(s)" in dataset.report()
    assert "image block truncation to max_length=125 dropped: 'cut'" in caplog.text


def test_answers_cut_short_by_truncation_are_counted(processor, caplog):
    """An answer partly kept loses its EOS: the sample still trains, and the count is in the warning and report."""
    long_answer = "It is a brown owl sitting on a branch in the forest at night. " * 4
    samples = [Sample("long", parse_prompt(_convo("Human: What is it?", f"AI: {long_answer}")), []),
               Sample("short", parse_prompt(_convo("Human: What is it?", "AI: An owl.")), [])]  # fmt: skip
    with caplog.at_level(logging.WARNING, logger="openowl.train.data"):
        dataset = TrainDataset(samples, processor, max_length=60)
    assert dataset.ids == ["long", "short"] and dataset.answers_cut == 1
    eos = processor.tokenizer.eos_token_id
    long_item, short_item = dataset[0], dataset[1]
    assert long_item["labels"][-1] != eos and short_item["labels"][-1] == eos
    assert "1 answer(s) cut short by truncation (EOS lost)" in dataset.report()
    assert "kept 1 of 2 samples with an answer that truncation to max_length=60 cut short" in caplog.text
    assert dataset.summary()["answers_cut"] == 1


# --- the sampler ---------------------------------------------------------------------------------


def _lengths(n=1000, seed=0) -> list[int]:
    return torch.randint(10, 2000, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def _spread(batches, lengths) -> float:
    return sum(max(lengths[i] for i in b) - min(lengths[i] for i in b) for b in batches) / len(batches)


@pytest.mark.parametrize("drop_last", [False, True])
def test_sampler_covers_every_index_once(drop_last):
    lengths = _lengths(1003)
    sampler = LengthGroupedSampler(lengths, batch_size=8, seed=1, drop_last=drop_last, mega_batch_mult=10)
    for epoch in range(2):
        sampler.set_epoch(epoch)
        batches = list(sampler)
        assert len(batches) == len(sampler) == (125 if drop_last else 126)
        flat = [i for b in batches for i in b]
        assert len(flat) == len(set(flat)) == (1000 if drop_last else 1003)
        assert all(len(b) == 8 for b in batches if len(b) != 3) and sum(len(b) == 3 for b in batches) == (not drop_last)


def test_sampler_groups_by_length_and_is_deterministic():
    lengths = _lengths()
    sampler = LengthGroupedSampler(lengths, batch_size=8, seed=5)
    batches = list(sampler)
    order = torch.randperm(len(lengths), generator=torch.Generator().manual_seed(0)).tolist()
    random_batches = [order[i : i + 8] for i in range(0, len(order), 8)]
    assert _spread(batches, lengths) < 0.1 * _spread(random_batches, lengths)
    assert list(LengthGroupedSampler(lengths, batch_size=8, seed=5)) == batches
    assert list(LengthGroupedSampler(lengths, batch_size=8, seed=6)) != batches
    sampler.set_epoch(1)
    epoch1 = list(sampler)
    assert epoch1 != batches and sorted(map(tuple, epoch1)) != sorted(map(tuple, batches))
    sampler.set_epoch(0)
    assert list(sampler) == batches


def test_sampler_resumes_mid_epoch():
    lengths = _lengths(200)
    sampler = LengthGroupedSampler(lengths, batch_size=4, seed=2)
    sampler.set_epoch(3)
    full = list(sampler)
    sampler.skip(17)
    assert len(sampler) == len(full) - 17
    assert list(sampler) == full[17:]
    sampler.set_epoch(3)  # a new epoch starts from its first batch
    assert list(sampler) == full
    with pytest.raises(ValueError):
        sampler.skip(len(full) + 1)


def test_sampler_drives_a_dataloader(manifest, processor):
    dataset = TrainDataset(_samples(manifest), processor, 400)
    sampler = LengthGroupedSampler(dataset.lengths, batch_size=2, seed=0)
    loader = torch.utils.data.DataLoader(
        dataset, batch_sampler=sampler, collate_fn=lambda b: collate(b, processor.tokenizer.pad_token_id)
    )
    ids = [i for batch in loader for i in batch["ids"]]
    assert sorted(ids) == ["img", "two", "txt"] and len(loader) == 2
