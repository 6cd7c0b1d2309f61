"""The server's settings as plain dataclasses (no web dependencies: the CLI reads the defaults from here)."""

from __future__ import annotations

from dataclasses import dataclass, field

from openowl.infer.sampling import SamplingParams

LOOPBACK_NAMES = ("127.0.0.1", "localhost")


@dataclass(frozen=True)
class MediaPolicy:
    """What media a request may bring."""

    max_image_pixels: int = 50_000_000  # width × height of one image or video frame, read from the header
    max_media_bytes: int = 32 * 1024 * 1024  # one fetched image or video
    allow_hosts: frozenset[str] = frozenset()  # hosts that http(s) media URLs may name; empty: none
    fetch_timeout: float = 10.0


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
    max_images: int = 8  # images and videos per request
    max_prompt_tokens: int = 4096  # visual tokens included; also capped by the model's context
    max_output_tokens: int = 1024  # the largest max_tokens a request may ask for
    media: MediaPolicy = field(default_factory=MediaPolicy)
    retry_after: int = 1  # seconds, in a 429's Retry-After


def loopback_hosts(bind_host: str) -> tuple[str, ...] | None:
    """The Host headers to accept for a bind address: loopback names only when bound to loopback (so a web page
    can't reach the server by rebinding its own domain to 127.0.0.1), any otherwise."""
    return LOOPBACK_NAMES if bind_host in LOOPBACK_NAMES else None
