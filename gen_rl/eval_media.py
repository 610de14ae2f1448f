"""What an evaluation leaves for people to look at: a labelled grid PNG per evaluation (prompts beside the rows,
rewards under the samples), one MP4 per prompt for video families, and the same pictures in the tracker."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch

from gen_rl.core.grids import labelled_grid, save_labelled_grid

logger = logging.getLogger(__name__)
VIDEO_FPS = 8


def save_eval_samples(
    trainer: Any, step: int, pixels: torch.Tensor, prompts: list[str], cell_labels: list[str]
) -> Path:
    """Write ``eval/step-<step>.png`` (one row per prompt) and, for videos ``[N, C, T, H, W]``,
    ``eval/step-<step>/prompt-<i>.mp4`` (the prompt's samples side by side); log the grid to the tracker."""
    grid = labelled_grid(pixels, prompts, cell_labels)
    path = save_labelled_grid(grid, Path(trainer.output_dir) / "eval" / f"step-{step:06d}.png")
    videos = []
    if pixels.ndim == 5:
        videos = write_prompt_videos(pixels, len(prompts), path.with_suffix(""))
    if trainer.config.log.tracker != "none":
        log_media(trainer.accelerator, step, np.asarray(grid), videos)
    return path


def write_prompt_videos(pixels: torch.Tensor, num_prompts: int, folder: Path) -> list[Path]:
    """One MP4 per prompt: its samples ``[k, C, T, H, W]`` tiled left to right, frames in [0, 1]."""
    from gen_rl.core.video_io import write_mp4

    per_prompt = len(pixels) // num_prompts
    paths = []
    for index in range(num_prompts):
        samples = pixels[index * per_prompt : (index + 1) * per_prompt]  # [k, C, T, H, W]
        side_by_side = torch.cat(list(samples), dim=-1)  # [C, T, H, k * W]
        frames = (side_by_side.permute(1, 2, 3, 0).clamp(0, 1) * 255).round().to(torch.uint8).numpy()
        paths.append(write_mp4(frames, folder / f"prompt-{index:02d}.mp4", fps=VIDEO_FPS))
    return paths


def log_media(accelerator: Any, step: int, grid: np.ndarray, videos: list[Path]) -> None:
    """The grid (``[H, W, 3]`` uint8) to every tracker that takes images; videos to wandb (tensorboard's
    video writer needs moviepy, so it gets the grid, which already shows every frame)."""
    for tracker in accelerator.trackers:
        try:
            if tracker.name == "tensorboard":
                tracker.log_images({"eval/samples": grid[None]}, step=step, dataformats="NHWC")
            elif tracker.name == "wandb":
                import wandb

                media = {"eval/samples": wandb.Image(grid)}
                media.update({f"eval/video_{i}": wandb.Video(str(path)) for i, path in enumerate(videos)})
                tracker.log(media, step=step)
        except Exception as error:  # a tracker failure must not stop training; say it once per evaluation
            logger.warning("could not log evaluation media to %s: %s", tracker.name, error)
