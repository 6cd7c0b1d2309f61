"""Streamed training data: WebDataset tar shards, Parquet and `datasets` datasets (a saved folder or a hub id),
jsonl files, and weighted mixtures of them, read as one deterministic stream that every process and DataLoader
worker of a run agrees on. Nothing is read before the first step: start-up does not grow with the data.

The stream of an epoch (`epoch_records`): each source's shards in an order shuffled from `(seed, epoch)`, records
in shard order; the sources interleaved by weighted draws from `(seed, epoch)` (a source that runs out leaves the
draw, so each record comes once per epoch); then a shuffle buffer of `shuffle_buffer` records. Position `p` of the
stream goes to global batch `p // G` (`G` = micro_batch_size × grad_accum × processes) and, within it, to
micro-batch and process as in the in-memory path (`BatchLayout`); a process's micro-batch `j` is built by its
DataLoader worker `j mod num_workers`. Every worker reads the stream's bytes, and decodes and tokenizes only its
own records. An incomplete last global batch is dropped.

Resuming at `(epoch, batch)` replays that epoch's stream from its start without decoding the records before
`batch`: the samples, their augmentation (seeded from `(seed, epoch, position)`) and so the weights are those of an
uninterrupted run.

A record that can't train — an image that won't decode, a shard member missing or unreadable, not one image per
`<image>` tag, nothing supervised within max_length, an image block truncation dropped — keeps its place as a
sample with no supervised token (the batch keeps its shape and adds nothing to the loss), and is named in its
batch's `skipped` list: skipped, counted, named, never fatal.
"""

from __future__ import annotations

import glob
import hashlib
import io
import json
import tarfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from PIL import Image

from openowl.constants import IGNORE_INDEX
from openowl.processing import OwlProcessor
from openowl.train.data import Sample, collate, detect_format, image_paths, record_sample, tokenize_sample
from openowl.train.features import image_key
from openowl.train.transforms import eval_transform, make_generator, train_transform

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "bmp", "gif")  # tar members taken as a sample's images
IMAGE_COLUMNS = ("image", "images")  # Parquet / `datasets` columns holding a sample's images
MIX_KEY, SHUFFLE_KEY, SHARDS_KEY = 1, 2, 3  # generator keys after (seed, epoch): one stream for each draw


class UnusableError(Exception):
    """A record that can't train; its message says why."""


@dataclass
class Record:
    """One sample as read from its shard: its fields (a jsonl row's object) and its images, in order, as bytes or
    paths. `problem` says why the record could not even be read (its fields are then None)."""

    where: str  # shard and key, for messages
    key: str  # the sample's id when its fields give none
    fields: dict[str, Any] | None
    images: list[bytes | Path] = field(default_factory=list)
    problem: str | None = None


class Source(Protocol):
    name: str

    def shards(self) -> list[str]: ...

    def read(self, shard: str) -> Iterator[Record]: ...


# --- sources ------------------------------------------------------------------------------------------------------


class TarShards:
    """WebDataset tar shards: a glob (`data/laion-*.tar`) or a folder of `.tar` files. A sample is the run of
    members sharing a key (the name up to the first dot of its last part): `KEY.jpg` / `KEY.png` (several:
    `KEY.0.jpg`, `KEY.1.jpg`, ...) with `KEY.json` (a jsonl row's fields) or `KEY.txt` (a caption)."""

    def __init__(self, pattern: str):
        self.name = pattern
        path = Path(pattern)
        self.files = sorted(glob.glob(str(path / "*.tar"))) if path.is_dir() else sorted(glob.glob(pattern))
        if not self.files:
            raise FileNotFoundError(f"{pattern}: no tar shard matches")

    def shards(self) -> list[str]:
        return self.files

    def read(self, shard: str) -> Iterator[Record]:
        for key, members, problem in _tar_groups(shard):
            where = f"{shard}:{key}"
            yield Record(where, key, None, problem=problem) if problem else _tar_record(where, key, members)


def _tar_groups(path: str) -> Iterator[tuple[str, dict[str, bytes], str | None]]:
    """(key, {extension: bytes}, None) per sample of a tar shard; a shard that breaks off ends with one
    (key, {}, why) naming the member it broke at."""
    key, members = None, {}
    try:
        with tarfile.open(path, "r:*") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                folder, slash, name = member.name.rpartition("/")
                stem, _, extension = name.partition(".")
                if key is not None and folder + slash + stem != key:
                    yield key, members, None
                    members = {}
                key = folder + slash + stem
                members[extension.lower()] = tar.extractfile(member).read()
    except (tarfile.TarError, OSError, EOFError, ValueError) as err:
        yield key or "?", {}, f"{path}: unreadable from member {key!r} on ({err}); the rest of the shard is lost"
        return
    if key is not None:
        yield key, members, None


def _json_object(text: str | bytes) -> dict[str, Any]:
    """A JSON object's text as a dict. Raises ValueError: not valid JSON, or JSON but not an object."""
    value = json.loads(text)
    if not isinstance(value, dict):
        raise ValueError(f"expected a JSON object, got {type(value).__name__}")
    return value


def _tar_record(where: str, key: str, members: dict[str, bytes]) -> Record:
    names = sorted((e for e in members if e.rpartition(".")[2] in IMAGE_EXTENSIONS), key=_image_order)
    try:
        if "json" in members:
            fields = _json_object(members["json"])
        elif "txt" in members:
            fields = {"caption": members["txt"].decode("utf-8")}
        else:
            raise ValueError(f"no .json or .txt member (members: {', '.join(sorted(members))})")
    except (ValueError, UnicodeDecodeError) as err:
        return Record(where, key, None, problem=f"{where}: {err}")
    return Record(where, key, {"id": key, **fields}, [members[name] for name in names])


def _image_order(extension: str) -> tuple[int, str]:
    """`jpg` before `0.jpg`, `1.jpg`, ..., `10.jpg`."""
    index = extension.rpartition(".")[0]
    return (int(index) if index.isdigit() else -1, extension)


class JsonlFile:
    """A jsonl file as a stream of one shard, read line by line; image paths relative to `image_root` (default:
    the file's folder)."""

    def __init__(self, path: str, image_root: str | None = None):
        self.name, self.path = path, Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"{path}: no such file")
        self.root = Path(image_root) if image_root else self.path.parent

    def shards(self) -> list[str]:
        return [str(self.path)]

    def read(self, shard: str) -> Iterator[Record]:
        with open(shard, encoding="utf-8") as f:
            for lineno, line in enumerate(f, start=1):
                if line.strip():
                    yield _row_record(f"{shard}:{lineno}", str(lineno), line, self.root)


def _row_record(where: str, key: str, line: str, root: Path) -> Record:
    try:
        fields = _json_object(line)
        return Record(where, key, fields, image_paths(fields, root))
    except ValueError as err:
        return Record(where, key, None, problem=f"{where}: {err}")


class HFDataset:
    """A `datasets` dataset, streamed: a Parquet file or folder of them, a folder written by `save_to_disk`, or a
    hub id (`split` of it). Columns: a jsonl row's fields, images in `image` / `images` (bytes, `{"bytes", "path"}`
    or paths). Shards are the dataset's own (its files)."""

    def __init__(self, path: str, split: str = "train"):
        try:
            import datasets
        except ImportError as err:
            raise ImportError(
                f"{path}: streaming Parquet or hub datasets needs `datasets` (pip install -e '.[data]')"
            ) from err
        self.name = path
        self.dataset = _open_dataset(datasets, path, split).decode(False)  # images come as bytes; we decode them

    def shards(self) -> list[str]:
        return [str(i) for i in range(self.dataset.num_shards)]

    def read(self, shard: str) -> Iterator[Record]:
        part = self.dataset.shard(num_shards=self.dataset.num_shards, index=int(shard))
        for row, fields in enumerate(part):
            key = f"{shard}:{row}"
            yield _column_record(f"{self.name}[{key}]", key, dict(fields))


def _open_dataset(datasets, path: str, split: str):
    where = Path(path)
    if where.is_dir() and ((where / "dataset_info.json").is_file() or (where / "state.json").is_file()):
        return datasets.load_from_disk(str(where)).to_iterable_dataset()
    parquet = sorted(glob.glob(str(where / "**" / "*.parquet"), recursive=True)) if where.is_dir() else []
    if where.suffix == ".parquet" or parquet:
        return datasets.load_dataset(
            "parquet", data_files=[str(p) for p in parquet or [where]], split="train", streaming=True
        )
    from huggingface_hub import constants

    from openowl.loading import hub_reachable

    if not constants.HF_HUB_OFFLINE and not hub_reachable(constants.ENDPOINT):
        raise OSError(f"{path}: not a local dataset, and the Hugging Face hub ({constants.ENDPOINT}) can't be reached "
                      "to stream it; check the network, or download it and pass its folder")  # fmt: skip
    return datasets.load_dataset(path, split=split, streaming=True)


def _column_record(where: str, key: str, fields: dict[str, Any]) -> Record:
    images: list[bytes | Path] = []
    for column in IMAGE_COLUMNS:
        value = fields.pop(column, None)
        for item in value if isinstance(value, list) else [] if value is None else [value]:
            if isinstance(item, dict):
                item = item.get("bytes") or item.get("path")
            if isinstance(item, bytes):
                images.append(item)
            elif isinstance(item, str):
                images.append(Path(item))
    fields.setdefault("id", key)
    return Record(where, key, fields, images)


def open_source(path: str, image_root: str | None = None, split: str = "train") -> Source:
    """The source a `data.train` (or mixture) path names: tar shards (a `.tar` glob or a folder of them), a jsonl
    file, or a `datasets` dataset (Parquet, a saved folder, a hub id)."""
    where = Path(path)
    if path.endswith(".tar") or (where.is_dir() and glob.glob(str(where / "*.tar"))):
        return TarShards(path)
    if where.suffix in (".jsonl", ".json"):
        return JsonlFile(path, image_root)
    return HFDataset(path, split)


def is_stream(path: str, mixture: Sequence[Any] = ()) -> bool:
    """Whether `data.train` (with `data.mixture`) is read as a stream rather than into memory: a mixture, tar
    shards, Parquet, a dataset folder or a hub id; a jsonl / JSON file is read into memory."""
    return bool(mixture) or not (Path(path).suffix in (".jsonl", ".json") and not any(c in path for c in "*?["))


# --- the stream of an epoch ---------------------------------------------------------------------------------------


@dataclass
class StreamSpec:
    """What the stream is made of: its sources with their weights, and how it is shuffled."""

    sources: Sequence[Source]
    weights: Sequence[float]
    seed: int = 0
    shuffle_buffer: int = 1000
    format: str = "auto"
    repeats: Sequence[int] = ()  # passes over each source per epoch (default 1 each): a small source kept in the mix

    def __post_init__(self):
        if len(self.sources) != len(self.weights) or not self.sources:
            raise ValueError("a stream needs at least one source, and one weight per source")
        if not all(w > 0 for w in self.weights):
            raise ValueError(f"mixture weights must be positive, got {list(self.weights)}")
        self.repeats = tuple(self.repeats) or (1,) * len(self.sources)
        if len(self.repeats) != len(self.sources) or not all(isinstance(r, int) and r >= 1 for r in self.repeats):
            raise ValueError(f"mixture repeats: one whole number >= 1 per source, got {list(self.repeats)}")

    def digest(self) -> str:
        """The sources, their shards, weights and repeats: what a resumed run must read the same."""
        entries = [[s.name, s.shards(), w] + ([r] if r != 1 else [])
                   for s, w, r in zip(self.sources, self.weights, self.repeats, strict=True)]  # fmt: skip
        text = json.dumps(entries + [self.shuffle_buffer])
        return "sha256:" + hashlib.sha256(text.encode()).hexdigest()


def epoch_records(spec: StreamSpec, epoch: int) -> Iterator[Record]:
    """The records of `epoch`, in the order every process and worker agrees on."""
    streams = [_source_records(s, make_generator(spec.seed, epoch, SHARDS_KEY, i), r)
               for i, (s, r) in enumerate(zip(spec.sources, spec.repeats, strict=True))]  # fmt: skip
    mixed = _interleave(streams, list(spec.weights), make_generator(spec.seed, epoch, MIX_KEY))
    yield from _shuffled(mixed, spec.shuffle_buffer, make_generator(spec.seed, epoch, SHUFFLE_KEY))


def _source_records(source: Source, generator: torch.Generator, repeat: int = 1) -> Iterator[Record]:
    shards = source.shards()
    for _ in range(repeat):  # each pass takes the shards in an order of its own
        for i in torch.randperm(len(shards), generator=generator).tolist():
            yield from source.read(shards[i])


def _interleave(streams: list[Iterator[Record]], weights: list[float], generator: torch.Generator) -> Iterator[Record]:
    live = list(range(len(streams)))
    while live:
        pick = (
            0
            if len(live) == 1
            else int(torch.multinomial(torch.tensor([weights[i] for i in live]), 1, generator=generator))
        )
        try:
            yield next(streams[live[pick]])
        except StopIteration:
            live.pop(pick)


def _shuffled(records: Iterator[Record], size: int, generator: torch.Generator) -> Iterator[Record]:
    """A shuffle buffer of `size` records (0 or 1: the order as read)."""
    if size <= 1:
        yield from records
        return
    buffer: list[Record] = []
    for record in records:
        if len(buffer) < size:
            buffer.append(record)
            continue
        i = int(torch.randint(len(buffer), (1,), generator=generator))
        buffer[i], record = record, buffer[i]
        yield record
    for i in torch.randperm(len(buffer), generator=generator).tolist():
        yield buffer[i]


# --- batches of a process -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BatchLayout:
    """Where each position of a global batch goes: micro-batch, then process (as `TrainRecipe._batches` slices an
    in-memory global batch)."""

    micro_batch_size: int
    grad_accum: int
    rank: int = 0
    world: int = 1

    @property
    def global_batch(self) -> int:
        return self.micro_batch_size * self.grad_accum * self.world

    def locate(self, within: int) -> tuple[int, int]:
        """(micro-batch, process) of position `within` of a global batch."""
        micro, rest = divmod(within, self.micro_batch_size * self.world)
        return micro, rest // self.micro_batch_size


class StreamDataset(torch.utils.data.IterableDataset):
    """This process's micro-batches of a stream, collated (`collate`), from `(epoch, batch)` on; for a DataLoader
    with `batch_size=None` and any number of workers (see the module's text). Each micro-batch also carries
    `global_batch` (its index in the epoch) and `skipped` (`(id, reason)` of its records that can't train)."""

    def __init__(self, spec: StreamSpec, processor: OwlProcessor, max_length: int, layout: BatchLayout,
                 augment: bool = True, features=None):  # fmt: skip
        super().__init__()
        self.spec, self.processor, self.max_length, self.layout = spec, processor, max_length, layout
        self.augment, self.features = augment, features
        self.epoch, self.batch = 0, 0
        self.skipped: dict[str, str] = {}  # id -> why, of the samples that could not train (noted from batches)
        self.seen, self.answers_cut = 0, 0  # this process's samples so far, and answers truncation cut short

    def set_position(self, epoch: int, batch: int = 0) -> None:
        """Start at global batch `batch` of `epoch` (the batches a resumed run has trained on are skipped)."""
        self.epoch, self.batch = epoch, batch

    # the report of what could not train, kept in the training process from its batches

    def note(self, batch: dict[str, Any]) -> None:
        """Take a micro-batch's bookkeeping (`skipped`, `answers_cut`) out of it, into the report."""
        self.add_failed(dict(batch.pop("skipped")))
        self.answers_cut += batch.pop("answers_cut")
        self.seen += len(batch["ids"])

    @property
    def failed(self) -> dict[str, str]:
        return dict(self.skipped)

    def add_failed(self, failed: dict[str, str]) -> None:
        """Record samples that could not train (from this process's batches or, gathered, from others)."""
        for sample_id, reason in failed.items():
            self.skipped.setdefault(sample_id, reason)

    def report(self, limit: int = 100) -> str:
        total = self.seen * self.layout.world
        cut = f"\n{self.answers_cut} answer(s) cut short by truncation (EOS lost)" if self.answers_cut else ""
        if not self.skipped:
            return f"all {total} samples read kept" + cut
        lines = [f"skipped {len(self.skipped)} of {total} samples read:"]
        lines += [f"  {sample_id}: {reason}" for sample_id, reason in list(self.skipped.items())[:limit]]
        if len(self.skipped) > limit:
            lines.append(f"  ... and {len(self.skipped) - limit} more")
        return "\n".join(lines) + cut

    def summary(self) -> dict[str, Any]:
        """Counts for a run's final metrics, as `TrainDataset.summary`'s."""
        return {"samples": self.seen * self.layout.world, "skipped": len(self.skipped),
                "skipped_ids": list(self.skipped)[:20], "failed_to_load": sorted(self.skipped),
                "answers_cut": self.answers_cut}  # fmt: skip

    def state(self) -> dict[str, Any]:
        """What a checkpoint keeps of the report (`load_state` restores it)."""
        return {"skipped": self.skipped, "seen": self.seen, "answers_cut": self.answers_cut}

    def load_state(self, state: dict[str, Any]) -> None:
        self.skipped = dict(state["skipped"])
        self.seen, self.answers_cut = state["seen"], state["answers_cut"]

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        layout, first = self.layout, self.batch * self.layout.grad_accum
        pending: dict[int, list[dict[str, Any]]] = {}
        for position, record in enumerate(epoch_records(self.spec, self.epoch)):
            batch, within = divmod(position, layout.global_batch)
            if batch < self.batch:
                continue
            micro, rank = layout.locate(within)
            index = batch * layout.grad_accum + micro
            if rank == layout.rank and (index - first) % workers == worker:
                pending.setdefault(index, []).append(self.item(record, position))
            if within == layout.global_batch - 1:
                for index in sorted(pending):
                    yield self._collated(batch, pending.pop(index))

    def _collated(self, batch: int, items: list[dict[str, Any]]) -> dict[str, Any]:
        out = collate(items, self.processor.tokenizer.pad_token_id)
        out["global_batch"] = batch
        out["skipped"] = [(item["id"], item["skipped"]) for item in items if "skipped" in item]
        out["answers_cut"] = sum(item.get("answers_cut", 0) for item in items)
        return out

    def item(self, record: Record, position: int) -> dict[str, Any]:
        """A training item (as `TrainDataset`'s), or a placeholder with no supervised token and a `skipped`
        reason."""
        try:
            sample = self._sample(record)
            tokens = tokenize_sample(sample.messages, self.processor, self.max_length)
            if tokens.num_images < len(record.images):
                dropped = len(record.images) - tokens.num_images
                raise UnusableError(f"truncation to max_length={self.max_length} dropped {dropped} of its image(s)")
            if tokens.num_supervised == 0:
                raise UnusableError(f"no supervised token within max_length={self.max_length}")
            visual = self._visual(record.images, position)
        except UnusableError as err:
            return self._placeholder(record, str(err))
        length = tokens.length
        return {"input_ids": tokens.input_ids[:length], "labels": tokens.labels[:length], **visual, "id": sample.id,
                "answers_cut": tokens.answers_cut}  # fmt: skip

    def _sample(self, record: Record) -> Sample:
        if record.problem:
            raise UnusableError(record.problem)
        fields = dict(record.fields)
        if record.images or "image" in fields:
            given = fields.get("image")
            named = [given] if isinstance(given, str) else given if isinstance(given, list) else None
            if named is not None and len(named) != len(record.images):
                raise UnusableError(
                    f"{record.where}: lists {len(named)} image(s), but {len(record.images)} come with it"
                )
            fields["image"] = [str(i) for i in range(len(record.images))]  # stand-ins: the images are the record's
        try:
            format = self.spec.format if self.spec.format != "auto" else detect_format(record.where, fields)
            return record_sample(fields, record.key, Path("."), format, record.where)
        except ValueError as err:
            raise UnusableError(str(err)) from None

    def _visual(self, images: list[bytes | Path], position: int) -> dict[str, Any]:
        """`pixel_values` (or, from a feature cache, `vision_tokens`) of a record's images."""
        p = self.processor
        if self.features is not None:
            return {"vision_tokens": self._cached(images), "pixel_values": None}
        generator = make_generator(self.spec.seed, self.epoch, position) if self.augment else None
        out = []
        for image in images:
            try:
                if generator is not None:
                    out.append(train_transform(image, p.image_size, generator, p.image_mean, p.image_std))
                else:
                    out.append(eval_transform(image, p.image_size, p.image_mean, p.image_std))
            except (OSError, ValueError, Image.DecompressionBombError) as err:
                what = "an image" if isinstance(image, bytes) else f"image {image}"
                raise UnusableError(f"{what} failed to decode ({err})") from None
        if not out:
            return {"pixel_values": torch.zeros((0, 3, p.image_size, p.image_size), dtype=torch.float32)}
        return {"pixel_values": torch.stack(out)}

    def _cached(self, images: list[bytes | Path]) -> torch.Tensor | None:
        rows = []
        for image in images:
            name = str(image) if isinstance(image, Path) else None
            try:
                data = image.read_bytes() if isinstance(image, Path) else image
                rows.append(self.features.get(image_key(data), name))
            except OSError as err:
                raise UnusableError(f"image {image} could not be read ({err.strerror or err})") from None
            except KeyError as err:
                raise UnusableError(err.args[0]) from None
        return torch.stack(rows) if rows else None

    def _placeholder(self, record: Record, why: str) -> dict[str, Any]:
        size = self.processor.image_size
        sample_id = str((record.fields or {}).get("id", record.key))
        why = why if record.where in why else f"{record.where}: {why}"
        return {"input_ids": torch.tensor([self.processor.tokenizer.pad_token_id]),
                "labels": torch.tensor([IGNORE_INDEX]), "pixel_values": torch.zeros((0, 3, size, size)),
                "id": sample_id, "skipped": why}  # fmt: skip


def iter_image_bytes(spec: StreamSpec, missing: list[str]) -> Iterator[tuple[str, bytes]]:
    """`(name, bytes)` of every image of the stream's records, in epoch 0's order (for the feature cache); image
    files that can't be read are appended to `missing`."""
    for record in epoch_records(spec, 0):
        for n, image in enumerate(record.images):
            try:
                yield (str(image), image.read_bytes()) if isinstance(image, Path) else (f"{record.where}#{n}", image)
            except OSError as err:
                missing.append(f"{image} ({err.strerror or err})")


# --- writing shards -----------------------------------------------------------------------------------------------


def write_shards(samples: Sequence[dict[str, Any]], pattern: str, per_shard: int = 1000) -> list[Path]:
    """Write jsonl-style rows (their `image` paths read from disk) as WebDataset tar shards: `pattern` holds one
    `{}` for the shard number (`shards/train-{:05d}.tar`). Each row becomes `KEY.json` (its fields, `image` left
    out) and `KEY.jpg` / `KEY.0.png`, ... with the image files' own bytes. Returns the shard paths."""
    written = []
    for start in range(0, len(samples), per_shard):
        path = Path(pattern.format(start // per_shard))
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        with tarfile.open(tmp, "w") as tar:
            for n, row in enumerate(samples[start : start + per_shard], start=start):
                _add_sample(tar, f"{n:09d}", row)
        tmp.replace(path)
        written.append(path)
    return written


def jsonl_to_shards(path: Path, pattern: str, per_shard: int = 1000, image_root: str | None = None) -> list[Path]:
    """`openowl data shards`: a training jsonl file (image paths relative to `image_root`, default its folder) as
    WebDataset tar shards (`write_shards`). Raises ValueError naming the line of a row that isn't a JSON object,
    FileNotFoundError naming a missing image."""
    rows = []
    for record in JsonlFile(str(path), image_root).read(str(path)):
        if record.problem:
            raise ValueError(record.problem)
        rows.append({"id": record.key, **record.fields, "image": record.images})
    missing = next((p for row in rows for p in row["image"] if not Path(p).is_file()), None)
    if missing is not None:
        raise FileNotFoundError(f"{missing}: no such image file")
    return write_shards(rows, pattern, per_shard)


def _add_sample(tar: tarfile.TarFile, key: str, row: dict[str, Any]) -> None:
    images = row.get("image")
    paths = [images] if isinstance(images, str | Path) else list(images or [])
    fields = {k: v for k, v in row.items() if k != "image"}
    members = [(f"{key}.json", json.dumps(fields).encode())]
    for i, image in enumerate(paths):
        extension = Path(image).suffix.lstrip(".").lower() or "jpg"
        members.append(
            (f"{key}.{extension}" if len(paths) == 1 else f"{key}.{i}.{extension}", Path(image).read_bytes())
        )
    for name, data in members:
        info = tarfile.TarInfo(name)
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
