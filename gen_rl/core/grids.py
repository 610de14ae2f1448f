"""Labelled picture grids people can read: samples upscaled to a legible size, prompts beside each row, scores
under each cell (evaluation grids, the eval harness's side-by-side comparison)."""

from __future__ import annotations

import math
import os
import textwrap
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from gen_rl.core.images import to_uint8

MIN_CELL_SIDE = (
    160  # pixels: smaller samples are upscaled (nearest neighbour, so pixels stay visible) to this
)
LABEL_WIDTH = 220  # pixels of the prompt column
FONT_SIZE = 14
PADDING = 6


def sample_strips(pixels: torch.Tensor) -> np.ndarray:
    """``[N, C, H, W]`` images or ``[N, C, T, H, W]`` videos (frames side by side) to ``[N, H, W', 3]`` uint8."""
    if pixels.ndim == 5:
        count, channels, frames, height, width = pixels.shape
        pixels = pixels.permute(0, 1, 3, 2, 4).reshape(count, channels, height, frames * width)
    images = to_uint8(pixels)
    return np.repeat(images, 3, axis=-1) if images.shape[-1] == 1 else images


def _font(size: int = FONT_SIZE) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError):  # Pillow without FreeType: the fixed bitmap font
        return ImageFont.load_default()


def labelled_grid(
    pixels: torch.Tensor,
    row_labels: Sequence[str],
    cell_labels: Sequence[str] | None = None,
    column_labels: Sequence[str] | None = None,
    min_side: int = MIN_CELL_SIDE,
) -> Image.Image:
    """A grid with one row per label of ``row_labels`` (samples row-major, ``len(pixels) / rows`` per row).

    Each sample is upscaled by the integer factor that brings its shorter side to at least ``min_side``; the row's
    label (a prompt) is wrapped in a column on the left, ``cell_labels`` (one per sample, e.g. its reward) sit under
    each cell and ``column_labels`` (e.g. checkpoint names) above each column."""
    strips = sample_strips(pixels)
    rows = len(row_labels)
    if rows == 0 or len(strips) % rows:
        raise ValueError(f"{len(strips)} samples cannot fill {rows} rows evenly")
    columns = len(strips) // rows
    if cell_labels is not None and len(cell_labels) != len(strips):
        raise ValueError(f"got {len(cell_labels)} cell labels for {len(strips)} samples")
    if column_labels is not None and len(column_labels) != columns:
        raise ValueError(f"got {len(column_labels)} column labels for {columns} columns")
    height, width = strips.shape[1:3]
    scale = max(1, math.ceil(min_side / min(height, width)))
    cell_height, cell_width = height * scale, width * scale
    font = _font()
    line = FONT_SIZE + 4
    per_line = max(4, cell_width // (FONT_SIZE * 6 // 10))  # characters of a label line over one cell
    headers = [textwrap.wrap(label, per_line)[:2] or [""] for label in column_labels or []]
    header = max((len(lines) for lines in headers), default=0) * line + PADDING if column_labels else 0
    footer = line if cell_labels is not None else 0
    row_height = max(cell_height + footer, 3 * line) + PADDING
    canvas = Image.new(
        "RGB",
        (LABEL_WIDTH + columns * (cell_width + PADDING) + PADDING, header + rows * row_height + PADDING),
        "white",
    )
    draw = ImageDraw.Draw(canvas)
    characters = max(8, LABEL_WIDTH // (FONT_SIZE * 6 // 10))
    for column, lines in enumerate(headers):
        left = LABEL_WIDTH + column * (cell_width + PADDING)
        draw.multiline_text((left, PADDING), "\n".join(lines), fill="black", font=font, spacing=4)
    for row in range(rows):
        top = header + PADDING + row * row_height
        wrapped = textwrap.wrap(row_labels[row], characters)[: max(1, cell_height // line)]
        draw.multiline_text((PADDING, top), "\n".join(wrapped), fill="black", font=font, spacing=4)
        for column in range(columns):
            index = row * columns + column
            left = LABEL_WIDTH + column * (cell_width + PADDING)
            cell = Image.fromarray(strips[index]).resize((cell_width, cell_height), Image.Resampling.NEAREST)
            canvas.paste(cell, (left, top))
            if cell_labels is not None:
                draw.text((left, top + cell_height + 2), cell_labels[index], fill="black", font=font)
    return canvas


def save_labelled_grid(image: Image.Image, path: str | os.PathLike) -> Path:
    """Write ``image`` as a PNG through a temp file and an atomic rename; returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(path.name + ".tmp")
    image.save(temporary, format="PNG")
    os.replace(temporary, path)
    return path
