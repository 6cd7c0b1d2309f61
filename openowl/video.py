"""Video files -> frames, sampled as the upstream video processor samples them (decoded with PyAV)."""

from __future__ import annotations

from pathlib import Path

from PIL import Image


def segment_centre_indices(num_total: int, num_frames: int) -> list[int]:
    """Upstream's sampling: split [0, N-1] into `num_frames` segments and take (about) the centre of each."""
    segment = (num_total - 1) / num_frames
    start = int(segment / 2)
    return [min(num_total - 1, start + round(segment * k)) for k in range(num_frames)]


def load_video_frames(path: str | Path, num_frames: int = 4, size: int = 224) -> list[Image.Image]:
    """Decode a video file and return `num_frames` RGB frames squash-resized to `size`×`size`, as upstream's
    decord reader does (it decodes at 224×224).

    Raises:
        ImportError: PyAV is not installed (`pip install 'openowl[video]'`).
        FileNotFoundError: no such file.
        ValueError: a file PyAV can't decode, or one without video frames.
    """
    try:
        import av
    except ImportError as err:
        raise ImportError("reading video files needs PyAV: pip install 'openowl[video]' (or: pip install av)") from err
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such video file")
    # Two passes (count, then convert only the chosen frames): holding every decoded frame of a long video as an
    # RGB image would take gigabytes.
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise ValueError(f"{path}: has no video stream")
            total = sum(1 for _ in container.decode(video=0))
        if not total:
            raise ValueError(f"{path}: no frames could be decoded")
        wanted = segment_centre_indices(total, num_frames)
        chosen: dict[int, Image.Image] = {}
        with av.open(str(path)) as container:
            for index, frame in enumerate(container.decode(video=0)):
                if index in wanted:
                    chosen[index] = frame.to_image()
                if index >= wanted[-1]:
                    break
    except av.error.FFmpegError as err:
        raise ValueError(f"{path}: not a readable video ({err})") from err
    return [chosen[i].convert("RGB").resize((size, size), Image.BICUBIC) for i in wanted]
