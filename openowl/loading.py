"""From a name to a loaded model: a local checkpoint folder, a built-in model (`owl-small`, assembled once into
the openowl cache) or a Hugging Face hub id (downloaded once into the hub cache).

This is the loader that `OwlForConditionalGeneration.from_pretrained` / `save_pretrained` and
`OwlProcessor.from_pretrained` reach through their one lazy import; everything above the model layer imports it
directly.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from openowl import checkpoint, owl_small
from openowl.model.owl import OwlForConditionalGeneration
from openowl.processing import OwlProcessor

HUB_FILES = ["*.json", "*.model", "*.safetensors", "*.bin", "*.txt", "*.jinja"]
HUB_ID = re.compile(r"[\w.-]+/[\w.-]+")


def resolve_checkpoint(path_or_id: str | Path, revision: str | None = None) -> Path:
    """The checkpoint folder of a local path, a built-in model, or a hub id.

    Raises:
        FileNotFoundError: for a local path that doesn't exist or isn't a checkpoint folder.
        OSError: when a hub id can't be fetched (offline, unknown repo), saying what to do instead.
        MissingPartError: a built-in model whose parts' packages are not installed, saying what to install.
    """
    path = Path(path_or_id).expanduser()
    if str(path_or_id) in owl_small.BUILTIN_MODELS and not path.exists():
        return owl_small.resolve(str(path_or_id))
    if path.exists():
        return checkpoint.checkpoint_folder(path)
    name = str(path_or_id)
    if not HUB_ID.fullmatch(name):
        raise FileNotFoundError(f"{name}: no such checkpoint folder (and not a hub id of the form owner/name)")
    return _download(name, revision)


def _download(repo_id: str, revision: str | None) -> Path:
    from huggingface_hub import constants, list_repo_files, snapshot_download

    if not constants.HF_HUB_OFFLINE and not hub_reachable(constants.ENDPOINT):
        return _from_cache(repo_id, revision, f"the hub ({constants.ENDPOINT}) can't be reached")
    patterns = HUB_FILES
    try:  # fetch one weight format: safetensors where the repo has them
        if any(name.endswith(".safetensors") for name in list_repo_files(repo_id, revision=revision)):
            patterns = [p for p in HUB_FILES if p != "*.bin"]
    except Exception:  # offline or unlisted: snapshot_download below says what is wrong, or uses the cache
        pass
    try:
        return Path(snapshot_download(repo_id, revision=revision, allow_patterns=patterns))
    except Exception as err:  # the hub client raises many types: offline, 404, gated, HTTP errors
        raise OSError(_hub_error(repo_id, f"{type(err).__name__}: {err}")) from err


def hub_reachable(endpoint: str, timeout: float = 3.0) -> bool:
    """Whether a TCP connection to the hub's host opens within `timeout` seconds: a machine without a network
    answers in seconds here, where the hub client would retry for half a minute."""
    import os
    import socket
    from urllib.parse import urlsplit

    if any(os.environ.get(k) for k in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY")):
        return True  # through a proxy: the hub client knows the way, a direct probe doesn't
    url = urlsplit(endpoint)
    try:
        with socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)), timeout):
            return True
    except OSError:
        return False


def _from_cache(repo_id: str, revision: str | None, why: str) -> Path:
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id, revision=revision, allow_patterns=HUB_FILES, local_files_only=True))
    except Exception as err:
        raise OSError(_hub_error(repo_id, f"{why}, and it is not in the local cache")) from err


def _hub_error(repo_id: str, why: str) -> str:
    why = " ".join(why.split())  # one line: the hub client's messages span several
    return (
        f"could not fetch {repo_id!r} from the Hugging Face hub ({why}). "
        "Check the network (or HF_HUB_OFFLINE), or download the checkpoint and pass its local folder."
    )


def load_model(
    path_or_id: str | Path,
    dtype: torch.dtype | str = torch.float32,
    device: str | torch.device = "cpu",
    revision: str | None = None,
    device_map: str | dict[str, str | int] | None = None,
    max_memory: dict[str | int, str | int] | None = None,
) -> OwlForConditionalGeneration:
    """The model of a folder, built-in name or hub id; see `checkpoint.load_model` for the arguments."""
    folder = resolve_checkpoint(path_or_id, revision)
    return checkpoint.load_model(folder, dtype=dtype, device=device, device_map=device_map, max_memory=max_memory)


def save_model(model: OwlForConditionalGeneration, folder: str | Path, max_shard_size: str | int = "2GB") -> None:
    """`checkpoint.save_model`: sharded safetensors and config.json, written atomically."""
    checkpoint.save_model(model, folder, max_shard_size=max_shard_size)


def load_processor(path_or_id: str | Path, revision: str | None = None) -> OwlProcessor:
    """The processor of a folder, built-in name or hub id."""
    return OwlProcessor.from_folder(resolve_checkpoint(path_or_id, revision))


def load_pretrained(
    path_or_id: str | Path, dtype: torch.dtype | str = torch.float32, device: str | torch.device = "cpu"
) -> tuple[OwlForConditionalGeneration, OwlProcessor]:
    """Model and processor of one checkpoint, resolved once."""
    folder = resolve_checkpoint(path_or_id)
    return checkpoint.load_model(folder, dtype=dtype, device=device), OwlProcessor.from_folder(folder)
