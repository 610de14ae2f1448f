"""A synthetic preference task with a known answer: the preferred image is the one closer to a target colour.

``python -m gen_rl.reward_model.synthetic <folder>`` writes ``train.jsonl`` and ``eval.jsonl`` (``pairs``
format) and their images into ``<folder>``; ``data.synthetic: colour`` does the same in a run
(``configs/reward_model/tiny_colour_preference_cpu.yaml``).

Images are 16x16 PNGs written with PIL: a random base colour plus a little per-pixel noise. In a pair the image
whose mean colour is closer to ``TARGET`` is preferred (the known answer); pairs whose two distances differ by
less than ``MIN_GAP`` are not made, so every label is unambiguous.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import numpy as np
from PIL import Image

TARGET = (1.0, 0.0, 0.0)  # the colour preferred images are closer to (red: the colour reward's "red")
MIN_GAP = 0.15  # least difference of RGB distance to TARGET within a pair
SIZE = 16


def write_images(folder: Path, count: int, seed: int) -> list[tuple[str, float]]:
    """``count`` noisy solid-colour PNGs in ``folder``; ``(file name, distance of its pixels to TARGET)`` each."""
    folder.mkdir(parents=True, exist_ok=True)
    generator = np.random.default_rng(seed)
    written = []
    for index in range(count):
        base = generator.uniform(0.0, 1.0, size=3)
        noise = generator.normal(0.0, 0.03, size=(SIZE, SIZE, 3))
        pixels = np.clip(base + noise, 0.0, 1.0)
        array = np.round(pixels * 255).astype(np.uint8)
        name = f"img_{seed}_{index:04d}.png"
        Image.fromarray(array).save(folder / name)
        mean_distance = float(np.linalg.norm(array / 255.0 - np.asarray(TARGET), axis=-1).mean())
        written.append((name, mean_distance))
    return written


def write_pairs(
    folder: Path, file_name: str, pairs: int, seed: int, prompt: str = "a picture", categories: int = 2
) -> Path:
    """A ``pairs``-format JSONL of ``pairs`` records over fresh images (label 1 or 0, ``category`` c0, c1...)."""
    images = write_images(folder / "images", 2 * pairs + 40, seed)
    generator = np.random.default_rng(seed + 1)
    lines = []
    while len(lines) < pairs:
        first, second = generator.choice(len(images), size=2, replace=False)
        (name_a, distance_a), (name_b, distance_b) = images[first], images[second]
        if abs(distance_a - distance_b) < MIN_GAP:
            continue
        record = {
            "prompt": prompt,
            "image_a": f"images/{name_a}",
            "image_b": f"images/{name_b}",
            "label": 1 if distance_a < distance_b else 0,
            "category": f"c{len(lines) % categories}",
        }
        lines.append(json.dumps(record))
    path = folder / file_name
    path.write_text("\n".join(lines) + "\n")
    return path


def gold_score(distance: float) -> float:
    """The colour reward's score for a mean distance: ``1 - distance / sqrt(3)``."""
    return 1.0 - distance / math.sqrt(3.0)


def write_ranked(folder: Path, file_name: str, lists: int, length: int, seed: int) -> Path:
    """A ``ranked``-format JSONL: ``lists`` rankings of ``length`` fresh images each, closest to TARGET first."""
    images = write_images(folder / "images", lists * length, seed)
    lines = []
    for start in range(0, lists * length, length):
        members = sorted(images[start : start + length], key=lambda item: item[1])
        ranking = [f"images/{name}" for name, _ in members]
        lines.append(json.dumps({"prompt": "a picture", "ranking": ranking}))
    path = folder / file_name
    path.write_text("\n".join(lines) + "\n")
    return path


def main(argv: list[str] | None = None) -> int:
    """Write the tiny colour-preference task (train 300 pairs, eval 100 pairs) into a folder."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("folder", help="where train.jsonl, eval.jsonl and images/ go")
    parser.add_argument("--train-pairs", type=int, default=300)
    parser.add_argument("--eval-pairs", type=int, default=100)
    args = parser.parse_args(argv)
    folder = Path(args.folder)
    write_pairs(folder, "train.jsonl", args.train_pairs, seed=0)
    write_pairs(folder, "eval.jsonl", args.eval_pairs, seed=7)
    print(f"wrote {folder}/train.jsonl and {folder}/eval.jsonl (target colour {TARGET})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
