"""Image helpers: tensors in [0, 1] to PNG files and grids people can look at (videos as rows of frames)."""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image


def to_uint8(pixels: torch.Tensor) -> np.ndarray:
    """``[B, C, H, W]`` floats in [0, 1] to ``[B, H, W, C]`` uint8 (rounded, clamped)."""
    if pixels.ndim != 4:
        raise ValueError(f"expected pixels [B, C, H, W]; got shape {tuple(pixels.shape)}")
    scaled = (pixels.detach().float().clamp(0, 1) * 255).round().to(torch.uint8)
    return scaled.permute(0, 2, 3, 1).cpu().numpy()


def frames_as_rows(pixels: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Video ``[N, C, T, H, W]`` to frames ``[N*T, C, H, W]`` (sample-major) and ``T``, the columns of a grid
    that shows each sample's frames in one row."""
    if pixels.ndim != 5:
        raise ValueError(f"expected video pixels [N, C, T, H, W]; got shape {tuple(pixels.shape)}")
    count, channels, frames, height, width = pixels.shape
    return pixels.transpose(1, 2).reshape(count * frames, channels, height, width), frames


def make_grid(pixels: torch.Tensor, columns: int | None = None, padding: int = 2) -> np.ndarray:
    """Tile a batch into one ``[rows*(H+p)+p, cols*(W+p)+p, C]`` uint8 image, row-major, white padding.

    Images ``[N, C, H, W]`` fill ``columns`` per row (default: a near-square grid); videos ``[N, C, T, H, W]``
    put each sample's T frames in one row (``columns`` is then ignored).
    """
    if pixels.ndim == 5:
        pixels, columns = frames_as_rows(pixels)
    images = to_uint8(pixels)
    count, height, width, channels = images.shape
    columns = columns or math.ceil(math.sqrt(count))
    rows = math.ceil(count / columns)
    grid = np.full(
        (rows * (height + padding) + padding, columns * (width + padding) + padding, channels), 255, np.uint8
    )
    for index, image in enumerate(images):
        top = padding + (index // columns) * (height + padding)
        left = padding + (index % columns) * (width + padding)
        grid[top : top + height, left : left + width] = image
    return grid


def save_image_grid(pixels: torch.Tensor, path: str | os.PathLike, columns: int | None = None) -> Path:
    """Write the grid of ``pixels`` (``[N, C, H, W]`` images or ``[N, C, T, H, W]`` videos, one row of frames per
    sample) as a PNG (via a temp file and an atomic rename) and return its path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    grid = make_grid(pixels, columns)
    temporary = path.with_name(path.name + ".tmp")
    Image.fromarray(grid.squeeze(-1) if grid.shape[-1] == 1 else grid).save(temporary, format="PNG")
    os.replace(temporary, path)
    return path


def load_condition_image(
    value: str | os.PathLike | Image.Image | torch.Tensor, height: int, width: int
) -> torch.Tensor:
    """A source image (image-to-video, editing) as ``[3, height, width]`` float32 in [0, 1].

    ``value``: a file path, a PIL image, or a ``[3, H, W]`` tensor in [0, 1]. Resized with bicubic resampling
    (PIL) when its size differs; a missing or unreadable file fails with its path and the fix."""
    if isinstance(value, torch.Tensor):
        if value.ndim != 3 or value.shape[0] != 3:
            raise ValueError(
                f"a condition image tensor must be [3, H, W] in [0, 1]; got {tuple(value.shape)}"
            )
        image = Image.fromarray(to_uint8(value[None])[0]) if value.shape[1:] != (height, width) else None
        if image is None:
            return value.detach().float().clamp(0, 1)
    elif isinstance(value, Image.Image):
        image = value
    else:
        path = Path(value)
        try:
            with Image.open(path) as opened:
                image = opened.convert("RGB")
        except (OSError, ValueError) as error:
            raise FileNotFoundError(
                f"cannot read the condition image {path.resolve()}: {error}; give a PNG/JPEG path (relative paths in a "
                "JSONL prompt file are relative to that file)"
            ) from error
    image = image.convert("RGB")
    if image.size != (width, height):
        image = image.resize((width, height), Image.Resampling.BICUBIC)
    array = torch.from_numpy(np.asarray(image, dtype=np.uint8).copy())
    return array.permute(2, 0, 1).float() / 255
