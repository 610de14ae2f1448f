"""Tiny random reward backbones of the real architectures, saved in the real formats (tests and benchmarks).

Each ``save_tiny_*`` writes a folder that the reward heads load through the same code as real weights.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import BitImageProcessor, Dinov2Config, Dinov2Model

from rewards.preprocess import IMAGENET_MEAN, IMAGENET_STD


def save_tiny_dino(folder: str | Path, seed: int = 0) -> Path:
    """A 2-layer DINOv2 (hidden 32, patch 8) + a BitImageProcessor (shortest edge 40, crop 32) in ``folder``."""
    folder = Path(folder)
    torch.manual_seed(seed)
    config = Dinov2Config(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=37,
        patch_size=8,
        image_size=32,
    )
    Dinov2Model(config).save_pretrained(folder)
    processor = BitImageProcessor(
        size={"shortest_edge": 40},
        crop_size={"height": 32, "width": 32},
        resample=3,
        do_center_crop=True,
        image_mean=list(IMAGENET_MEAN),
        image_std=list(IMAGENET_STD),
    )
    processor.save_pretrained(folder)
    return folder
