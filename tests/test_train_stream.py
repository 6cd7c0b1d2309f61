"""Streamed training data (`openowl.train.stream`) on the parity fixture: WebDataset tar shards, Parquet, a
`save_to_disk` folder and a jsonl stream give the samples of the in-memory jsonl; processes and DataLoader workers
cover each sample once; mixtures; bad records skipped and named; a stream trains (also from the feature cache), and
resumes bit for bit after SIGKILL, in one process and in two."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from collections import Counter
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from conftest import CHECKPOINT, IMAGES
from safetensors.torch import load_file

from openowl import OwlProcessor
from openowl.train.config import load_config
from openowl.train.data import TrainDataset, read_samples
from openowl.train.recipe import TrainRecipe, checkpoints
from openowl.train.stream import (
    BatchLayout,
    HFDataset,
    JsonlFile,
    StreamDataset,
    StreamSpec,
    TarShards,
    epoch_records,
    is_stream,
    write_shards,
)

ROOT = Path(__file__).resolve().parents[1]
SYSTEM = "The following is a conversation between a curious human and AI assistant."


@pytest.fixture(scope="module")
def processor():
    return OwlProcessor.from_pretrained(CHECKPOINT)


def _rows(n: int) -> list[dict]:
    """Upstream-format rows, with ids: one image or none, different lengths."""
    rows = []
    for i in range(n):
        if i % 4 == 3:
            rows.append({"id": f"s{i}", "text": f"{SYSTEM}\nHuman: Name a bird.\nAI: An owl number {i}."})
        else:
            question = "What is in the picture?" + " Please be precise." * (i % 3)
            text = f"{SYSTEM}\nHuman: <image>\nHuman: {question}\nAI: A photo, number {i}."
            rows.append({"id": f"s{i}", "text": text, "image": [str(IMAGES / f"image{i % 3}.jpg")]})
    return rows


def _jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def _parquet(path: Path, rows: list[dict]) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    images = [[{"bytes": Path(p).read_bytes(), "path": None} for p in row.get("image", [])] for row in rows]
    table = pa.table({"id": [r["id"] for r in rows], "text": [r["text"] for r in rows], "images": images})
    pq.write_table(table, path)
    return path


def _saved_dataset(folder: Path, rows: list[dict]) -> Path:
    """The rows as a `datasets` folder written by `save_to_disk`, their images as bytes."""
    import datasets

    records = [{"id": r["id"], "text": r["text"], "images": [{"bytes": Path(p).read_bytes(), "path": None}
               for p in r.get("image", [])]} for r in rows]  # fmt: skip
    datasets.Dataset.from_list(records).save_to_disk(str(folder))
    return folder


def _stream(source, processor, **spec) -> StreamDataset:
    return StreamDataset(StreamSpec([source], [1.0], **spec), processor, 160, BatchLayout(1, 1), augment=False)


def _items(stream: StreamDataset) -> dict[str, dict]:
    return {item["id"]: item for item in map(stream.item, epoch_records(stream.spec, 0), range(10**6))}


def test_shards_parquet_a_dataset_folder_and_a_jsonl_stream_give_the_samples_of_the_jsonl(tmp_path, processor):
    rows = _rows(10)
    data = _jsonl(tmp_path / "train.jsonl", rows)
    reference = TrainDataset(read_samples(data), processor, 160, train=False)
    write_shards(rows, str(tmp_path / "shards" / "train-{:03d}.tar"), per_shard=4)
    sources = [TarShards(str(tmp_path / "shards" / "*.tar")), TarShards(str(tmp_path / "shards")),
               JsonlFile(str(data)), HFDataset(str(_parquet(tmp_path / "train.parquet", rows))),
               HFDataset(str(_saved_dataset(tmp_path / "saved", rows)))]  # fmt: skip
    assert len(sources[0].shards()) == 3
    for source in sources:
        items = _items(_stream(source, processor))
        assert sorted(items) == sorted(reference.ids), source.name
        for i in range(len(reference)):
            want, got = reference[i], items[reference.ids[i]]
            assert torch.equal(want["input_ids"], got["input_ids"]) and torch.equal(want["labels"], got["labels"])
            assert torch.equal(want["pixel_values"], got["pixel_values"]), (source.name, want["id"])


def test_what_is_a_stream():
    assert not is_stream("data/train.jsonl") and not is_stream("data/train.json")
    assert is_stream("shards/train-*.tar") and is_stream("data.parquet") and is_stream("user/hub-dataset")
    assert is_stream("data/train.jsonl", mixture=[object()])


def _cover(spec: StreamSpec, processor, world: int, workers: int, epoch: int = 0, start: int = 0) -> list[list]:
    """The micro-batches each of `world` processes reads (with `workers` DataLoader workers), as lists of ids; a
    global batch of 8 in 2 micro-batches."""
    out = []
    for rank in range(world):
        stream = StreamDataset(spec, processor, 160, BatchLayout(4 // world, 2, rank, world), augment=False)
        stream.set_position(epoch, start)
        loader = torch.utils.data.DataLoader(stream, batch_size=None, num_workers=workers)
        out.append([(batch["global_batch"], batch["ids"]) for batch in loader])
    return out


def test_two_processes_by_two_workers_cover_every_sample_once(tmp_path, processor):
    rows = _rows(37)  # 4 global batches of 8 and 5 left over (dropped: a global batch is whole or not at all)
    write_shards(rows, str(tmp_path / "train-{:03d}.tar"), per_shard=5)
    spec = StreamSpec([TarShards(str(tmp_path / "*.tar"))], [1.0], seed=5, shuffle_buffer=16)
    two_by_two = _cover(spec, processor, world=2, workers=2)
    ids = [i for rank in two_by_two for _, batch in rank for i in batch]
    assert len(ids) == len(set(ids)) == 32 and set(ids) <= {row["id"] for row in rows}
    assert all(len(rank) == 8 for rank in two_by_two)  # 4 global batches × 2 micro-batches, in order
    assert [[b for b, _ in rank] for rank in two_by_two] == [[0, 0, 1, 1, 2, 2, 3, 3]] * 2
    assert _cover(spec, processor, world=2, workers=0) == two_by_two  # the workers don't change the batches
    one = _cover(spec, processor, world=1, workers=2)[0]  # one process reads what the two read, micro by micro
    assert [sorted(a + b) for (_, a), (_, b) in zip(two_by_two[0], two_by_two[1], strict=True)] == [
        sorted(batch) for _, batch in one
    ]
    assert _cover(spec, processor, world=2, workers=2, start=2) == [rank[4:] for rank in two_by_two]  # resumed
    other_epoch = _cover(spec, processor, world=2, workers=2, epoch=1)
    assert other_epoch != two_by_two  # each epoch its own order


def test_two_real_processes_by_two_workers_cover_every_sample_once(tmp_path, processor):
    """The same as above across two processes started by torchrun (rank and world from accelerate)."""
    rows = _rows(37)
    write_shards(rows, str(tmp_path / "train-{:03d}.tar"), per_shard=5)
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", "29544",
                str(ROOT / "tests" / "stream_ranks_worker.py"), str(tmp_path / "*.tar"), str(tmp_path)]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "tests")}
    subprocess.run(launcher, env=env, cwd=ROOT, check=True, timeout=300)
    ranks = [json.loads((tmp_path / f"rank-{rank}.json").read_text()) for rank in range(2)]
    ids = [i for rank in ranks for _, batch in rank for i in batch]
    assert len(ids) == len(set(ids)) == 32  # every sample of the 4 whole global batches, once
    assert all([b for b, _ in rank] == [0, 0, 1, 1, 2, 2, 3, 3] for rank in ranks)
    spec = StreamSpec([TarShards(str(tmp_path / "*.tar"))], [1.0], seed=5, shuffle_buffer=16)
    assert [[[b, batch] for b, batch in rank] for rank in _cover(spec, processor, 2, 0)] == ranks


def test_a_mixture_draws_by_weight_and_reads_each_record_once(tmp_path, processor):
    big, small = _rows(60), [{**row, "id": f"b{row['id']}"} for row in _rows(20)]
    write_shards(big, str(tmp_path / "big-{:03d}.tar"), per_shard=10)
    sources = [TarShards(str(tmp_path / "big-*.tar")), JsonlFile(str(_jsonl(tmp_path / "small.jsonl", small)))]
    spec = StreamSpec(sources, [3.0, 1.0], seed=1, shuffle_buffer=0)
    ids = [record.fields["id"] for record in epoch_records(spec, 0)]
    assert sorted(ids) == sorted(r["id"] for r in big + small)  # each once per epoch
    assert ids == [record.fields["id"] for record in epoch_records(spec, 0)]  # deterministic for a seed
    head = Counter(i.startswith("b") for i in ids[:40])
    assert 5 <= head[True] <= 16  # about a quarter of the stream while both last
    cfg = load_config(None, ["data.mixture=[{path: a.tar, weight: 3}, {path: b.jsonl}]"])
    assert [(m.path, m.weight) for m in cfg.data.mixture] == [("a.tar", 3.0), ("b.jsonl", 1.0)]
    with pytest.raises(ValueError, match="weights must be positive"):
        load_config(None, ["data.mixture=[{path: a.tar, weight: 0}]"])
    with pytest.raises(ValueError, match="set one"):
        load_config(None, ["data.train=x.tar", "data.mixture=[{path: a.tar}]"])


def test_a_repeated_source_is_read_that_many_times_an_epoch_and_lasts(tmp_path, processor):
    big, small = _rows(60), [{**row, "id": f"b{row['id']}"} for row in _rows(5)]
    write_shards(big, str(tmp_path / "big-{:03d}.tar"), per_shard=10)
    sources = [TarShards(str(tmp_path / "big-*.tar")), JsonlFile(str(_jsonl(tmp_path / "small.jsonl", small)))]
    once = StreamSpec(sources, [4.0, 1.0], seed=2, shuffle_buffer=0)
    spec = StreamSpec(sources, [4.0, 1.0], seed=2, shuffle_buffer=0, repeats=[1, 3])
    ids = [record.fields["id"] for record in epoch_records(spec, 0)]
    assert Counter(ids) == Counter({r["id"]: 1 for r in big} | {r["id"]: 3 for r in small})
    assert ids == [record.fields["id"] for record in epoch_records(spec, 0)]
    assert max(n for n, i in enumerate(ids) if i.startswith("b")) > 40  # 15 small records spread past 5 alone
    assert spec.digest() != once.digest() and once.digest() == replace(once, repeats=[1, 1]).digest()
    cfg = load_config(None, ["data.mixture=[{path: a.tar}, {path: b.jsonl, weight: 0.1, repeat: 4}]"])
    assert [m.repeat for m in cfg.data.mixture] == [1, 4]
    with pytest.raises(ValueError, match="repeat must be a whole number"):
        load_config(None, ["data.mixture=[{path: a.tar, repeat: 0}]"])


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def test_bad_records_are_skipped_counted_and_named(tmp_path, processor):
    good = (IMAGES / "image0.jpg").read_bytes()
    caption = json.dumps({"caption": "A photo."}).encode()
    with tarfile.open(tmp_path / "a.tar", "w") as tar:
        _add(tar, "ok.jpg", good), _add(tar, "ok.json", caption)
        _add(tar, "cut.jpg", good[:3000]), _add(tar, "cut.json", caption)  # a truncated JPEG
        _add(tar, "nojson.jpg", good)  # no .json or .txt
        _add(tar, "badjson.jpg", good), _add(tar, "badjson.json", b"{not json")
        _add(tar, "two.jpg", good), _add(tar, "two.txt", b"A photo, again.")
        (
            _add(tar, "tags.jpg", good),
            _add(tar, "tags.json", json.dumps({"text": f"{SYSTEM}\nHuman: Hi\nAI: Hello"}).encode()),
        )
    with tarfile.open(tmp_path / "b.tar", "w") as tar:
        _add(tar, "late.jpg", good), _add(tar, "late.json", caption)
        _add(tar, "lost.jpg", good), _add(tar, "lost.json", caption)
    whole = (tmp_path / "b.tar").read_bytes()
    (tmp_path / "b.tar").write_bytes(whole[: len(whole) // 2])  # a shard cut off mid-member
    stream = _stream(TarShards(str(tmp_path / "*.tar")), processor)
    items = {}
    for position, record in enumerate(epoch_records(stream.spec, 0)):
        item = stream.item(record, position)
        items[item["id"]] = item
    reasons = {i: item["skipped"] for i, item in items.items() if "skipped" in item}
    assert set(items) - set(reasons) == {"ok", "two", "late"}
    assert "failed to decode" in reasons["cut"] and "a.tar:cut" in reasons["cut"]
    assert "no .json or .txt member" in reasons["nojson"]
    assert "JSON" in reasons["badjson"] or "Expecting" in reasons["badjson"]
    assert "image" in reasons["tags"]  # one image, no <image> tag: not trained half-matched
    assert any("b.tar" in why and "the rest of the shard is lost" in why for why in reasons.values())
    for item in (items[i] for i in reasons):  # a placeholder: its place in the batch, nothing to learn
        assert (item["labels"] == -100).all() and item["pixel_values"].shape[0] == 0


def _train_args(tmp_path: Path, data: str, **extra) -> list[str]:
    settings = {
        "model.path": str(CHECKPOINT), "data.train": data, "data.max_length": 160, "data.shuffle_buffer": 8,
        "policy": "stage2", "optim.lr": 1e-3, "optim.warmup_steps": 2, "train.micro_batch_size": 2,
        "train.grad_accum": 1, "train.max_steps": 12, "train.output_dir": str(tmp_path / "run"), "train.seed": 3,
    }  # fmt: skip
    settings.update(extra)
    return [f"{k}={v}" for k, v in settings.items() if v != ""]


def test_a_stream_trains_reports_its_skips_and_needs_max_steps(tmp_path):
    rows = _rows(12)
    rows[5]["image"] = [str(tmp_path / "missing.jpg")]
    write_shards(rows[:5] + rows[6:], str(tmp_path / "train-{:03d}.tar"), per_shard=4)
    broken = _jsonl(tmp_path / "extra.jsonl", [rows[5]])  # its image file is missing: named, not fatal
    mixture = f"[{{path: {tmp_path / 'train-*.tar'}, weight: 2}}, {{path: {broken}}}]"
    args = _train_args(tmp_path, "", **{"data.mixture": mixture, "train.max_steps": 8, "train.num_workers": 2})
    recipe = TrainRecipe(load_config(None, args))
    recipe.setup()
    metrics = recipe.train()
    assert metrics["step"] == 8 and metrics["epoch"] >= 1  # 12 samples, 6 steps an epoch
    assert metrics["data"]["skipped_ids"] == ["s5"] and metrics["data"]["samples"] == 16
    with pytest.raises(ValueError, match="needs train.max_steps"):
        TrainRecipe(
            load_config(None, _train_args(tmp_path, str(tmp_path / "*.tar"), **{"train.max_steps": "null"}))
        ).setup()


def _train_cli(args: list[str], processes: int = 1, port: int = 29541) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "TQDM_DISABLE": "1", "OMP_NUM_THREADS": "1"}
    launcher = [sys.executable]
    if processes > 1:
        launcher += ["-m", "torch.distributed.run", "--nproc-per-node", str(processes), "--master-port", str(port)]
    return subprocess.Popen([*launcher, "-m", "openowl", "train", *args], env=env, cwd=ROOT, start_new_session=True)


@pytest.mark.parametrize("processes", [1, 2])
def test_sigkill_then_resume_of_a_stream_is_bit_identical(tmp_path, processes):
    """Kill -9 a streamed run (2 DataLoader workers) mid-epoch after a checkpoint, resume it, and end with exactly
    the weights of an uninterrupted run."""
    write_shards(_rows(22), str(tmp_path / "train-{:03d}.tar"), per_shard=4)
    micro = 2 // processes
    common = {"train.save_every": 2, "train.keep_last": 2, "train.num_workers": 2, "train.micro_batch_size": micro,
              "policy": "stage2-abstractor"}  # fmt: skip
    data = str(tmp_path / "*.tar")
    whole = _train_args(tmp_path, data, **common, **{"train.output_dir": str(tmp_path / "whole")})
    assert _train_cli(whole, processes).wait(timeout=600) == 0

    out = tmp_path / "killed"
    interrupted = _train_args(tmp_path, data, **common, **{"train.output_dir": str(out)})
    proc = _train_cli(interrupted, processes, port=29542)
    deadline = time.time() + 300
    while not any(int(p.name[5:]) >= 4 for p in checkpoints(out)) and time.time() < deadline:
        time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGKILL)  # the launcher, its processes and their DataLoader workers
    proc.wait(timeout=60)
    assert int(checkpoints(out)[-1].name[5:]) < 12
    assert _train_cli([*interrupted, "--resume"], processes, port=29543).wait(timeout=600) == 0

    final_whole = load_file(checkpoints(tmp_path / "whole")[-1] / "trainable.safetensors")
    final_resumed = load_file(checkpoints(out)[-1] / "trainable.safetensors")
    assert final_whole.keys() == final_resumed.keys()
    for key in final_whole:
        assert torch.equal(final_whole[key], final_resumed[key]), key


def test_a_hub_dataset_offline_fails_fast_and_says_so(monkeypatch):
    import openowl.loading

    monkeypatch.setattr(openowl.loading, "hub_reachable", lambda endpoint, timeout=3.0: False)
    started = time.monotonic()
    with pytest.raises(OSError, match="can't be reached"):
        HFDataset("someone/a-dataset")
    assert time.monotonic() - started < 10


def test_a_stream_trains_from_the_feature_cache_as_on_pixels(tmp_path):
    """Tar shards with a frozen ViT's feature cache (built from the shards' own image bytes by `openowl data
    cache-features`): the losses and final weights of the same stream encoded on the fly (eval transform)."""
    from openowl.train.recipe import run_feature_cache

    write_shards(_rows(12), str(tmp_path / "train-{:03d}.tar"), per_shard=5)
    common = {"data.augment": False, "policy": "stage2-abstractor", "train.max_steps": 4, "train.num_workers": 2}
    runs = {}
    for name in ("pixels", "cache"):
        more = {"data.features": str(tmp_path / "features")} if name == "cache" else {}
        cfg = load_config(None, _train_args(tmp_path / name, str(tmp_path / "*.tar"), **common, **more))
        if name == "cache":
            summary = run_feature_cache(cfg)
            assert summary["complete"] and summary["skipped"] == 0
        recipe = TrainRecipe(cfg)
        recipe.setup()
        assert (recipe.dataset.features is None) == (name == "pixels")
        metrics = recipe.train()
        assert metrics["data"]["skipped"] == 0  # no cache miss
        losses = [json.loads(line)["loss"] for line in (tmp_path / name / "run" / "metrics.jsonl").open()]
        runs[name] = losses, {k: v.detach().clone() for k, v in recipe.trainable.items()}
    torch.testing.assert_close(torch.tensor(runs["cache"][0]), torch.tensor(runs["pixels"][0]))
    for key, value in runs["pixels"][1].items():
        torch.testing.assert_close(runs["cache"][1][key], value, msg=key)
    with pytest.raises(ValueError, match="augment"):  # random crops: a cache would train on one fixed view
        load_config(None, _train_args(tmp_path, str(tmp_path / "*.tar"), **{"data.features": str(tmp_path / "f")}))


def test_the_shards_command_writes_the_jsonl_as_shards(tmp_path, processor, capsys):
    from openowl.cli import main

    rows = _rows(9)
    data = _jsonl(tmp_path / "train.jsonl", rows)
    assert main(["data", "shards", str(data), str(tmp_path / "out" / "train-{:03d}.tar"), "--per-shard", "4"]) == 0
    assert "3 shard(s)" in capsys.readouterr().out
    items = _items(_stream(TarShards(str(tmp_path / "out")), processor))
    reference = TrainDataset(read_samples(data), processor, 160, train=False)
    assert sorted(items) == sorted(reference.ids)
    assert all(torch.equal(items[reference.ids[i]]["pixel_values"], reference[i]["pixel_values"]) for i in range(9))
    (tmp_path / "bad.jsonl").write_text(json.dumps({"text": "x", "image": "gone.jpg"}) + "\n")
    assert main(["data", "shards", str(tmp_path / "bad.jsonl"), str(tmp_path / "b-{}.tar")]) != 0
    assert "gone.jpg: no such image file" in capsys.readouterr().err and not (tmp_path / "b-0.tar").exists()
