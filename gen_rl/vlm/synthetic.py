"""Synthetic verifiable tasks written to disk as ordinary JSONL + PNG data (tests, CPU demo, benchmark).

``colour``: a solid-colour 56 x 56 image (random brightness jitter per record) and the question "what is the
colour of this image ?"; the solution is the colour's name, scored by the ``exact`` reward. With the tiny
Qwen2-VL's word-level vocabulary each colour is one token.

``video_colour``: the same task on a video, a folder of solid-colour frames (brightness jitter per frame) at
2 frames per second; the model sees it only through the processor's video input.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

from gen_rl.core.seeding import derive_seed
from gen_rl.vlm.tiny import COLOURS

__all__ = [
    "COLOUR_QUESTION",
    "COLOUR_RGB",
    "SYNTHETIC_TASKS",
    "VIDEO_COLOUR_QUESTION",
    "write_colour_dataset",
    "write_video_colour_dataset",
]

COLOUR_QUESTION = "what is the colour of this image ?"
VIDEO_COLOUR_QUESTION = "what is the colour ?"
COLOUR_RGB = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220), "yellow": (230, 220, 30)}


def write_colour_dataset(folder: str | Path, num_records: int, seed: int = 0, side: int = 56) -> Path:
    """Write ``num_records`` colour records (cycling through the colours) under ``folder``; return the JSONL.

    Images go to ``folder/images/`` and are referenced relative to ``folder`` (the image root).
    """
    folder = Path(folder)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    generator = np.random.default_rng(derive_seed(seed, "colour-dataset"))
    jsonl_path = folder / "colour.jsonl"
    with jsonl_path.open("w") as handle:
        for index in range(num_records):
            colour = COLOURS[index % len(COLOURS)]
            jitter = generator.integers(-25, 26, size=3)
            rgb = tuple(int(v) for v in np.clip(np.array(COLOUR_RGB[colour]) + jitter, 0, 255))
            relative = f"images/{index:05d}.png"
            Image.new("RGB", (side, side), rgb).save(folder / relative)
            record = {
                "id": f"colour-{index}",
                "image": relative,
                "problem": COLOUR_QUESTION,
                "solution": colour,
                "task": "colour",
            }
            handle.write(json.dumps(record) + "\n")
    return jsonl_path


def write_video_colour_dataset(
    folder: str | Path, num_records: int, seed: int = 0, side: int = 56, num_frames: int = 4, fps: float = 2.0
) -> Path:
    """Write ``num_records`` video colour records (frame folders ``videos/<index>/<frame>.png`` at ``fps``,
    cycling through the colours) under ``folder``; return the JSONL (``video_colour.jsonl``)."""
    folder = Path(folder)
    generator = np.random.default_rng(derive_seed(seed, "video-colour-dataset"))
    jsonl_path = folder / "video_colour.jsonl"
    folder.mkdir(parents=True, exist_ok=True)
    with jsonl_path.open("w") as handle:
        for index in range(num_records):
            colour = COLOURS[index % len(COLOURS)]
            relative = f"videos/{index:05d}"
            (folder / relative).mkdir(parents=True, exist_ok=True)
            for frame in range(num_frames):
                jitter = generator.integers(-25, 26, size=3)
                rgb = tuple(int(v) for v in np.clip(np.array(COLOUR_RGB[colour]) + jitter, 0, 255))
                Image.new("RGB", (side, side), rgb).save(folder / relative / f"frame_{frame}.png")
            record = {
                "id": f"video-colour-{index}",
                "video": relative,
                "video_fps": fps,
                "problem": VIDEO_COLOUR_QUESTION,
                "solution": colour,
                "task": "colour",
            }
            handle.write(json.dumps(record) + "\n")
    return jsonl_path


# synthetic task name -> writer(folder, num_records, seed) returning ``folder / f"{name}.jsonl"``
SYNTHETIC_TASKS = {"colour": write_colour_dataset, "video_colour": write_video_colour_dataset}
