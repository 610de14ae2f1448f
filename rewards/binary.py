"""A thresholded reward: ``above`` when an inner reward exceeds a threshold, else ``below``.

DanceGRPO (Xue et al. 2025, "DanceGRPO: Unleashing GRPO on Visual Generation") trains with such binary
rewards (e.g. HPS > threshold -> 1, else 0) to show that GRPO copes with sparse, discrete feedback.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from rewards.base import Reward, RewardOutput, build_inner_reward, register_reward


@register_reward("binary")
class BinaryReward(Reward):
    """Score = ``above`` if inner score > ``threshold`` else ``below``; NaN where the inner score is NaN.

    ``reward``: a registered reward name, a dotted path ``package.module:Class`` (built with ``kwargs``), or
    an already built ``Reward``. The modality is the inner reward's. Components: the inner score as
    ``{name}_raw`` and the inner components.
    """

    def __init__(
        self,
        reward: str | Reward,
        threshold: float,
        kwargs: dict[str, Any] | None = None,
        above: float = 1.0,
        below: float = 0.0,
    ) -> None:
        self.inner, self.inner_name = _inner_reward(reward, kwargs)
        self.modality = self.inner.modality  # instance attribute: follows the inner reward
        self.threshold = _finite(threshold, "threshold")
        self.above = _finite(above, "above")
        self.below = _finite(below, "below")

    def score(self, pixels: Tensor, prompts: list[str], metadata: list[dict]) -> RewardOutput:
        """Thresholded inner scores; the inner reward validates and scores the batch."""
        inner = self.inner(pixels, prompts, metadata)
        raw = inner.scores
        scores = torch.where(raw > self.threshold, self.above, self.below)
        scores = scores.masked_fill(torch.isnan(raw), math.nan)
        return RewardOutput(scores=scores, components={f"{self.inner_name}_raw": raw, **inner.components})


def _inner_reward(reward: str | Reward, kwargs: dict[str, Any] | None) -> tuple[Reward, str]:
    """The inner reward and the name its raw score is logged under."""
    inner = build_inner_reward(reward, kwargs, "binary")
    if isinstance(reward, Reward):
        return inner, type(reward).__name__
    return inner, reward.rpartition(":")[2]


def _finite(value: float, what: str) -> float:
    number = float(value)
    if not math.isfinite(number):
        raise ValueError(f"binary: {what} must be a finite number; got {value!r}")
    return number
