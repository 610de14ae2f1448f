"""Image grid helpers: exact pixel placement, rounding and the PNG round trip."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from gen_rl.core.images import make_grid, save_image_grid, to_uint8


def test_to_uint8_rounds_and_clamps():
    pixels = torch.tensor([0.0, 0.5, 1.0, 1.7, -0.2, 0.2]).view(1, 1, 2, 3)
    assert to_uint8(pixels)[0, :, :, 0].tolist() == [[0, 128, 255], [255, 0, 51]]


def test_grid_places_each_image_row_major():
    pixels = torch.stack([torch.full((3, 2, 2), value / 4) for value in range(5)])
    grid = make_grid(pixels, columns=2, padding=1)
    assert grid.shape == (3 * 3 + 1, 2 * 3 + 1, 3)
    for index in range(5):
        top, left = 1 + (index // 2) * 3, 1 + (index % 2) * 3
        assert (grid[top : top + 2, left : left + 2] == round(index / 4 * 255)).all()
    assert (grid[7:9, 4:6] == 255).all()  # the empty sixth cell stays white


def test_save_image_grid_round_trip(tmp_path):
    pixels = torch.rand(4, 3, 5, 7, generator=torch.Generator().manual_seed(0))
    path = save_image_grid(pixels, tmp_path / "nested" / "grid.png", columns=4)
    loaded = np.asarray(Image.open(path))
    assert np.array_equal(loaded, make_grid(pixels, columns=4))
    assert not list(path.parent.glob("*.tmp"))


def test_bad_shape_is_refused():
    with pytest.raises(ValueError, match=r"\[B, C, H, W\]"):
        to_uint8(torch.zeros(3, 4, 4))


def test_video_grid_puts_each_sample_in_one_row_of_frames(tmp_path):
    """[N, C, T, H, W]: sample n, frame t lands in row n, column t (the value encodes both)."""
    count, frames = 2, 3
    values = torch.arange(count * frames, dtype=torch.float32).view(count, 1, frames, 1, 1) / 10
    pixels = values.expand(count, 3, frames, 4, 5)
    grid = make_grid(pixels, padding=1)
    assert grid.shape == (count * 5 + 1, frames * 6 + 1, 3)
    for sample in range(count):
        for frame in range(frames):
            top, left = 1 + sample * 5, 1 + frame * 6
            expected = round((sample * frames + frame) / 10 * 255)
            assert (grid[top : top + 4, left : left + 5] == expected).all(), (sample, frame)
    path = save_image_grid(pixels, tmp_path / "video.png", columns=7)  # columns is ignored for video
    assert np.array_equal(np.asarray(Image.open(path)), make_grid(pixels))
