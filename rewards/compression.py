"""JPEG file-size rewards of DDPO (Black et al., 2023, "Training Diffusion Models with Reinforcement Learning").

Each image is rounded to uint8 and encoded in memory with PIL at a fixed JPEG quality; the size is in
kilobytes with 1 kB = 1000 bytes, as in the DDPO reference code. Compressibility rewards small files
(score = -kB), incompressibility rewards large ones (score = +kB). Weight-free: the demo and tests use them.
"""

from __future__ import annotations

import io

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from gen_rl.core.images import to_uint8
from rewards.base import Reward, RewardOutput, register_reward

BYTES_PER_KB = 1000
_PIL_MODES = {1: "L", 3: "RGB"}


def jpeg_size_kb(image: np.ndarray, quality: int) -> float:
    """Size in kB (1000 bytes) of one ``[H, W, C]`` uint8 image (C = 1 or 3) encoded as JPEG at ``quality``."""
    channels = image.shape[-1]
    if channels not in _PIL_MODES:
        raise ValueError(f"JPEG encodes 1 (grey) or 3 (RGB) channels; got an image with {channels}")
    buffer = io.BytesIO()
    Image.fromarray(image[..., 0] if channels == 1 else image).save(buffer, format="JPEG", quality=quality)
    return buffer.tell() / BYTES_PER_KB


def jpeg_sizes_kb(pixels: Tensor, quality: int) -> Tensor:
    """``[B]`` float32 JPEG sizes in kB of ``pixels`` ``[B, C, H, W]`` in [0, 1] (rounded to uint8 first)."""
    images = to_uint8(pixels)
    return torch.tensor([jpeg_size_kb(image, quality) for image in images], dtype=torch.float32)


class _JpegSizeReward(Reward):
    """Shared body: the signed JPEG size; subclasses set ``sign``."""

    sign: float

    def __init__(self, quality: int = 95) -> None:
        if isinstance(quality, bool) or not isinstance(quality, int) or not 1 <= quality <= 100:
            raise ValueError(f"JPEG quality must be an integer in [1, 100] (DDPO uses 95); got {quality!r}")
        self.quality = quality

    def score(self, pixels: Tensor, prompts: list[str], metadata: list[dict]) -> RewardOutput:
        """Signed JPEG size in kB per image; the unsigned size is the ``jpeg_kb`` component."""
        sizes_kb = jpeg_sizes_kb(pixels, self.quality)
        return RewardOutput(scores=self.sign * sizes_kb, components={"jpeg_kb": sizes_kb})


@register_reward("jpeg_compressibility")
class JpegCompressibility(_JpegSizeReward):
    """DDPO's compressibility reward: minus the JPEG size in kB (1 kB = 1000 bytes) at ``quality``."""

    sign = -1.0


@register_reward("jpeg_incompressibility")
class JpegIncompressibility(_JpegSizeReward):
    """DDPO's incompressibility reward: the JPEG size in kB (1 kB = 1000 bytes) at ``quality``."""

    sign = 1.0
