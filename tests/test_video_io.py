"""Video files: an MP4 / GIF written then read back has the frames, size and content written; the layouts the
writers accept; the frame strip; and the module imports without torch."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from gen_rl.core.video_io import frame_strip, read_video, to_uint8_frames, tracker_video, write_gif, write_mp4

ROOT = Path(__file__).resolve().parents[1]


def smooth_video(frames: int = 7, height: int = 32, width: int = 48) -> np.ndarray:
    """``[T, H, W, 3]`` uint8: a moving colour gradient (what a codec keeps well) that differs in every frame."""
    t = np.arange(frames)[:, None, None]
    y = np.arange(height)[None, :, None]
    x = np.arange(width)[None, None, :]
    red = 40 + 160 * x / width + 0 * y + 10 * t
    green = 30 + 150 * y / height + 0 * x + 5 * t
    blue = 200 - 20 * t + 0 * x * y
    return np.clip(np.stack([red, green, blue], axis=-1), 0, 255).astype(np.uint8)


def mean_abs_difference(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(np.float64) - b.astype(np.float64)).mean())


def test_an_mp4_reads_back_with_its_frames_size_and_content(tmp_path):
    video = smooth_video()
    path = write_mp4(video, tmp_path / "clip" / "a.mp4", fps=8)
    assert path.is_file() and path.read_bytes()[4:8] == b"ftyp"  # an ISO media file
    back = read_video(path)
    assert back.shape == video.shape and back.dtype == np.uint8
    assert mean_abs_difference(back, video) < 2.0  # x264 at CRF 12: near-identical
    # frame order kept: each read frame is nearest to the frame written at its index
    distances = np.array([[mean_abs_difference(b, v) for v in video] for b in back])
    assert distances.argmin(axis=1).tolist() == list(range(len(video)))
    assert len(read_video(path, max_frames=3)) == 3


def test_a_gif_reads_back_with_its_frames_size_and_content(tmp_path):
    video = smooth_video(frames=5, height=20, width=30)
    path = write_gif(video, tmp_path / "a.gif", fps=10)
    assert path.read_bytes()[:6] == b"GIF89a"
    back = read_video(path)
    assert back.shape == video.shape
    assert mean_abs_difference(back, video) < 4.0  # a 256-colour palette per frame
    with Image.open(path) as gif:
        assert gif.n_frames == 5 and gif.info["duration"] == 100 and gif.info["loop"] == 0


def test_a_gif_keeps_a_repeated_frame_as_a_longer_delay(tmp_path):
    video = smooth_video(frames=4, height=20, width=30)
    video[2] = video[1]
    with Image.open(write_gif(video, tmp_path / "a.gif", fps=10)) as gif:
        durations = []
        for index in range(gif.n_frames):
            gif.seek(index)
            durations.append(gif.info["duration"])
    assert durations == [100, 200, 100]  # same playing time, one frame fewer


def test_the_writers_take_float_frames_and_the_sampler_layout(tmp_path):
    video = smooth_video(frames=5)
    pixels = (
        torch.from_numpy(video).permute(3, 0, 1, 2).float() / 255
    )  # one sample of rollout.pixels [3, T, H, W]
    np.testing.assert_array_equal(to_uint8_frames(pixels), video)
    np.testing.assert_array_equal(to_uint8_frames(video.astype(np.float32) / 255), video)
    grey = to_uint8_frames(np.full((2, 4, 6), 0.5))
    assert grey.shape == (2, 4, 6, 3) and (grey == 128).all()
    back = read_video(write_mp4(pixels, tmp_path / "b.mp4"))
    assert back.shape == video.shape and mean_abs_difference(back, video) < 2.0
    assert tracker_video(pixels).shape == (5, 3, 32, 48)


def test_bad_inputs_fail_with_the_problem_named(tmp_path):
    with pytest.raises(ValueError, match=r"frames must be \[T, H, W, 3\]"):
        to_uint8_frames(np.zeros((4, 8, 8, 5)))
    with pytest.raises(ValueError, match="needs even frame sides; got 15x16"):
        write_mp4(np.zeros((2, 15, 16, 3), np.uint8), tmp_path / "odd.mp4")
    with pytest.raises(FileNotFoundError, match="no video file"):
        read_video(tmp_path / "missing.mp4")
    (tmp_path / "junk.mp4").write_bytes(b"not a video")
    with pytest.raises(ValueError, match="cannot decode the video"):
        read_video(tmp_path / "junk.mp4")


def test_the_frame_strip_places_frames_left_to_right():
    video = smooth_video(frames=10, height=8, width=6)
    strip = np.asarray(frame_strip(video, max_frames=None, gap=2))
    assert strip.shape == (8, 10 * 6 + 9 * 2, 3)
    for index in range(10):
        np.testing.assert_array_equal(strip[:, index * 8 : index * 8 + 6], video[index])
    chosen = np.asarray(frame_strip(video, max_frames=4))  # frames 0, 3, 6, 9
    assert chosen.shape == (8, 24, 3)
    np.testing.assert_array_equal(chosen[:, 18:24], video[9])
    np.testing.assert_array_equal(chosen[:, 6:12], video[3])


def test_the_module_imports_without_torch():
    code = "import sys, gen_rl.core.video_io; print('torch' in sys.modules)"
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert result.stdout.strip() == "False", result.stdout + result.stderr
