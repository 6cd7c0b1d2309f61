"""Checkpoint I/O on CPU: broken checkpoints fail loudly (naming the file and the key), the hub path fails clearly
offline, every on-disk format loads bit-identically, saves round-trip and replace older saves cleanly, and loading
a bfloat16 checkpoint never holds a second copy of the weights (measured in a fresh process).
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from conftest import CHECKPOINT, IMAGES, VIDEO_CHECKPOINT

from openowl import OwlForConditionalGeneration, OwlProcessor, build_prompt, get_preset
from openowl.checkpoint import ABSTRACTOR_MLP_KEY, BIN_INDEX, SAFE_INDEX, CheckpointError

BF16_FILE = CHECKPOINT / "pytorch_model.bin"
INV_FREQ_SUFFIX = ".rotary_emb.inv_freq"


# --- helpers -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def reference() -> dict[str, torch.Tensor]:
    """The fixture's tensors as stored (bfloat16), without the RoPE buffers the loader ignores."""
    state = torch.load(BF16_FILE, map_location="cpu", weights_only=True)
    return {k: v for k, v in state.items() if not k.endswith(INV_FREQ_SUFFIX)}


@pytest.fixture(scope="module")
def bf16_model() -> OwlForConditionalGeneration:
    return OwlForConditionalGeneration.from_pretrained(CHECKPOINT, dtype=torch.bfloat16)


def load(folder: Path, dtype: torch.dtype = torch.bfloat16) -> OwlForConditionalGeneration:
    return OwlForConditionalGeneration.from_pretrained(folder, dtype=dtype)


def copy_checkpoint(tmp_path: Path, source: Path = CHECKPOINT, name: str = "ckpt") -> Path:
    return Path(shutil.copytree(source, tmp_path / name))


def weights_only_folder(tmp_path: Path, name: str = "weights", source: Path = CHECKPOINT) -> Path:
    """A folder holding only the fixture's config.json (the weights are the test's to write)."""
    folder = tmp_path / name
    folder.mkdir()
    shutil.copy(source / "config.json", folder)
    return folder


def truncate(file: Path) -> None:
    data = file.read_bytes()
    file.write_bytes(data[: len(data) // 2])


def save_sharded_bin(state: dict[str, torch.Tensor], folder: Path, num_shards: int = 3) -> list[str]:
    """What transformers 4.28 writes for a big model: torch.save shards plus `pytorch_model.bin.index.json`."""
    keys = sorted(state)
    names, weight_map = [], {}
    for i in range(num_shards):
        name = f"pytorch_model-{i + 1:05d}-of-{num_shards:05d}.bin"
        part = {k: state[k] for k in keys[i::num_shards]}
        torch.save(part, folder / name)
        weight_map.update(dict.fromkeys(part, name))
        names.append(name)
    total = sum(t.numel() * t.element_size() for t in state.values())
    (folder / BIN_INDEX).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    return names


def shard_files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.glob("model*.safetensors"))


def assert_state_equal(model: OwlForConditionalGeneration, expected: dict[str, torch.Tensor]) -> None:
    state = model.state_dict()
    assert sorted(state) == sorted(expected)
    for key, tensor in expected.items():
        assert state[key].dtype == tensor.dtype, key
        assert torch.equal(state[key], tensor), key


def randomized(preset: str, dtype: torch.dtype) -> OwlForConditionalGeneration:
    """A preset model with every tensor random (float32 values that bfloat16 can't hold exactly)."""
    torch.manual_seed(0)
    model = OwlForConditionalGeneration(get_preset(preset))
    with torch.no_grad():
        for param in model.parameters():
            param.normal_()
    return model.to(dtype).eval()


# --- broken checkpoints --------------------------------------------------------------------------


def _truncated_bin(tmp_path, reference):
    folder = copy_checkpoint(tmp_path)
    truncate(folder / "pytorch_model.bin")
    return folder, CheckpointError, [str(folder / "pytorch_model.bin"), "truncated"]


def _truncated_legacy_bin(tmp_path, reference):
    folder = weights_only_folder(tmp_path)
    torch.save(reference, folder / "pytorch_model.bin", _use_new_zipfile_serialization=False)
    truncate(folder / "pytorch_model.bin")
    return folder, CheckpointError, [str(folder / "pytorch_model.bin")]


def _truncated_safetensors(tmp_path, reference):
    folder = weights_only_folder(tmp_path)
    from safetensors.torch import save_file

    save_file(reference, folder / "model.safetensors")
    truncate(folder / "model.safetensors")
    return folder, CheckpointError, [str(folder / "model.safetensors"), "truncated"]


def _wrong_shape(tmp_path, reference):
    folder = weights_only_folder(tmp_path)
    bad = torch.zeros(1, 63, 64, dtype=torch.bfloat16)
    torch.save({**reference, "query_tokens": bad}, folder / "pytorch_model.bin")
    return folder, CheckpointError, ["pytorch_model.bin: tensor 'query_tokens'", "[1, 63, 64]", "[1, 64, 64]"]


def _wrong_shape_in_shard(tmp_path, reference):
    folder = copy_checkpoint(tmp_path, VIDEO_CHECKPOINT)
    index = json.loads((folder / BIN_INDEX).read_text())["weight_map"]
    key = "abstractor.visual_fc.weight"
    shard = folder / index[key]
    state = torch.load(shard, weights_only=True)
    state[key] = state[key][:, :-1].clone()
    torch.save(state, shard)
    return folder, CheckpointError, [f"{shard.name}: tensor {key!r} has shape"]


def _missing_key(tmp_path, reference):
    folder = weights_only_folder(tmp_path)
    key = "vision_model.post_layernorm.weight"
    torch.save({k: v for k, v in reference.items() if k != key}, folder / "pytorch_model.bin")
    return folder, CheckpointError, [f"missing tensor {key!r}", str(folder)]


def _unexpected_key(tmp_path, reference):
    folder = weights_only_folder(tmp_path)
    key = "abstractor.encoder.layers.9.extra.weight"
    torch.save({**reference, key: torch.zeros(4, dtype=torch.bfloat16)}, folder / "pytorch_model.bin")
    return folder, CheckpointError, [f"pytorch_model.bin: unexpected tensor {key!r}"]


def _key_in_two_shards(tmp_path, reference):
    folder = weights_only_folder(tmp_path)
    names = save_sharded_bin(reference, folder)
    shards = {name: torch.load(folder / name, weights_only=True) for name in names}
    holder = next(name for name, state in shards.items() if "query_tokens" in state)
    other = next(name for name in names if name != holder)
    torch.save({**shards[other], "query_tokens": reference["query_tokens"]}, folder / other)
    return folder, CheckpointError, ["'query_tokens'", holder, other]


def _unknown_model_type(tmp_path, reference):
    folder = copy_checkpoint(tmp_path)
    config = json.loads((folder / "config.json").read_text())
    config["model_type"] = "blip-2"
    (folder / "config.json").write_text(json.dumps(config))
    return folder, CheckpointError, [str(folder / "config.json"), "'blip-2'"]


def _index_names_missing_shard(tmp_path, reference):
    folder = copy_checkpoint(tmp_path, VIDEO_CHECKPOINT)
    (folder / "pytorch_model-00003-of-00004.bin").unlink()
    return folder, CheckpointError, [str(folder / BIN_INDEX), "pytorch_model-00003-of-00004.bin"]


def _index_not_json(tmp_path, reference):
    folder = copy_checkpoint(tmp_path, VIDEO_CHECKPOINT)
    (folder / BIN_INDEX).write_text('{"weight_map": ')
    return folder, CheckpointError, [str(folder / BIN_INDEX), "not a valid shard index"]


def _no_weights(tmp_path, reference):
    folder = weights_only_folder(tmp_path)
    return folder, CheckpointError, [str(folder), "no weights"]


def _folder_without_config(tmp_path, reference):
    folder = copy_checkpoint(tmp_path)
    (folder / "config.json").unlink()
    return folder, FileNotFoundError, [str(folder), "config.json"]


def _path_is_a_file(tmp_path, reference):
    folder = copy_checkpoint(tmp_path)
    return folder / "pytorch_model.bin", FileNotFoundError, [str(folder / "pytorch_model.bin"), "not a checkpoint"]


def _nonexistent_path(tmp_path, reference):
    path = tmp_path / "no" / "such" / "checkpoint"
    return path, FileNotFoundError, [str(path), "no such checkpoint folder"]


BROKEN = {
    "truncated-bin": _truncated_bin,
    "truncated-legacy-bin": _truncated_legacy_bin,
    "truncated-safetensors": _truncated_safetensors,
    "wrong-shape": _wrong_shape,
    "wrong-shape-in-shard": _wrong_shape_in_shard,
    "missing-key": _missing_key,
    "unexpected-key": _unexpected_key,
    "key-in-two-shards": _key_in_two_shards,
    "unknown-model-type": _unknown_model_type,
    "index-names-missing-shard": _index_names_missing_shard,
    "index-not-json": _index_not_json,
    "no-weights": _no_weights,
    "folder-without-config": _folder_without_config,
    "path-is-a-file": _path_is_a_file,
    "nonexistent-path": _nonexistent_path,
}


@pytest.mark.parametrize("case", BROKEN)
def test_broken_checkpoint_raises_naming_file_and_key(case, tmp_path, reference):
    path, error, fragments = BROKEN[case](tmp_path, reference)
    with pytest.raises(error) as info:
        load(path)
    message = str(info.value)
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"


class RunsCode:
    """Unpickling this runs a shell command: what a malicious `pytorch_model.bin` would do."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {shlex.quote(str(self.marker))}",)


@pytest.mark.parametrize("zip_format", [True, False], ids=["zip", "legacy"])
def test_pickle_that_runs_code_is_refused(zip_format, tmp_path, reference):
    folder = weights_only_folder(tmp_path)
    file = folder / "pytorch_model.bin"
    probe = tmp_path / "probe-ran"
    torch.save({**reference, "x": RunsCode(probe)}, file, _use_new_zipfile_serialization=zip_format)
    torch.load(file, weights_only=False)  # the payload is real: an unrestricted unpickler runs it
    assert probe.exists()

    marker = tmp_path / "loader-ran-code"
    torch.save({**reference, "x": RunsCode(marker)}, file, _use_new_zipfile_serialization=zip_format)
    with pytest.raises(CheckpointError, match="refused") as info:
        load(folder)
    assert str(file) in str(info.value)
    assert not marker.exists()


# --- the hub -------------------------------------------------------------------------------------


@pytest.fixture
def offline_hub(tmp_path, monkeypatch) -> Iterator[Path]:
    """HF_HUB_OFFLINE=1 and an empty HF_HOME; name lookups and connections are refused and recorded."""
    from huggingface_hub import constants

    home = tmp_path / "hf-home"
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(home))
    # huggingface_hub reads both when it is imported; the already-imported module needs its copies patched too.
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HOME", str(home))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(home / "hub"))
    monkeypatch.chdir(tmp_path)  # so a relative owner/name can't be a local folder
    attempts = []

    def refuse(*args, **kwargs):
        attempts.append(args)
        raise OSError("network disabled by the test")

    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    yield home / "hub"
    # The loader turns every hub error into OSError, so a refused connection would not fail the test by itself.
    assert attempts == [], "the hub client tried to reach the network"


def test_hub_id_offline_raises_clear_oserror(offline_hub):
    repo = "nobody-here/mplug-owl-missing"
    with pytest.raises(OSError) as info:
        load(repo)
    assert not isinstance(info.value, FileNotFoundError)  # the hub path was taken, not the local one
    message = str(info.value)
    assert repr(repo) in message
    assert "HF_HUB_OFFLINE" in message and "local folder" in message


def test_hub_id_without_a_network_answers_in_seconds(tmp_path, monkeypatch, capsys):
    """No HF_HUB_OFFLINE, but no network either (name lookups fail, as on an unplugged machine): one clear line at
    once, not the hub client's half minute of retries."""
    import time

    from huggingface_hub import constants

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    for proxy in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY"):
        monkeypatch.delenv(proxy, raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.chdir(tmp_path)
    lookups = []

    def no_dns(*args, **kwargs):
        lookups.append(args[0])
        raise socket.gaierror(socket.EAI_AGAIN, "Temporary failure in name resolution")

    monkeypatch.setattr(socket, "getaddrinfo", no_dns)
    start = time.monotonic()
    with pytest.raises(OSError) as info:
        load("nobody-here/mplug-owl-missing")
    assert time.monotonic() - start < 5
    message = str(info.value)
    assert "'nobody-here/mplug-owl-missing'" in message and "can't be reached" in message and "\n" not in message
    assert "Retrying" not in capsys.readouterr().err
    assert len(lookups) <= 1


def test_hub_id_loads_from_the_cache_offline(offline_hub, reference):
    repo = offline_hub / "models--someone--owl-cached"
    commit = "0123456789abcdef0123456789abcdef01234567"
    shutil.copytree(CHECKPOINT, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    assert_state_equal(load("someone/owl-cached"), reference)
    assert OwlProcessor.from_pretrained("someone/owl-cached").image_size == 56


# --- formats -------------------------------------------------------------------------------------


def _as_fixture(folder, model, reference):
    shutil.copytree(CHECKPOINT, folder)


def _as_single_safetensors(folder, model, reference):
    model.save_pretrained(folder)
    assert shard_files(folder) == ["model.safetensors"]


def _as_sharded_safetensors(folder, model, reference):
    model.save_pretrained(folder, max_shard_size="1MB")
    assert len(shard_files(folder)) >= 3 and (folder / SAFE_INDEX).is_file()


def _as_sharded_bin(folder, model, reference):
    folder.mkdir()
    shutil.copy(CHECKPOINT / "config.json", folder)
    save_sharded_bin(reference, folder)


FORMATS = {
    "single-bin": _as_fixture,
    "single-safetensors": _as_single_safetensors,
    "sharded-safetensors": _as_sharded_safetensors,
    "sharded-bin": _as_sharded_bin,
}


@pytest.mark.parametrize("fmt", FORMATS)
def test_every_format_loads_bit_identical(fmt, tmp_path, bf16_model, reference):
    folder = tmp_path / fmt
    FORMATS[fmt](folder, bf16_model, reference)
    assert_state_equal(load(folder, torch.bfloat16), reference)
    assert_state_equal(load(folder, torch.float32), {k: v.float() for k, v in reference.items()})


@pytest.mark.parametrize(
    ("preset", "dtype", "max_shard_size"),
    [
        ("tiny", torch.float32, "2GB"),
        ("tiny", torch.float32, "1MB"),
        ("tiny", torch.bfloat16, "2GB"),
        ("tiny-video", torch.float32, "1MB"),
        ("tiny-video", torch.bfloat16, "2GB"),
    ],
)
def test_save_then_load_is_bit_identical(preset, dtype, max_shard_size, tmp_path):
    model = randomized(preset, dtype)
    model.save_pretrained(tmp_path / "saved", max_shard_size=max_shard_size)
    loaded = load(tmp_path / "saved", dtype)
    assert loaded.config == model.config
    assert_state_equal(loaded, {k: v.detach() for k, v in model.state_dict().items()})


@pytest.mark.parametrize(
    ("dtype", "expected"),
    [
        (torch.float32, torch.float32),
        (torch.bfloat16, torch.bfloat16),
        (torch.float16, torch.float16),
        ("float16", torch.float16),
        ("torch.bfloat16", torch.bfloat16),
    ],
)
def test_bf16_checkpoint_loads_in_the_requested_dtype(dtype, expected, reference):
    model = OwlForConditionalGeneration.from_pretrained(CHECKPOINT, dtype=dtype)
    state = dict(model.named_parameters())
    assert state
    assert not [k for k, p in state.items() if p.dtype != expected]
    assert model.dtype == expected
    for key, param in state.items():
        assert torch.equal(param.detach(), reference[key].to(expected)), key


@pytest.mark.parametrize("dtype", ["float99", "complex64", "int8", torch.float8_e4m3fn])
def test_unsupported_dtype_is_refused(dtype):
    with pytest.raises(ValueError, match="unsupported dtype"):
        OwlForConditionalGeneration.from_pretrained(CHECKPOINT, dtype=dtype)


def test_sharded_video_checkpoint_loads():
    index = json.loads((VIDEO_CHECKPOINT / BIN_INDEX).read_text())["weight_map"]
    assert len(set(index.values())) == 4
    stored = {}
    for shard in sorted(set(index.values())):
        stored.update(torch.load(VIDEO_CHECKPOINT / shard, weights_only=True))
    stored = {k: v for k, v in stored.items() if not k.endswith(INV_FREQ_SUFFIX)}
    model = load(VIDEO_CHECKPOINT)
    assert model.config.video and model.config.vision.temporal_hidden_size == 32
    assert_state_equal(model, stored)


def test_rotary_inv_freq_in_files_is_ignored(tmp_path, reference, bf16_model):
    stored = torch.load(BF16_FILE, weights_only=True)
    rope_keys = [k for k in stored if k.endswith(INV_FREQ_SUFFIX)]
    assert len(rope_keys) == 2  # transformers 4.28 wrote one per layer
    folder = weights_only_folder(tmp_path)
    garbage = {k: torch.full((7,), 123.0) for k in rope_keys}  # wrong values and shape: must never be read
    torch.save({**reference, **garbage}, folder / "pytorch_model.bin")
    model = load(folder)
    text = get_preset("tiny").text_config
    head_dim = text["hidden_size"] // text["num_attention_heads"]
    expected = 1.0 / text["rope_theta"] ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim)
    torch.testing.assert_close(model.language_model.model.rotary_emb.inv_freq, expected)
    assert not any(k.endswith("inv_freq") for k in model.state_dict())
    ids = torch.tensor([[1, 450, 4996, 17354, 1701]])
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, bf16_model(input_ids=ids).logits)


def test_save_replaces_an_older_save_without_stale_shards(tmp_path, bf16_model, reference):
    folder = tmp_path / "out"
    bf16_model.save_pretrained(folder, max_shard_size="500KB")
    many = shard_files(folder)
    bf16_model.save_pretrained(folder, max_shard_size="2MB")
    fewer = shard_files(folder)
    assert 2 <= len(fewer) < len(many)
    listed = set(json.loads((folder / SAFE_INDEX).read_text())["weight_map"].values())
    assert set(fewer) == listed
    assert_state_equal(load(folder), reference)

    bf16_model.save_pretrained(folder)  # now small enough for a single file: no index, no shards
    assert sorted(os.listdir(folder)) == ["config.json", "model.safetensors"]
    assert_state_equal(load(folder), reference)


def test_save_over_the_files_the_model_was_loaded_from(tmp_path, bf16_model):
    """A bfloat16 load keeps the file memory-mapped; saving back into the same folder must not corrupt it."""
    folder = tmp_path / "ckpt"
    bf16_model.save_pretrained(folder)
    model = load(folder)
    with torch.no_grad():
        model.query_tokens.add_(1.0)
    expected = {k: v.clone() for k, v in model.state_dict().items()}
    model.save_pretrained(folder, max_shard_size="1MB")  # replaces (and deletes) the mapped model.safetensors
    assert_state_equal(model, expected)
    assert_state_equal(load(folder), expected)


def test_save_into_a_folder_with_older_sharded_bin_loads_the_new_weights(tmp_path):
    folder = copy_checkpoint(tmp_path, VIDEO_CHECKPOINT)
    model = load(folder)
    with torch.no_grad():
        model.query_tokens.add_(1.0)
    model.save_pretrained(folder)  # one model.safetensors: the tiny model fits a single file
    assert torch.equal(load(folder).query_tokens, model.query_tokens)


def test_tied_embeddings_round_trip(tmp_path):
    config = get_preset("tiny")
    config.text_config["tie_word_embeddings"] = True
    torch.manual_seed(0)
    model = OwlForConditionalGeneration(config).eval()
    model.save_pretrained(tmp_path / "tied")
    loaded = load(tmp_path / "tied", torch.float32)
    lm = loaded.language_model
    assert lm.lm_head.weight is lm.model.embed_tokens.weight
    assert_state_equal(loaded, {k: v.detach() for k, v in model.state_dict().items()})


# --- config disagreements and the tokenizer ------------------------------------------------------


@pytest.mark.parametrize("config_width", [4096, 2816])
def test_abstractor_mlp_width_comes_from_the_weights(config_width, tmp_path, model):
    folder = copy_checkpoint(tmp_path)
    config = json.loads((folder / "config.json").read_text())
    assert config["visual_abstractor_config"]["intermediate_size"] == 176
    config["visual_abstractor_config"]["intermediate_size"] = config_width
    (folder / "config.json").write_text(json.dumps(config))
    loaded = load(folder, torch.float32)
    width = torch.load(BF16_FILE, weights_only=True)[ABSTRACTOR_MLP_KEY].shape[0]
    assert width == 176
    assert loaded.config.abstractor.intermediate_size == width
    pixels = torch.randn(2, 3, 56, 56, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(loaded.get_image_features(pixels), model.get_image_features(pixels))


def test_tokenizer_class_mplugowl_and_llama_tokenize_identically(tmp_path, processor):
    image_and_text = [{"type": "image"}, {"type": "text", "text": "Qu'est-ce que c'est ? 猫"}]
    prompts = [
        build_prompt([{"role": "user", "content": image_and_text}]),
        build_prompt([{"role": "user", "content": "Explain  the   meme.\n\tTabs too 🙂"}]),
    ]
    results = {}
    for name in ("MplugOwlTokenizer", "LlamaTokenizer"):
        folder = copy_checkpoint(tmp_path, name=name)
        config = json.loads((folder / "tokenizer_config.json").read_text())
        config["tokenizer_class"] = name
        (folder / "tokenizer_config.json").write_text(json.dumps(config))
        loaded = OwlProcessor.from_pretrained(folder)
        batch = loaded(text=prompts, images=[IMAGES / "image0.jpg"])
        tok = loaded.tokenizer
        results[name] = (batch["input_ids"], tok.bos_token_id, tok.eos_token_id, tok.pad_token_id, len(tok))
    reference = processor(text=prompts, images=[IMAGES / "image0.jpg"])["input_ids"]
    assert torch.equal(results["MplugOwlTokenizer"][0], reference)
    assert torch.equal(results["LlamaTokenizer"][0], reference)
    assert results["MplugOwlTokenizer"][1:] == results["LlamaTokenizer"][1:] == (1, 2, 0, 32000)


# --- peak memory ---------------------------------------------------------------------------------

_SAVE_BIG = """
import sys, torch
from pathlib import Path
from accelerate import init_empty_weights
from openowl import OwlForConditionalGeneration, get_preset

config = get_preset("tiny")
config.text_config.update(
    hidden_size=1024, intermediate_size=2048, num_hidden_layers=6, num_attention_heads=8, num_key_value_heads=8
)
with init_empty_weights():  # skip the random init of 130 M parameters: the values don't matter here
    model = OwlForConditionalGeneration(config)
model = model.to(torch.bfloat16).to_empty(device="cpu")
with torch.no_grad():
    for i, param in enumerate(model.parameters()):
        param.fill_(i / 100)
safe, pickled = Path(sys.argv[1]), Path(sys.argv[2])
model.save_pretrained(safe)
pickled.mkdir()
(pickled / "config.json").write_bytes((safe / "config.json").read_bytes())
torch.save(model.state_dict(), pickled / "pytorch_model.bin")
"""

_MEASURE_LOAD = """
import gc, json, sys, torch
from openowl import OwlForConditionalGeneration

def memory():
    out = {}
    with open("/proc/self/status") as status:
        for line in status:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                out[key] = int(value.split()[0]) * 1024
    return out

dtype = getattr(torch, sys.argv[3])
OwlForConditionalGeneration.from_pretrained(sys.argv[2], dtype=dtype)  # warm-up: lazy imports, allocator pools
gc.collect()
try:
    with open("/proc/self/clear_refs", "w") as refs:
        refs.write("5")  # reset VmHWM to the current RSS
except OSError:
    pass  # then VmHWM may include the warm-up's peak: that only overstates the growth
before = memory()
model = OwlForConditionalGeneration.from_pretrained(sys.argv[1], dtype=dtype)
loaded = memory()
with torch.no_grad():
    for param in model.parameters():
        param.max()  # touch every page: memory-mapped weights become resident
touched = memory()
print(json.dumps({
    "before": before, "loaded": loaded, "touched": touched,
    "weight_bytes": sum(t.numel() * t.element_size() for t in model.state_dict().values()),
    "dtypes": sorted({str(p.dtype) for p in model.parameters()}),
}))
"""


def _start_python(code: str, *args: object) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-c", code, *map(str, args)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def _finish(process: subprocess.Popen) -> str:
    stdout, stderr = process.communicate(timeout=300)
    assert process.returncode == 0, stderr[-3000:]
    return stdout


@pytest.fixture(scope="module")
def load_memory_reports(tmp_path_factory) -> dict[str, dict]:
    """Save a ~260 MB bfloat16 model as model.safetensors and as one pytorch_model.bin (in one process), then load
    each in bfloat16 in its own fresh process (both at once, to save time) and report its memory."""
    if not Path("/proc/self/status").is_file():
        pytest.skip("reads VmRSS/VmHWM from /proc")
    root = tmp_path_factory.mktemp("big")
    folders = {"safetensors": root / "safetensors", "bin": root / "bin"}
    _finish(_start_python(_SAVE_BIG, folders["safetensors"], folders["bin"]))
    assert shard_files(folders["safetensors"]) == ["model.safetensors"]
    running = {fmt: _start_python(_MEASURE_LOAD, folder, CHECKPOINT, "bfloat16") for fmt, folder in folders.items()}
    return {fmt: json.loads(_finish(process).splitlines()[-1]) for fmt, process in running.items()}


@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
def test_loading_bf16_peaks_at_one_copy_of_the_weights(fmt, load_memory_reports):
    report = load_memory_reports[fmt]
    weights = report["weight_bytes"]
    assert 200e6 < weights < 400e6
    assert report["dtypes"] == ["torch.bfloat16"]
    base = report["before"]["VmRSS"]
    ratios = {stage: (report[stage]["VmHWM"] - base) / weights for stage in ("loaded", "touched")}
    print(f"{fmt}: peak RSS growth / weight bytes ({weights / 1e6:.0f} MB): {ratios}")
    assert ratios["loaded"] <= 1.25, report
    assert ratios["touched"] <= 1.25, report


@pytest.mark.parametrize(
    "device_map",
    ["auto", {"vision_model": "cpu", "query_tokens": "cpu", "abstractor": "cpu", "language_model": "cpu"}],
)
def test_device_map_places_every_tensor_and_computes_the_same(device_map, expected, model):
    mapped = OwlForConditionalGeneration.from_pretrained(CHECKPOINT, dtype=torch.float32, device_map=device_map)
    assert {p.device.type for p in mapped.parameters()} == {"cpu"}
    inputs = {k: expected[f"one_image.{k}"] for k in ("input_ids", "pixel_values")}
    with torch.no_grad():
        assert torch.equal(mapped(**inputs).logits, model(**inputs).logits)


def test_device_map_missing_a_module_is_an_error():
    with pytest.raises(CheckpointError, match="places no module"):
        OwlForConditionalGeneration.from_pretrained(CHECKPOINT, device_map={"vision_model": "cpu"})
