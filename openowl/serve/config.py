"""The server's settings as plain dataclasses (no web dependencies: the CLI reads the defaults from here)."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field

from openowl.infer.sampling import SamplingParams

LOOPBACK_NAMES = ("127.0.0.1", "localhost")


@dataclass(frozen=True)
class MediaPolicy:
    """What media a request may bring."""

    max_image_pixels: int = 50_000_000  # width × height of one image or video frame, read from the header
    max_media_bytes: int = 32 * 1024 * 1024  # one fetched image or video
    allow_hosts: frozenset[str] = frozenset()  # hosts that http(s) media URLs may name; empty: none
    fetch_timeout: float = 10.0  # seconds for a whole fetch (connecting, every read), not per read


@dataclass(frozen=True)
class ServeConfig:
    """The server's identity, security settings and limits (the CLI's flags, one to one)."""

    model_name: str
    api_key: str | None = None  # when set, /v1/* and /metrics need `Authorization: Bearer <key>`
    allowed_hosts: tuple[str, ...] | None = None  # Host headers accepted (DNS rebinding); None: any
    defaults: SamplingParams = field(default_factory=lambda: SamplingParams(max_new_tokens=256))
    max_batch_size: int = 8
    max_queue: int = 32
    max_body_bytes: int = 32 * 1024 * 1024
    max_inflight_bytes: int = 128 * 1024 * 1024  # bodies being read, parsed or decoded at once; beyond, 503
    prefill_chunk: int = 256  # prompt tokens prefilled per step, between the running rows' decoding steps
    max_images: int = 8  # images and videos per request
    max_prompt_tokens: int = 4096  # visual tokens included; also capped by the model's context
    max_output_tokens: int = 1024  # the largest max_tokens a request may ask for
    media: MediaPolicy = field(default_factory=MediaPolicy)
    retry_after: int = 1  # seconds, in a 429's (or 503's) Retry-After
    cors_origins: tuple[str, ...] = ()  # browser origins allowed to call the API (CORS); empty: none


def loopback_hosts(bind_host: str) -> tuple[str, ...] | None:
    """The Host headers to accept for a bind address: when bound to loopback (127.0.0.0/8, ::1, localhost), only
    loopback names, the bound address among them (so a web page can't reach the server by rebinding its own domain
    to a loopback address); any otherwise. A name is accepted with any port (`127.0.0.2:8000`, `[::1]:8000`)."""
    name = bind_host.strip().lower()
    if name == "localhost":
        return (*LOOPBACK_NAMES, "[::1]")
    try:
        address = ipaddress.ip_address(name.strip("[]"))
    except ValueError:
        return None
    if not address.is_loopback:
        return None
    bound = f"[{address}]" if address.version == 6 else str(address)
    return tuple(dict.fromkeys((*LOOPBACK_NAMES, "[::1]", bound)))
