"""Video files in and out: MP4 and GIF writers, a reader, and a frame-strip image (torch-free at import).

- ``write_mp4``: H.264 (yuv420p, playable in browsers and players) through imageio with the ffmpeg binary that
  the ``imageio-ffmpeg`` wheel bundles (no system ffmpeg needed);
- ``write_gif``: Pillow's GIF writer (256-colour palette per frame, loops forever);
- ``read_video``: any container ffmpeg decodes (MP4, GIF, WebM, ...) through PyAV (``av``). PyAV rather than
  decord because PyAV publishes wheels for every supported Python on Linux, macOS (arm64 and x86) and Windows,
  while decord's last wheels are for Python <= 3.10 on Linux / x86 macOS (none for macOS arm64);
- ``frame_strip``: frames side by side as one PIL image (the PNG an evaluation writes beside each video).

Frames are ``[T, H, W, C]`` (C = 3, or 1 / none for grey) uint8, or float in [0, 1]; a torch tensor also may
be the sampler layout of one sample, ``[3, T, H, W]`` (``rollout.pixels[i]``). numpy and Pillow are imported at
the top; imageio and av on first use; torch never (a tensor is converted through its own ``.numpy()``).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

DEFAULT_FPS = 16  # Wan's frame rate (HunyuanVideo: 24)
MP4_CRF = 12  # x264 constant-rate factor: visually lossless for generated clips (default 23)


def to_uint8_frames(frames: Any) -> np.ndarray:
    """Frames as a contiguous ``[T, H, W, 3]`` uint8 array.

    Accepts ``[T, H, W, 3]`` / ``[T, H, W, 1]`` / ``[T, H, W]`` arrays or tensors (uint8, or float in [0, 1],
    rounded), or a tensor in the sampler layout ``[3, T, H, W]`` (recognised by a first dim of 3 and a last dim
    that is not 1 or 3). Grey frames are repeated to RGB.
    """
    is_tensor = hasattr(frames, "detach") and hasattr(frames, "cpu")
    if is_tensor:
        frames = frames.detach().cpu()
        if frames.dtype.is_floating_point:
            frames = frames.float()
        frames = frames.numpy()
    array = np.asarray(frames)
    if is_tensor and array.ndim == 4 and array.shape[0] == 3 and array.shape[-1] not in (1, 3):
        array = array.transpose(1, 2, 3, 0)  # [3, T, H, W] -> [T, H, W, 3]
    if array.ndim == 3:
        array = array[..., None]
    if array.ndim != 4 or array.shape[-1] not in (1, 3) or array.shape[0] < 1:
        raise ValueError(
            f"frames must be [T, H, W, 3] (or a [3, T, H, W] tensor of one sample); got shape {array.shape}"
        )
    if array.shape[-1] == 1:
        array = np.repeat(array, 3, axis=-1)
    if array.dtype == np.uint8:
        return np.ascontiguousarray(array)
    if not np.issubdtype(array.dtype, np.floating):
        raise ValueError(f"frames must be uint8 or float in [0, 1]; got {array.dtype}")
    return np.ascontiguousarray((np.clip(array, 0.0, 1.0) * 255.0).round().astype(np.uint8))


def write_mp4(frames: Any, path: str | os.PathLike, fps: float = DEFAULT_FPS) -> Path:
    """Write an H.264 MP4 (yuv420p, CRF 12) with imageio's bundled ffmpeg; returns the path.

    yuv420p halves the chroma resolution, so height and width must be even (every generator's sizes are).
    """
    import imageio.v2 as imageio

    array = to_uint8_frames(frames)
    height, width = array.shape[1:3]
    if height % 2 or width % 2:
        raise ValueError(
            f"MP4 (H.264, yuv420p) needs even frame sides; got {height}x{width}. Crop or pad the frames, or "
            "use write_gif"
        )
    path = _prepared(path)
    writer = imageio.get_writer(
        str(path),
        format="FFMPEG",
        mode="I",
        fps=fps,
        codec="libx264",
        pixelformat="yuv420p",
        macro_block_size=1,  # never resize (imageio would pad sides up to multiples of 16)
        output_params=["-crf", str(MP4_CRF)],
        ffmpeg_log_level="error",
    )
    try:
        for frame in array:
            writer.append_data(frame)
    finally:
        writer.close()
    return path


def write_gif(frames: Any, path: str | os.PathLike, fps: float = DEFAULT_FPS) -> Path:
    """Write a looping GIF with Pillow; returns the path.

    GIF stores frame delays in centiseconds, so the rate is rounded to 100 / round(100 / fps) (at most 50 fps:
    browsers slow shorter delays down). Pillow stores a frame identical to the one before it as a longer delay
    of that one (the clip plays the same, a reader sees one frame fewer).
    """
    array = to_uint8_frames(frames)
    path = _prepared(path)
    images = [Image.fromarray(frame) for frame in array]
    delay_ms = 10 * max(2, round(100 / fps))
    images[0].save(
        path,
        format="GIF",
        save_all=True,
        append_images=images[1:],
        duration=[delay_ms] * len(images),
        loop=0,
        optimize=False,
        disposal=1,
    )
    return path


def read_video(path: str | os.PathLike, max_frames: int | None = None) -> np.ndarray:
    """Decode a video file (MP4, GIF, WebM, ...) with PyAV to ``[T, H, W, 3]`` uint8 RGB frames."""
    import av

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no video file at {path.resolve()}")
    frames = []
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise ValueError(f"{path} has no video stream")
            for frame in container.decode(video=0):
                frames.append(frame.to_ndarray(format="rgb24"))
                if max_frames is not None and len(frames) >= max_frames:
                    break
    except av.error.FFmpegError as error:  # type: ignore[attr-defined]
        raise ValueError(f"cannot decode the video {path}: {error}") from error
    if not frames:
        raise ValueError(f"{path} has no decodable frames")
    return np.stack(frames)


def frame_strip(frames: Any, max_frames: int | None = 8, gap: int = 0) -> Image.Image:
    """Frames side by side, left to right, as one RGB PIL image (``max_frames`` evenly spaced ones; None: all)."""
    array = to_uint8_frames(frames)
    if max_frames is not None and len(array) > max_frames:
        indices = np.linspace(0, len(array) - 1, max_frames).round().astype(int)
        array = array[indices]
    count, height, width = array.shape[:3]
    strip = np.full((height, count * width + (count - 1) * gap, 3), 255, dtype=np.uint8)
    for index, frame in enumerate(array):
        start = index * (width + gap)
        strip[:, start : start + width] = frame
    return Image.fromarray(strip)


def tracker_video(frames: Any) -> np.ndarray:
    """Frames as ``[T, 3, H, W]`` uint8, the layout ``wandb.Video`` takes (TensorBoard's ``add_video`` wants
    ``[N, T, C, H, W]``: add a leading axis)."""
    return np.ascontiguousarray(to_uint8_frames(frames).transpose(0, 3, 1, 2))


def _prepared(path: str | os.PathLike) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return path
