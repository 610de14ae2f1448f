"""Video inputs for VLM prompts: frame sampling (by count or by rate) and reading a clip from disk.

A record's ``video`` is either a folder of frame images (PNG / JPEG / BMP / WebP, read with Pillow: the core
install) whose frame rate the record (``video_fps``) or ``data.video.frames_fps`` gives, or a video file read
with PyAV (``pip install gen-rl[video]``). Frame ``i`` of a source at ``r`` frames per second shows time
``i / r``; a source of ``n`` frames lasts ``n / r`` seconds.

Sampling (:func:`sample_frame_indices`) picks the frame at the centre of each of ``num_frames`` equal segments
of the clip, or, by rate, the frame at the centre of each ``1 / fps`` window; ``max_frames`` caps either (the
count rule then applies with ``max_frames``). The sampled frames' rate (``count / duration``) goes to the
processor, which Qwen2.5-VL turns into the seconds each temporal patch spans (``second_per_grid_ts``).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

__all__ = [
    "FRAME_SUFFIXES",
    "VideoClip",
    "VideoSampling",
    "frame_files",
    "read_video",
    "sample_frame_indices",
]

FRAME_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")


@dataclass(frozen=True)
class VideoSampling:
    """How frames are drawn from a clip: ``num_frames`` evenly (when > 0) or ``fps`` frames per second,
    at most ``max_frames`` (0 = no cap); ``frames_fps`` is the rate of frame folders whose record gives none."""

    num_frames: int = 0
    fps: float = 2.0
    max_frames: int = 0
    frames_fps: float = 1.0


@dataclass
class VideoClip:
    """Frames sampled from one video.

    Attributes:
        frames: the sampled frames (RGB), in time order.
        indices: the source index of each sampled frame.
        source_fps: frame rate of the source.
        num_source_frames: frames in the whole source.
        path: where the video was read from.
    """

    frames: list[Image.Image]
    indices: list[int]
    source_fps: float
    num_source_frames: int
    path: str = ""

    @property
    def duration(self) -> float:
        """Seconds of the whole source video."""
        return self.num_source_frames / self.source_fps

    @property
    def timestamps(self) -> list[float]:
        """Time in seconds of each sampled frame."""
        return [index / self.source_fps for index in self.indices]

    @property
    def sampled_fps(self) -> float:
        """Frames per second of the sampled frames (``count / duration``)."""
        return len(self.frames) / self.duration

    def metadata(self) -> dict:
        """The clip as transformers' ``VideoMetadata`` fields (the processor derives frame times from it)."""
        return {
            "total_num_frames": self.num_source_frames,
            "fps": self.source_fps,
            "duration": self.duration,
            "frames_indices": list(self.indices),
        }


def sample_frame_indices(
    num_source_frames: int, source_fps: float, num_frames: int = 0, fps: float = 0.0, max_frames: int = 0
) -> list[int]:
    """Indices of the source frames to keep, in increasing order.

    By count (``num_frames = k > 0``): frame ``floor((j + 1/2) n / k)`` for ``j < k``, the centre of each of ``k``
    equal segments of the ``n`` source frames (``k`` capped at ``n``). By rate (``fps > 0``): the frame showing
    ``t_j = (j + 1/2) / fps`` (index ``floor(t_j r)``) for every ``t_j`` inside the clip (the middle frame of
    a clip shorter than half a window), each source frame at most once. ``max_frames > 0`` caps either by the
    count rule.
    """
    if num_source_frames < 1:
        raise ValueError("the video has no frames")
    if not source_fps > 0:
        raise ValueError(f"the video's frame rate must be > 0, got {source_fps}")
    if num_frames > 0:
        count = min(num_frames, num_source_frames)
    elif fps > 0:
        duration = num_source_frames / source_fps
        if 0.5 / fps >= duration:  # shorter than half a window: its middle frame
            return [num_source_frames // 2]
        windows = math.ceil(duration * fps - 0.5)  # windows whose centre lies inside the clip
        picked = [min(int((j + 0.5) / fps * source_fps), num_source_frames - 1) for j in range(windows)]
        indices = sorted(set(picked))
        if not max_frames or len(indices) <= max_frames:
            return indices
        count = max_frames
    else:
        raise ValueError("set data.video.num_frames > 0 or data.video.fps > 0 to sample video frames")
    if max_frames > 0:
        count = min(count, max_frames)
    return [int((j + 0.5) * num_source_frames / count) for j in range(count)]


def _natural_key(path: Path) -> list:
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", path.name)]


def frame_files(folder: str | Path) -> list[Path]:
    """The frame images of a folder in natural order (``frame_2`` before ``frame_10``)."""
    folder = Path(folder)
    files = [path for path in folder.iterdir() if path.suffix.lower() in FRAME_SUFFIXES]
    if not files:
        raise ValueError(
            f"video folder {str(folder)!r} holds no frame images ({', '.join(FRAME_SUFFIXES)}); "
            "a video is a folder of frames or a video file"
        )
    return sorted(files, key=_natural_key)


def read_video(path: str | Path, sampling: VideoSampling, frames_fps: float = 0.0) -> VideoClip:
    """Read the sampled frames of a video folder or file; ``frames_fps`` (the record's ``video_fps``)
    overrides ``sampling.frames_fps`` for a folder."""
    path = Path(path)
    if path.is_dir():
        return _read_folder(path, sampling, frames_fps or sampling.frames_fps)
    if path.is_file():
        return _read_file(path, sampling)
    raise FileNotFoundError(
        f"video {str(path)!r} does not exist; check the record's 'video' and data.image_root"
    )


def _indices(count: int, rate: float, sampling: VideoSampling) -> list[int]:
    return sample_frame_indices(count, rate, sampling.num_frames, sampling.fps, sampling.max_frames)


def _read_folder(folder: Path, sampling: VideoSampling, rate: float) -> VideoClip:
    files = frame_files(folder)
    indices = _indices(len(files), rate, sampling)
    frames = []
    for index in indices:
        with Image.open(files[index]) as image:
            frames.append(image.convert("RGB"))
    return VideoClip(frames, indices, rate, len(files), str(folder))


def _read_file(path: Path, sampling: VideoSampling) -> VideoClip:
    try:
        import av
    except ImportError as error:
        raise ImportError(
            f"reading the video file {str(path)!r} needs PyAV: pip install 'gen-rl[video]' "
            "(or give the video as a folder of frame images, which needs nothing extra)"
        ) from error
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        rate = float(stream.average_rate or stream.guessed_rate or 0)
        count = int(stream.frames or 0)  # from the container header where it has one
    if not rate > 0:
        raise ValueError(f"video file {str(path)!r} reports no frame rate; convert it to a folder of frames")
    if count <= 0:
        count = _count_frames(av, path)
    indices = _indices(count, rate, sampling)
    by_index = _decode_frames(av, path, indices)
    if len(by_index) < len(indices):  # the header over-counted: count by decoding, then pick again
        count = _count_frames(av, path)
        indices = _indices(count, rate, sampling)
        by_index = _decode_frames(av, path, indices)
    return VideoClip([by_index[index] for index in indices], indices, rate, count, str(path))


def _count_frames(av, path: Path) -> int:
    with av.open(str(path)) as container:
        return sum(1 for _ in container.decode(container.streams.video[0]))


def _decode_frames(av, path: Path, indices: list[int]) -> dict[int, Image.Image]:
    """The frames at ``indices`` (sorted), decoding the file once up to the last of them."""
    wanted, frames = set(indices), {}
    with av.open(str(path)) as container:
        for index, frame in enumerate(container.decode(container.streams.video[0])):
            if index in wanted:
                frames[index] = frame.to_image().convert("RGB")
            if index >= indices[-1]:
                break
    return frames
