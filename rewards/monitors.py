"""Reward-hacking monitors: per-sample image statistics and in-group diversity, logged every step and at eval.

A policy that games its reward tends to drift in ways these catch early: over-saturated or washed-out images
(``saturation``, ``brightness``, ``colourfulness``, ``contrast``) and mode collapse inside a group (the mean
pairwise feature distance ``diversity`` falls towards 0). The trainer pairs them with "gold" rewards that are
scored at eval only, so a rising optimised reward with a flat or falling gold reward is visible in one plot.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from rewards.preprocess import frames_as_images

LUMA_WEIGHTS = (0.299, 0.587, 0.114)  # ITU-R BT.601
STATISTICS = ("brightness", "contrast", "saturation", "colourfulness")  # the keys of image_statistics


def image_statistics(pixels: Tensor) -> dict[str, Tensor]:
    """Per-sample ``[B]`` statistics of pixels in [0, 1] (``[B, 3, H, W]``, or video ``[B, 3, T, H, W]``).

    - ``brightness``: mean BT.601 luma;
    - ``contrast``: standard deviation of the luma;
    - ``saturation``: mean HSV saturation (max - min) / max per pixel (0 where max = 0);
    - ``colourfulness``: Hasler & Süsstrunk (2003), eq. 3: with rg = R - G and yb = (R + G) / 2 - B,
      sqrt(var(rg) + var(yb)) + 0.3 sqrt(mean(rg)^2 + mean(yb)^2), on the [0, 1] scale (x255 for the paper's).
    """
    images = pixels.float()
    if images.ndim == 5:  # video: statistics over all frames of a sample
        images = images.permute(0, 1, 3, 2, 4).flatten(3)  # [B, 3, H, T*W]
    red, green, blue = images[:, 0], images[:, 1], images[:, 2]
    luma = LUMA_WEIGHTS[0] * red + LUMA_WEIGHTS[1] * green + LUMA_WEIGHTS[2] * blue
    high = images.amax(dim=1)
    low = images.amin(dim=1)
    saturation = torch.where(high > 0, (high - low) / high.clamp_min(1e-12), torch.zeros_like(high))
    rg = (red - green).flatten(1)
    yb = (0.5 * (red + green) - blue).flatten(1)
    spread = torch.sqrt(rg.var(dim=1, unbiased=False) + yb.var(dim=1, unbiased=False))
    offset = torch.sqrt(rg.mean(dim=1) ** 2 + yb.mean(dim=1) ** 2)
    return {
        "brightness": luma.flatten(1).mean(dim=1),
        "contrast": luma.flatten(1).std(dim=1, unbiased=False),
        "saturation": saturation.flatten(1).mean(dim=1),
        "colourfulness": spread + 0.3 * offset,
    }


def pixel_features(pixels: Tensor, size: int = 32) -> Tensor:
    """Cheap image features ``[B, 3 * size * size]``: area-downsampled pixels (video: all frames, concatenated)."""
    pixels = pixels.to(torch.promote_types(pixels.dtype, torch.float32))  # float64 stays float64
    if pixels.ndim == 5:
        batch = pixels.shape[0]
        frames = F.adaptive_avg_pool2d(frames_as_images(pixels), size)
        return frames.reshape(batch, -1)
    return F.adaptive_avg_pool2d(pixels, size).flatten(1)


def group_diversity(features: Tensor, group_ids: Tensor, metric: str = "rms") -> tuple[Tensor, Tensor]:
    """Mean pairwise distance between the members of each group: ``(group ids [G], diversity [G])``.

    ``rms``: ||f_i - f_j|| / sqrt(D) (root-mean-square difference, pixel units for ``pixel_features``);
    ``cosine``: 1 - cos(f_i, f_j) (for unit-norm backbone features). Groups of one member give NaN.
    """
    if metric not in ("rms", "cosine"):
        raise ValueError(f"diversity metric must be 'rms' or 'cosine'; got {metric!r}")
    unique_ids = torch.unique(group_ids)
    values = []
    for group in unique_ids:
        members = features[group_ids == group].float()
        count = members.shape[0]
        if count < 2:
            values.append(torch.tensor(float("nan"), device=features.device))
            continue
        if metric == "rms":
            exact = "donot_use_mm_for_euclid_dist"  # a zero diagonal, no cancellation error
            distances = torch.cdist(members, members, compute_mode=exact) / members.shape[1] ** 0.5
        else:
            unit = F.normalize(members, dim=1)
            distances = (1.0 - unit @ unit.T).fill_diagonal_(0.0)
        values.append(distances.sum() / (count * (count - 1)))  # the diagonal is 0: mean over pairs i != j
    return unique_ids, torch.stack(values) if values else torch.empty(0, device=features.device)
