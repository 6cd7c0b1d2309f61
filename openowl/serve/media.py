"""Images and videos from request parts, refused before they cost anything: `data:` URIs (base64) always, `http(s)`
URLs only from hosts on the allow-list (the server never fetches from a host it was not told to trust), `file:` and
every other scheme never. An image's size is read from its header and checked against the pixel limit before a
single pixel is decoded (decompression bombs), and decoding errors of any kind become a 400 naming the part.
Base64 is decoded in a worker thread (as the handler decodes images), never on the event loop, and a MiB at a time,
so that the loop's thread gets the GIL in between; a fetch has one
deadline for the whole of it, so a host that dribbles bytes can't hold a request longer.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import io
import re
import tempfile
from urllib.parse import urlsplit

import httpx
from PIL import Image
from starlette.concurrency import run_in_threadpool

from openowl.processing import to_rgb
from openowl.serve.config import MediaPolicy
from openowl.serve.errors import APIError

_PIECE = 1 << 20  # base64 characters decoded at a time (a multiple of 4)
_DATA_URI = re.compile(r"data:(?P<mime>[\w.+-]+/[\w.+-]+)?(?:;[\w.+-]+=[\w.+-]+)*;base64,(?P<data>.*)", re.DOTALL)


async def read_media(url: str, param: str, policy: MediaPolicy) -> bytes:
    """The bytes a `data:` URI holds, or those an allowed `http(s)` URL serves (no redirects followed).

    Raises:
        APIError: a scheme that is refused, a host not allowed, bad base64, a fetch that fails, is too large or
            takes longer than `policy.fetch_timeout`.
    """
    scheme = url.split(":", 1)[0].lower() if ":" in url else ""
    if scheme == "data":
        return await run_in_threadpool(_decode_data_uri, url, param)
    if scheme in ("http", "https"):
        host = (urlsplit(url).hostname or "").lower()
        if host not in policy.allow_hosts:
            raise APIError(400, f"{param}: remote media URLs are refused (host {host!r} is not allowed; send a data: "
                           "URI, or start the server with --allow-image-host)", "url_not_allowed", param)  # fmt: skip
        return await _fetch(url, param, policy)
    raise APIError(400, f"{param}: only data: URIs (base64) and allowed http(s) URLs are accepted, not "
                   f"{scheme + ':' if scheme else 'this'} URL", "url_not_allowed", param)  # fmt: skip


def _decode_data_uri(url: str, param: str) -> bytes:
    match = _DATA_URI.fullmatch(url)
    if not match:
        raise APIError(400, f"{param}: a data: URI must be base64, as data:image/png;base64,...", "invalid_data_uri",
                       param)  # fmt: skip
    try:
        return b64decode(match["data"])
    except (binascii.Error, ValueError):
        raise APIError(400, f"{param}: the data: URI is not valid base64", "invalid_data_uri", param) from None


def b64decode(data: str) -> bytes:
    """Strict base64 (as `base64.b64decode(data, validate=True)`), decoded a MiB at a time: one call would hold the
    GIL for the whole string (a quarter of a second for 20 MB), and the event loop's thread with it.

    Raises:
        binascii.Error: not base64, or padding before the end.
    """
    pieces = []
    for start in range(0, len(data), _PIECE):
        piece = data[start : start + _PIECE]
        if start + _PIECE < len(data) and "=" in piece:
            raise binascii.Error("padding before the end of the data")
        pieces.append(base64.b64decode(piece, validate=True))
    return b"".join(pieces)


async def _fetch(url: str, param: str, policy: MediaPolicy) -> bytes:
    try:
        async with asyncio.timeout(policy.fetch_timeout):  # the whole fetch; httpx's timeout is per connect or read
            return await _fetch_within(url, param, policy)
    except TimeoutError:
        raise APIError(400, f"{param}: fetching the URL took longer than {policy.fetch_timeout:g} s", "fetch_failed",
                       param) from None  # fmt: skip


async def _fetch_within(url: str, param: str, policy: MediaPolicy) -> bytes:
    try:
        async with (
            httpx.AsyncClient(follow_redirects=False, timeout=policy.fetch_timeout) as client,
            client.stream("GET", url) as response,
        ):
            if response.status_code != 200:
                raise APIError(400, f"{param}: fetching the URL gave HTTP {response.status_code}", "fetch_failed",
                               param)  # fmt: skip
            data = bytearray()
            async for piece in response.aiter_bytes():
                data += piece
                if len(data) > policy.max_media_bytes:
                    raise APIError(400, f"{param}: the fetched file is larger than {policy.max_media_bytes} bytes",
                                   "media_too_large", param)  # fmt: skip
            return bytes(data)
    except httpx.HTTPError as err:
        raise APIError(400, f"{param}: fetching the URL failed ({type(err).__name__})", "fetch_failed", param) from None


def open_image(data: bytes, param: str, max_pixels: int, size: int | None = None) -> Image.Image:
    """Bytes -> an upright RGB image, after checking the header's width × height against `max_pixels`.

    With `size`, the image is squash-resized to `size`×`size` (bicubic) at once, as the processor would do later
    (which then leaves it unchanged): a request waiting in the queue holds only that many pixels.

    Raises:
        APIError: not an image, a truncated or corrupt one, or one with too many pixels.
    """
    try:
        image = Image.open(io.BytesIO(data))  # reads the header only
    except Image.DecompressionBombError:  # PIL's own limit (twice Image.MAX_IMAGE_PIXELS)
        raise _too_large(param, "the image", None, max_pixels) from None
    except Exception:  # an untrusted file through a complex decoder: any failure is the file's
        raise APIError(400, f"{param}: not a decodable image", "invalid_image", param) from None
    width, height = image.size
    if width * height > max_pixels:
        raise _too_large(param, "the image", (width, height), max_pixels)
    try:
        image.load()
        image = to_rgb(image)
    except Exception:
        raise APIError(400, f"{param}: the image could not be decoded (truncated or corrupt)", "invalid_image",
                       param) from None  # fmt: skip
    return image if size is None else image.resize((size, size), Image.BICUBIC)


def open_video(data: bytes, param: str, max_pixels: int, num_frames: int = 4, size: int = 224) -> list[Image.Image]:
    """Bytes of a video file -> `num_frames` frames (as `openowl/video.py` samples them), after checking the frame size.

    Raises:
        APIError: PyAV missing, not a video, or frames with too many pixels.
    """
    try:
        import av
    except ImportError:
        raise APIError(400, f"{param}: this server cannot read videos (PyAV is not installed)", "video_not_supported",
                       param) from None  # fmt: skip
    from openowl.video import load_video_frames

    with tempfile.NamedTemporaryFile(suffix=".video") as file:
        file.write(data)
        file.flush()
        try:
            with av.open(file.name) as container:
                if not container.streams.video:
                    raise ValueError("no video stream")
                stream = container.streams.video[0]
                width, height = stream.codec_context.width, stream.codec_context.height
            if width * height > max_pixels:
                raise _too_large(param, "the video's frames", (width, height), max_pixels)
            return load_video_frames(file.name, num_frames=num_frames, size=size)
        except APIError:
            raise
        except Exception:
            raise APIError(400, f"{param}: not a decodable video", "invalid_video", param) from None


def _too_large(param: str, what: str, size: tuple[int, int] | None, max_pixels: int) -> APIError:
    shape = f" ({size[0]}x{size[1]} = {size[0] * size[1]} pixels)" if size else ""
    return APIError(400, f"{param}: {what} has too many pixels{shape}; the limit is {max_pixels} (--max-image-pixels)",
                    "image_too_large", param)  # fmt: skip
