"""Starting the server from the command line: its flags, the `ServeConfig` they make, and the uvicorn run."""

from __future__ import annotations

import argparse
import os
import re
import sys
from collections.abc import Callable
from pathlib import Path

from openowl.infer.engine import Engine
from openowl.infer.sampling import SamplingParams
from openowl.serve.config import MediaPolicy, ServeConfig, loopback_hosts

POSITIVE_LIMITS = ("max_batch_size", "max_queue", "max_body_bytes", "max_inflight_bytes", "max_image_pixels",
                   "max_prompt_tokens", "max_output_tokens", "prefill_chunk")  # fmt: skip


def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("server")
    group.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    group.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    group.add_argument("--api-key", help="require `Authorization: Bearer KEY` (default: $OPENOWL_API_KEY, else none)")
    group.add_argument("--served-model-name", help="the model's name in the API (default: the --model folder's name)")
    group.add_argument(
        "--allow-image-host",
        action="append",
        default=[],
        metavar="HOST",
        help="a host that http(s) image URLs may name (repeatable); by default only data: URIs are accepted",
    )
    group.add_argument(
        "--cors-origin",
        action="append",
        default=[],
        metavar="ORIGIN",
        help="a web origin (as https://app.example) whose pages may call the API from a browser (repeatable; CORS); "
        "by default none",
    )
    group.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    limits = parser.add_argument_group("batching and limits (the defaults are in brackets)")
    for flag, default, help_ in (
        ("--max-batch-size", ServeConfig.max_batch_size, "rows decoded together"),
        ("--max-queue", ServeConfig.max_queue, "requests that may wait for a place; beyond, 429"),
        ("--max-body-bytes", ServeConfig.max_body_bytes, "request body size"),
        ("--max-inflight-bytes", ServeConfig.max_inflight_bytes, "body bytes read or decoded at once; beyond, 503"),
        ("--max-images", ServeConfig.max_images, "images and videos per request"),
        ("--max-image-pixels", MediaPolicy.max_image_pixels, "width x height of an image or frame, from its header"),
        ("--max-prompt-tokens", ServeConfig.max_prompt_tokens, "prompt tokens, visual tokens included"),
        ("--max-output-tokens", ServeConfig.max_output_tokens, "the largest max_tokens a request may ask for"),
        ("--prefill-chunk", ServeConfig.prefill_chunk, "prompt tokens prefilled per step, between decoding steps"),
    ):
        limits.add_argument(flag, type=int, default=default, help=f"{help_} [{default}]")


def serve_config(args: argparse.Namespace, defaults: SamplingParams) -> ServeConfig:
    """The server's settings from its flags.

    Raises:
        ValueError: a limit out of range, naming its flag.
    """
    for name in POSITIVE_LIMITS:
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be ≥ 1")
    if args.max_images < 0:
        raise ValueError("--max-images must be ≥ 0")
    if args.max_inflight_bytes < args.max_body_bytes:
        raise ValueError(f"--max-inflight-bytes ({args.max_inflight_bytes}) must be ≥ --max-body-bytes "
                         f"({args.max_body_bytes}), or no request of the largest size could be read")  # fmt: skip
    for origin in args.cors_origin:
        if origin != "*" and not re.fullmatch(r"https?://[^/\s]+", origin):
            raise ValueError(f"--cors-origin {origin!r} is not an origin: give scheme://host[:port], without a path")
    model = Path(args.model)
    media = MediaPolicy(
        max_image_pixels=args.max_image_pixels,
        max_media_bytes=args.max_body_bytes,
        allow_hosts=frozenset(host.lower() for host in args.allow_image_host),
    )
    return ServeConfig(
        model_name=args.served_model_name or (model.name if model.exists() else args.model),
        api_key=args.api_key or os.environ.get("OPENOWL_API_KEY") or None,
        allowed_hosts=loopback_hosts(args.host),
        defaults=defaults,
        max_batch_size=args.max_batch_size,
        max_queue=args.max_queue,
        max_body_bytes=args.max_body_bytes,
        max_inflight_bytes=args.max_inflight_bytes,
        prefill_chunk=args.prefill_chunk,
        max_images=args.max_images,
        max_prompt_tokens=args.max_prompt_tokens,
        max_output_tokens=args.max_output_tokens,
        media=media,
        cors_origins=tuple(args.cors_origin),
    )


def run_server(args: argparse.Namespace, config: ServeConfig, make_engine: Callable[[], Engine]) -> int:
    """Serve the HTTP API until interrupted."""
    try:
        import uvicorn

        from openowl.serve.app import create_app
    except ImportError as err:
        raise ImportError(f"serving needs the serve extra: pip install -e '.[serve]' ({err})") from err
    if config.allowed_hosts is None and config.api_key is None:
        print(f"openowl: warning: serving on {args.host} without --api-key: anyone who reaches it can use it",
              file=sys.stderr)  # fmt: skip
    app = create_app(make_engine(), config)
    host = f"[{args.host}]" if ":" in args.host else args.host
    url = f"http://{'127.0.0.1' if args.host in ('0.0.0.0', '::') else host}:{args.port}"
    print(f"openowl serve: {config.model_name!r} at {url}/v1", file=sys.stderr, flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)
    return 0
