"""Self-supervised verifiable tasks built from any image folder (as SSL4RL), and their rewards.

* Rotation: the image is rotated counter-clockwise by 0, 90, 180 or 270 degrees (``np.rot90(image, k)``,
  ``k = angle / 90``); the model names the angle. Solution: ``"90"``.
* Jigsaw: the image (cropped at the top-left to a multiple of the grid) is cut into ``grid x grid`` tiles
  numbered 0.. in reading order (left to right, top to bottom) and shuffled; the model gives, for each
  position of the shuffled image in reading order, the number of the original tile shown there.
  Solution: ``"[2, 0, 3, 1]"``, i.e. ``shuffled_tile[p] = original_tile[solution[p]]``.

Generators write the transformed images as PNG (lossless) into an output folder and return JSONL-style
records ``{"image": <written path>, "problem": <question>, "solution": <answer>, "task": "rotation" |
"jigsaw"}``; :func:`write_jsonl` saves them. They are deterministic for a given ``seed`` and folder.
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from rewards.verifiable.answers import committed_number, single_number
from rewards.verifiable.format import answer_text, extract_solution

__all__ = [
    "IMAGE_EXTENSIONS",
    "ROTATION_ANGLES",
    "list_images",
    "split_tiles",
    "assemble_tiles",
    "shuffle_tiles",
    "make_rotation_tasks",
    "make_jigsaw_tasks",
    "write_jsonl",
    "rotation_reward",
    "jigsaw_reward",
]

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif", ".tif", ".tiff")
ROTATION_ANGLES = (0, 90, 180, 270)

ROTATION_PROBLEM = (
    "This image may have been rotated counter-clockwise by 0, 90, 180 or 270 degrees. "
    "By how many degrees counter-clockwise was it rotated? Answer with one number: 0, 90, 180 or 270."
)
JIGSAW_PROBLEM = (
    "This image was cut into a {grid}x{grid} grid of tiles, numbered 0 to {last} in reading order (left to "
    "right, top to bottom) of the original image, and the tiles were shuffled. For each position of the "
    "shown image, in reading order, give the number of the original tile placed there, as a list of "
    "{count} numbers such as {example}."
)


def list_images(folder: str | Path) -> list[Path]:
    """Image files under ``folder`` (recursively, by extension, case-insensitive), sorted by path."""
    root = Path(folder)
    if not root.is_dir():
        raise ValueError(f"image folder {str(root)!r} does not exist or is not a folder")
    return sorted(
        path for path in root.rglob("*") if path.is_file() and path.suffix.lower() in IMAGE_EXTENSIONS
    )


def _load_rgb(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


def _output_path(output_dir: Path, index: int, source: Path, root: Path, tag: str) -> Path:
    stem = re.sub(r"[^A-Za-z0-9_.-]+", "_", str(source.relative_to(root).with_suffix("")))
    return output_dir / f"{index:06d}_{stem}_{tag}.png"


def split_tiles(array: np.ndarray, grid: int) -> list[np.ndarray]:
    """Cut an ``[H, W, ...]`` array into ``grid * grid`` equal tiles in reading order (H, W divisible by grid)."""
    height, width = array.shape[:2]
    if grid < 1 or height % grid or width % grid:
        raise ValueError(f"a {height}x{width} image does not split into a {grid}x{grid} grid")
    th, tw = height // grid, width // grid
    return [array[r * th : (r + 1) * th, c * tw : (c + 1) * tw] for r in range(grid) for c in range(grid)]


def assemble_tiles(tiles: Sequence[np.ndarray], grid: int) -> np.ndarray:
    """Inverse of :func:`split_tiles`: place ``tiles`` (reading order) back into one array."""
    if len(tiles) != grid * grid:
        raise ValueError(f"need {grid * grid} tiles for a {grid}x{grid} grid, got {len(tiles)}")
    rows = [np.concatenate(tiles[r * grid : (r + 1) * grid], axis=1) for r in range(grid)]
    return np.concatenate(rows, axis=0)


def shuffle_tiles(array: np.ndarray, permutation: Sequence[int], grid: int) -> np.ndarray:
    """The jigsaw image: position ``p`` shows original tile ``permutation[p]``."""
    tiles = split_tiles(array, grid)
    if sorted(permutation) != list(range(grid * grid)):
        raise ValueError(f"{list(permutation)} is not a permutation of 0..{grid * grid - 1}")
    return assemble_tiles([tiles[index] for index in permutation], grid)


def make_rotation_tasks(
    image_dir: str | Path,
    output_dir: str | Path,
    *,
    angles: Sequence[int] = ROTATION_ANGLES,
    all_angles: bool = False,
    seed: int = 0,
) -> list[dict[str, Any]]:
    """Rotation tasks: each image rotated counter-clockwise by one random angle of ``angles`` (or by every
    angle with ``all_angles``), written as PNG to ``output_dir``; returns the records (module docstring)."""
    if not angles or any(angle not in ROTATION_ANGLES for angle in angles):
        raise ValueError(f"angles must be taken from {ROTATION_ANGLES}, got {list(angles)}")
    root, out = Path(image_dir), Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    records = []
    for index, source in enumerate(list_images(root)):
        pixels = _load_rgb(source)
        chosen = list(angles) if all_angles else [rng.choice(list(angles))]
        for angle in chosen:
            target = _output_path(out, index, source, root, f"rot{angle}")
            Image.fromarray(np.ascontiguousarray(np.rot90(pixels, k=angle // 90))).save(target)
            records.append(
                {
                    "image": str(target),
                    "problem": ROTATION_PROBLEM,
                    "solution": str(angle),
                    "task": "rotation",
                }
            )
    return records


def make_jigsaw_tasks(
    image_dir: str | Path,
    output_dir: str | Path,
    *,
    grid: int = 2,
    seed: int = 0,
    allow_identity: bool = False,
) -> list[dict[str, Any]]:
    """Jigsaw tasks: each image (top-left crop to a multiple of ``grid``) cut into ``grid x grid`` tiles and
    shuffled by a random permutation (never the identity unless ``allow_identity``), written as PNG to
    ``output_dir``; returns the records (module docstring). Images smaller than the grid are skipped."""
    if grid < 2:
        raise ValueError(f"grid must be >= 2, got {grid}")
    root, out = Path(image_dir), Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    count = grid * grid
    problem = JIGSAW_PROBLEM.format(
        grid=grid, last=count - 1, count=count, example=str(list(range(count))[1:] + [0])
    )
    records = []
    for index, source in enumerate(list_images(root)):
        pixels = _load_rgb(source)
        height, width = (pixels.shape[0] // grid) * grid, (pixels.shape[1] // grid) * grid
        if height == 0 or width == 0:
            continue
        permutation = list(range(count))
        while True:
            rng.shuffle(permutation)
            if allow_identity or permutation != sorted(permutation):
                break
        target = _output_path(out, index, source, root, f"jigsaw{grid}")
        shuffled = shuffle_tiles(pixels[:height, :width], permutation, grid)
        Image.fromarray(np.ascontiguousarray(shuffled)).save(target)
        records.append(
            {"image": str(target), "problem": problem, "solution": str(permutation), "task": "jigsaw"}
        )
    return records


def write_jsonl(records: Iterable[Mapping[str, Any]], path: str | Path) -> Path:
    """Write one JSON object per line; returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as handle:
        for record in records:
            handle.write(json.dumps(dict(record), ensure_ascii=False) + "\n")
    return path


def rotation_reward(completion: str, solution: Any, metadata: Mapping[str, Any] | None = None) -> float:
    """1.0 if the answer states exactly one number and it is the counter-clockwise rotation angle, else 0.

    "90", "90 degrees", "90°" read 90; "0 or 90", "0 90 180 270", "not 90" read nothing (score 0: the
    commitment rule of :mod:`rewards.verifiable.commitment`). Other angle
    conventions are not translated (a "-90" or "90 clockwise" answer for a 270 solution scores 0).
    """
    gold = single_number(extract_solution(solution))
    if gold is None or gold not in ROTATION_ANGLES:
        raise ValueError(f"rotation solution must be one of {ROTATION_ANGLES}, got {solution!r}")
    value = committed_number(answer_text(completion, metadata))
    return 1.0 if value is not None and value == gold else 0.0


def _integers(text: Any) -> list[int]:
    if isinstance(text, list | tuple):
        return [int(item) for item in text]
    return [int(token) for token in re.findall(r"-?\d+", str(text))]


def jigsaw_reward(
    completion: str, solution: Any, metadata: Mapping[str, Any] | None = None, *, partial: bool | None = None
) -> float:
    """1.0 if the answer's integers are exactly the solution permutation, else 0.

    With ``partial`` (or ``metadata["partial_credit"]``) an answer that is a permutation of the right size
    earns the fraction of positions it gets right; anything else (wrong length, repeats) still scores 0.
    """
    metadata = metadata or {}
    gold = _integers(extract_solution(solution))
    if sorted(gold) != list(range(len(gold))) or len(gold) < 2:
        raise ValueError(f"jigsaw solution must be a permutation of 0..n-1, got {solution!r}")
    answer = _integers(answer_text(completion, metadata))
    if answer == gold:
        return 1.0
    partial = bool(partial if partial is not None else metadata.get("partial_credit", False))
    if not partial or sorted(answer) != sorted(gold):
        return 0.0
    return sum(a == g for a, g in zip(answer, gold, strict=True)) / len(gold)
