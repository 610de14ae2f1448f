"""Reward throughput: images/s of every reward head at batch 1 / 8 / 32, and the share spent preprocessing.

    python bench/reward_throughput.py [--batches 1 8 32] [--size 64] [--repeats 5] [--device cpu]

Each head is built from a tiny random model of its real architecture, saved to a temporary folder and loaded
through the same code as real weights. A call is ``reward(pixels, prompts)`` (input checks, preprocessing,
the backbone, the score); the preprocessing (resize + crop + normalise on tensors) is timed on its own with
the same pixels. Medians over ``--repeats`` after one warm-up call. Pixels are ``--size`` px squares, so every
head resizes. On real weights the backbone dominates far more than here: these models have 2 layers.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rewards import build_reward  # noqa: E402
from rewards.tiny import save_tiny_aesthetic, save_tiny_clip, save_tiny_dino, save_tiny_hps  # noqa: E402


def build_heads(folder: Path, device: str) -> dict[str, tuple[object, Callable | None]]:
    """name -> (reward, its preprocessing callable or None), every head on tiny saved weights."""
    clip = save_tiny_clip(folder / "clip")
    aesthetic_clip, aesthetic_head = save_tiny_aesthetic(folder / "aesthetic")
    hps_arch, _ = save_tiny_hps(folder / "hps")
    dino = save_tiny_dino(folder / "dino")
    reference = folder / "reference.png"
    from PIL import Image

    Image.new("RGB", (48, 40), (200, 30, 30)).save(reference)
    heads = {
        "clip_score": build_reward("clip_score", model=str(clip), device=device),
        "pickscore": build_reward("pickscore", model=str(clip), processor=str(clip), device=device),
        "aesthetic": build_reward(
            "aesthetic", clip_model=str(aesthetic_clip), head=str(aesthetic_head), device=device
        ),
        "hps": build_reward("hps", arch=str(hps_arch), checkpoint=str(folder / "hps"), device=device),
        "dino_similarity": build_reward(
            "dino_similarity", references=str(reference), model=str(dino), device=device
        ),
        "jpeg_compressibility": build_reward("jpeg_compressibility"),
        "colour": build_reward("colour"),
    }
    return {name: (head, _preprocess_of(head)) for name, head in heads.items()}


def _preprocess_of(head: object) -> Callable | None:
    if hasattr(head, "preprocess"):
        return head.preprocess
    embedder = getattr(head, "embedder", None)
    return getattr(embedder, "preprocess", None)


def median_seconds(function: Callable[[], object], repeats: int, device: str) -> float:
    """Median wall time of ``function`` over ``repeats`` calls after one warm-up (synchronised on CUDA)."""
    function()
    times = []
    for _ in range(repeats):
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        start = time.perf_counter()
        function()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> None:
    """Print a table: head, batch, images/s, and the preprocessing share of the call."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    generator = torch.Generator().manual_seed(0)
    with tempfile.TemporaryDirectory() as folder:
        heads = build_heads(Path(folder), args.device)
        print(f"device {args.device}, {args.size}x{args.size} px, threads {torch.get_num_threads()}")
        print(f"{'head':<22}{'batch':>6}{'images/s':>12}{'preprocess':>12}")
        for name, (head, preprocess) in heads.items():
            for batch in args.batches:
                pixels = torch.rand(batch, 3, args.size, args.size, generator=generator).to(args.device)
                prompts = ["a red apple on a table"] * batch
                with torch.no_grad():
                    call = median_seconds(lambda: head(pixels, prompts), args.repeats, args.device)  # noqa: B023
                    prep = (
                        median_seconds(lambda: preprocess(pixels), args.repeats, args.device)  # noqa: B023
                        if preprocess is not None
                        else float("nan")
                    )
                share = f"{100 * prep / call:.1f}%" if preprocess is not None else "-"
                print(f"{name:<22}{batch:>6}{batch / call:>12.1f}{share:>12}")
        compare_pil_round_trip(heads["pickscore"][0], args)


def compare_pil_round_trip(head: object, args: argparse.Namespace) -> None:
    """Tensor preprocessing against the PIL round trip it replaces (pixels -> uint8 -> PIL -> processor)."""
    from PIL import Image

    batch = max(args.batches)
    pixels = torch.rand(batch, 3, args.size, args.size, generator=torch.Generator().manual_seed(1)).to(
        args.device
    )

    def round_trip() -> object:
        arrays = (pixels * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
        images = [Image.fromarray(array) for array in arrays]
        values = head.processor.image_processor(images=images, return_tensors="pt")["pixel_values"]
        return values.to(args.device)

    tensor = median_seconds(lambda: head.preprocess(pixels), args.repeats, args.device)
    pil = median_seconds(round_trip, args.repeats, args.device)
    print(
        f"pickscore preprocessing at batch {batch}: tensor {1e3 * tensor:.2f} ms, PIL round trip "
        f"{1e3 * pil:.2f} ms, ratio {pil / tensor:.1f}x"
    )


if __name__ == "__main__":
    main()
