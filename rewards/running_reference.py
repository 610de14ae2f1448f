"""A learning reward: distance to a running reference of past samples' features; registered ``running_reference``.

The reward keeps ``reference``, an exponential moving average of the features of the samples it was updated
with, and scores a sample by its root-mean-square feature distance to it,

    d(x) = ||f(x) - reference||_2 / sqrt(D),    score = d(x) ("novelty")  or  1 - d(x) ("similarity"),

both in [0, 1] because the features are in [0, 1]. Features (``features``): ``"pixels"``, the area-averaged
``size x size`` pixels of ``rewards.monitors.pixel_features`` (video: every frame), or ``"colour"``, the
mean RGB of the sample (``D = 3``; video: over all frames).

Update (once per training step, all processes together): with ``m`` the mean feature of the step's samples
with finite pixels on every process (gathered) and ``k`` their number,

    reference <- decay^k * reference + (1 - decay^k) * m,

so ``decay`` is a per-sample decay: the reference forgets at the same rate per sample however samples are
split over steps and processes. The first update sets ``reference = m``; before it, the reference is the
constant ``initial`` (default 0.5, mid-grey). An update with no finite sample leaves the state as it was,
so the state is always finite. ``novelty`` rewards the policy for moving away from what it produced lately
(an exploration bonus against mode collapse); ``similarity`` for staying close to it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from rewards.base import (
    MODALITY_RANKS,
    LearningReward,
    RewardOutput,
    RewardStateError,
    RewardUpdate,
    register_reward,
)
from rewards.monitors import pixel_features

FEATURES = ("pixels", "colour")
MODES = ("novelty", "similarity")


def reference_features(pixels: Tensor, features: str, size: int) -> Tensor:
    """``[B, D]`` float64 features in [0, 1] of pixels ``[B, C, H, W]`` or ``[B, C, T, H, W]``."""
    if features == "colour":
        return pixels.double().flatten(2).mean(dim=2)
    return pixel_features(pixels.double(), size).double()


@register_reward("running_reference")
class RunningReferenceReward(LearningReward):
    """Score = RMS feature distance to an EMA reference of past samples (``novelty``) or 1 minus it."""

    def __init__(
        self,
        features: str = "pixels",
        size: int = 8,
        decay: float = 0.99,
        mode: str = "novelty",
        initial: float = 0.5,
        modality: str = "image",
    ) -> None:
        if features not in FEATURES:
            raise ValueError(f"running_reference: features must be one of {FEATURES}; got {features!r}")
        if mode not in MODES:
            raise ValueError(f"running_reference: mode must be one of {MODES}; got {mode!r}")
        if modality not in MODALITY_RANKS:
            raise ValueError(
                f"running_reference: modality must be one of {sorted(MODALITY_RANKS)}; got {modality!r}"
            )
        if not (isinstance(size, int) and size > 0):
            raise ValueError(f"running_reference: size must be a positive integer; got {size!r}")
        if not 0.0 <= float(decay) < 1.0:
            raise ValueError(f"running_reference: decay must be in [0, 1) (per sample); got {decay!r}")
        if not 0.0 <= float(initial) <= 1.0:
            raise ValueError(f"running_reference: initial must be in [0, 1]; got {initial!r}")
        self.features, self.size, self.mode = features, size, mode
        self.decay, self.initial = float(decay), float(initial)
        self.modality = modality  # instance attribute: the same reward serves images or video
        self.reference: Tensor | None = None  # [D] float64 once updated
        self.samples_seen = 0
        self.updates = 0

    def current_reference(self, dimension: int) -> Tensor:
        """The reference ``[D]`` float64 (the constant ``initial`` before the first update)."""
        if self.reference is None:
            return torch.full((dimension,), self.initial, dtype=torch.float64)
        if self.reference.numel() != dimension:
            raise RewardStateError(
                f"running_reference holds a reference of {self.reference.numel()} features but the samples have "
                f"{dimension}; keep the image size, frame count and channels of the run it learned on"
            )
        return self.reference

    def score(self, pixels: Tensor, prompts: list[str], metadata: list[dict]) -> RewardOutput:
        """``d`` (novelty) or ``1 - d`` (similarity), ``d`` the RMS feature distance to the reference."""
        features = reference_features(pixels, self.features, self.size)
        reference = self.current_reference(features.shape[1]).to(features.device)
        distance = (features - reference).pow(2).mean(dim=1).sqrt()
        scores = distance if self.mode == "novelty" else 1.0 - distance
        return RewardOutput(scores=scores, components={"reference_distance": distance})

    @torch.no_grad()
    def update(self, batch: RewardUpdate) -> dict[str, float]:
        """EMA of the step's mean feature over all processes with per-sample decay ``decay^k``."""
        valid = (
            batch.valid if batch.valid is not None else torch.ones(batch.pixels.shape[0], dtype=torch.bool)
        )
        features = reference_features(batch.pixels, self.features, self.size).cpu()
        self.current_reference(features.shape[1])  # a shape change is one line, before anything changes
        local_sum = features[valid.cpu()].sum(dim=0)
        local_count = torch.tensor([float(valid.sum())], dtype=torch.float64)
        total = batch.gather(local_sum[None]).sum(dim=0)
        count = int(batch.gather(local_count).sum().item())
        if count == 0:
            return {"reference_samples": 0.0, "reference_shift": 0.0}
        mean = total / count
        if self.reference is None:
            new_reference = mean
        else:
            keep = self.decay**count
            new_reference = keep * self.reference + (1.0 - keep) * mean
        shift = (new_reference - self.current_reference(features.shape[1])).pow(2).mean().sqrt().item()
        self.reference = new_reference
        self.samples_seen += count
        self.updates += 1
        return {"reference_samples": float(count), "reference_shift": shift}

    def state_dict(self) -> dict[str, Any]:
        """``reference`` (``[D]`` float64 or None), ``samples_seen``, ``updates`` and the feature settings."""
        return {
            "reference": None if self.reference is None else self.reference.clone(),
            "samples_seen": self.samples_seen,
            "updates": self.updates,
            "features": self.features,
            "size": self.size,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore ``state_dict`` output; one line when the features differ or the reference is not finite."""
        if (state.get("features"), state.get("size")) != (self.features, self.size):
            raise RewardStateError(
                f"running_reference state was learned with features={state.get('features')!r}, "
                f"size={state.get('size')!r}; this reward has features={self.features!r}, size={self.size}: "
                "keep them when resuming"
            )
        reference = state["reference"]
        if reference is not None:
            if not isinstance(reference, Tensor) or reference.ndim != 1:
                raise RewardStateError("running_reference state 'reference' must be a [D] tensor or None")
            if not bool(torch.isfinite(reference).all()):
                raise RewardStateError(
                    "running_reference state 'reference' is not finite; the checkpoint is damaged"
                )
            reference = reference.detach().to(device="cpu", dtype=torch.float64).clone()
        self.reference = reference
        self.samples_seen = int(state["samples_seen"])
        self.updates = int(state["updates"])

    def __repr__(self) -> str:
        return (
            f"RunningReferenceReward(features={self.features!r}, size={self.size}, decay={self.decay}, "
            f"mode={self.mode!r}, updates={self.updates})"
        )
