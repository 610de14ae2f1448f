"""Video rewards: InstructVideo's segmental image reward (SegVR + TAR) and DINOv2 temporal consistency.

InstructVideo (Yuan et al., CVPR 2024, "Instructing Video Diffusion Models with Human Feedback"; reference
code ali-vilab/VGen ``utils/reward/reward.py``) scores a video with an IMAGE reward model:

- Segmental Video Reward (SegVR): split the ``T`` frames into ``S`` segments, sample frames sparsely in each
  segment (TSN style) and average their image rewards, ``R(x) = 1/S * sum_s r(x_{t_s})``.
- Temporally Attenuated Reward (TAR): weight each sampled frame by ``c_t = exp(-lambda * |t - T // 2|)``,
  so frames far from the middle count less, ``R(x) = 1/S * sum_s c_{t_s} * r(x_{t_s})``. As in VGen the
  coefficients are not renormalised (``normalize_weights=True`` gives ``sum c r / sum c`` instead).

``TemporalConsistency`` is a weight-light video reward of its own: the mean cosine similarity of the DINOv2
features of consecutive frames (1 for a static video).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from rewards.base import Reward, RewardOutput, build_inner_reward, register_reward
from rewards.dino import DinoEmbedder
from rewards.preprocess import frames_as_images

SELECTIONS = ("uniform", "first", "random")


# ----- frame selection and attenuation -----------------------------------------------------------------------
def segment_bounds(num_frames: int, segments: int) -> list[int]:
    """Segment boundaries ``[b_0 = 0, ..., b_S = T]`` with ``b_s = floor(s * T / S)``.

    When ``S`` divides ``T`` the segments are VGen's (``span = T // S``, segment ``s`` = frames
    ``[s * span, (s + 1) * span)``); otherwise VGen drops the last ``T mod S`` frames while these segments
    keep them (lengths ``floor(T / S)`` or ``ceil(T / S)``, spread over the video).
    """
    if segments < 1:
        raise ValueError(f"segments must be >= 1; got {segments}")
    if num_frames < segments:
        raise ValueError(
            f"a video of {num_frames} frames cannot be split into {segments} segments; use segments <= "
            f"{num_frames} (each segment needs at least one frame)"
        )
    return [(s * num_frames) // segments for s in range(segments + 1)]


def segment_frame_indices(
    num_frames: int,
    segments: int,
    frames_per_segment: int = 1,
    selection: str = "uniform",
    generator: torch.Generator | None = None,
) -> Tensor:
    """Frame indices ``[segments, frames_per_segment]`` (int64, ascending) sampled sparsely per segment.

    Segment ``s`` covers frames ``[floor(s * T / S), floor((s + 1) * T / S))`` (VGen's ``span = T // S``
    segments when ``S`` divides ``T``; the tail is kept otherwise). With ``k = frames_per_segment`` and a
    segment of ``L`` frames starting at ``b``:

    - ``"first"``: frames ``b, ..., b + k - 1`` (VGen's ``fixed_first`` for ``k = 1``: frame ``s * span``);
    - ``"uniform"``: the frames under ``k`` evenly spaced centres, ``b + floor((j + 1/2) * L / k)`` (TSN's
      test-time sampling);
    - ``"random"``: ``k`` distinct uniformly random frames of the segment drawn with ``generator`` (TSN /
      VGen's training-time ``s * span + randint(span)`` for ``k = 1``).
    """
    if frames_per_segment < 1:
        raise ValueError(f"frames_per_segment must be >= 1; got {frames_per_segment}")
    if selection not in SELECTIONS:
        raise ValueError(f"frame selection must be one of {SELECTIONS}; got {selection!r}")
    bounds = segment_bounds(num_frames, segments)
    rows = []
    for s in range(segments):
        start, length = bounds[s], bounds[s + 1] - bounds[s]
        if length < frames_per_segment:
            raise ValueError(
                f"segment {s} of a {num_frames}-frame video split into {segments} segments has {length} "
                f"frames, fewer than frames_per_segment={frames_per_segment}; use fewer segments or frames "
                "per segment"
            )
        rows.append(start + _offsets_in_segment(length, frames_per_segment, selection, generator))
    return torch.stack(rows)


def _offsets_in_segment(length: int, count: int, selection: str, generator: torch.Generator | None) -> Tensor:
    """``count`` distinct ascending offsets in ``[0, length)`` chosen by ``selection``."""
    if selection == "first":
        return torch.arange(count, dtype=torch.long)
    if selection == "uniform":
        return torch.tensor([((2 * j + 1) * length) // (2 * count) for j in range(count)], dtype=torch.long)
    return torch.randperm(length, generator=generator)[:count].sort().values


def temporal_attenuation(
    frame_indices: Tensor, num_frames: int, rate: float, dtype: torch.dtype = torch.float32
) -> Tensor:
    """TAR coefficients ``exp(-rate * |t - T // 2|)`` (``dtype``, the shape of ``frame_indices``).

    InstructVideo's Temporally Attenuated Reward; VGen's ``TSN_coef = exp(-|global_index - frame_num // 2|
    * lambda_TAR)``. ``rate = 0`` gives all ones (plain SegVR).
    """
    check_attenuation(rate)
    distance = (frame_indices.to(torch.float64) - num_frames // 2).abs()
    return torch.exp(-rate * distance).to(dtype)


def check_attenuation(rate: float) -> None:
    """``ValueError`` unless the TAR rate ``lambda`` is a finite number >= 0."""
    if not isinstance(rate, int | float) or not math.isfinite(rate) or rate < 0:
        raise ValueError(
            f"the temporal attenuation rate (TAR lambda) must be a finite number >= 0; got {rate!r}"
        )


# ----- SegVR / TAR -------------------------------------------------------------------------------------------
@register_reward("segmental")
class SegmentalVideoReward(Reward):
    """InstructVideo's segmental video reward: an image reward on sparsely sampled frames, (TAR-)averaged.

    For a video ``x`` of ``T`` frames, selected frames ``t_{s,j}`` (segment ``s < S``, ``j < k``, see
    ``segment_frame_indices``), image reward ``r`` and coefficients ``c_t = exp(-lambda * |t - T // 2|)``::

        R(x) = 1 / (S k) * sum_{s,j} c_{t_{s,j}} * r(x_{t_{s,j}})                 (VGen, default)
        R(x) = sum_{s,j} c * r / sum_{s,j} c                              (normalize_weights=True)

    ``attenuation = 0`` (all ``c = 1``) is plain SegVR, the mean frame reward; VGen's config uses
    ``lambda_TAR = 1``. ``reward``: an image reward's registered name or ``package.module:Class`` path
    (built with ``kwargs``), or a built ``Reward``. All selected frames of the batch are scored in one call
    of the image reward, each with its video's prompt and metadata. ``"random"`` selection draws new frames
    per video and per call from a generator seeded with ``seed``.

    Components: ``segment_{s}`` (the unweighted mean frame reward of segment ``s``), ``segment_spread``
    (max - min of those over segments) and the image reward's components averaged over the frames.
    A NaN frame reward makes the video's score NaN.
    """

    modality = "video"

    def __init__(
        self,
        reward: str | Reward,
        kwargs: dict[str, Any] | None = None,
        segments: int = 4,
        frames_per_segment: int = 1,
        selection: str = "uniform",
        attenuation: float = 0.0,
        normalize_weights: bool = False,
        seed: int = 0,
    ) -> None:
        if segments < 1 or frames_per_segment < 1:
            raise ValueError(
                f"segmental reward needs segments >= 1 and frames_per_segment >= 1; got {segments} and "
                f"{frames_per_segment}"
            )
        if selection not in SELECTIONS:
            raise ValueError(f"segmental reward selection must be one of {SELECTIONS}; got {selection!r}")
        check_attenuation(attenuation)
        self.segments = segments
        self.frames_per_segment = frames_per_segment
        self.selection = selection
        self.attenuation = float(attenuation)
        self.normalize_weights = normalize_weights
        self.generator = torch.Generator().manual_seed(seed)
        self.reward = build_inner_reward(reward, kwargs, "segmental reward", modality="image")

    def frame_indices(self, batch: int, num_frames: int) -> Tensor:
        """Selected frames ``[B, S, k]``: one draw per video for ``"random"``, shared otherwise."""
        draws = batch if self.selection == "random" else 1
        indices = [
            segment_frame_indices(
                num_frames, self.segments, self.frames_per_segment, self.selection, self.generator
            )
            for _ in range(draws)
        ]
        return torch.stack(indices).expand(batch, -1, -1)

    def score(self, pixels: Tensor, prompts: list[str], metadata: list[dict]) -> RewardOutput:
        """(TAR-weighted) mean image reward of the selected frames; one image-reward call for the batch."""
        batch, _, num_frames = pixels.shape[:3]
        indices = self.frame_indices(batch, num_frames)  # [B, S, k]
        per_video = indices.shape[1] * indices.shape[2]
        frames = _gather_frames(pixels, indices.reshape(batch, per_video).to(pixels.device))
        repeated_prompts = [prompt for prompt in prompts for _ in range(per_video)]
        repeated_metadata = [record for record in metadata for _ in range(per_video)]
        inner = self.reward(frames, repeated_prompts, repeated_metadata)
        frame_scores = inner.scores.view(batch, self.segments, self.frames_per_segment)
        # float64: with normalize_weights, far frames' tiny coefficients must not underflow to 0 / 0
        coefficients = temporal_attenuation(indices, num_frames, self.attenuation, dtype=torch.float64)
        scores = self.reduce(frame_scores.double(), coefficients).float()
        components = _segment_components(frame_scores)
        for name, values in inner.components.items():
            components[name] = values.view(batch, per_video).mean(dim=1)
        return RewardOutput(scores=scores, components=components)

    def reduce(self, frame_scores: Tensor, coefficients: Tensor) -> Tensor:
        """``[B]`` from frame rewards and TAR coefficients ``[B, S, k]``: mean of ``c r`` or ``sum c r / sum c``."""
        weighted = (coefficients * frame_scores).flatten(1)
        if self.normalize_weights:
            return weighted.sum(dim=1) / coefficients.flatten(1).sum(dim=1)
        return weighted.mean(dim=1)


def _gather_frames(pixels: Tensor, indices: Tensor) -> Tensor:
    """Frames ``[B * n, C, H, W]`` (video-major) of ``pixels`` ``[B, C, T, H, W]`` at ``indices`` ``[B, n]``."""
    batch = pixels.shape[0]
    videos = pixels.permute(0, 2, 1, 3, 4)  # [B, T, C, H, W]
    selected = videos[torch.arange(batch, device=pixels.device)[:, None], indices]  # [B, n, C, H, W]
    return selected.flatten(0, 1)


def _segment_components(frame_scores: Tensor) -> dict[str, Tensor]:
    """``segment_{s}``: unweighted mean frame reward of each segment; ``segment_spread``: their max - min."""
    per_segment = frame_scores.mean(dim=2)  # [B, S]
    components = {f"segment_{s}": per_segment[:, s] for s in range(per_segment.shape[1])}
    components["segment_spread"] = per_segment.amax(dim=1) - per_segment.amin(dim=1)
    return components


# ----- temporal consistency ----------------------------------------------------------------------------------
@register_reward("temporal_consistency")
class TemporalConsistency(Reward):
    """Mean DINOv2 cosine similarity of frames ``stride`` apart: ``1/(T-d) * sum_t cos(f_t, f_{t+d})``.

    ``f_t`` are the unit-norm DINOv2 CLS features (``DinoEmbedder``) of frame ``t`` and ``d = stride``; a
    static video scores 1. Component ``min_frame_similarity``: the least similar compared pair.
    """

    modality = "video"

    def __init__(
        self,
        model: str = "facebook/dinov2-base",
        device: str | None = None,
        dtype: str = "float32",
        stride: int = 1,
    ) -> None:
        if stride < 1:
            raise ValueError(f"temporal_consistency stride must be >= 1; got {stride}")
        self.stride = stride
        self.embedder = DinoEmbedder(model, device=device, dtype=dtype)

    def score(self, pixels: Tensor, prompts: list[str], metadata: list[dict]) -> RewardOutput:
        """Mean and min over ``t`` of ``cos(f_t, f_{t + stride})``, all frames embedded in one batch."""
        batch, channels, num_frames = pixels.shape[:3]
        if num_frames < 2:
            raise ValueError(
                f"temporal_consistency needs videos of >= 2 frames to compare; got {num_frames} frame(s)"
            )
        if num_frames <= self.stride:
            raise ValueError(
                f"temporal_consistency with stride {self.stride} needs videos of > {self.stride} frames; "
                f"got {num_frames}"
            )
        if channels != 3:
            raise ValueError(
                f"temporal_consistency needs RGB videos [B, 3, T, H, W]; got {channels} channels"
            )
        features = self.embedder.embed(frames_as_images(pixels)).view(batch, num_frames, -1)
        similarity = (features[:, : -self.stride] * features[:, self.stride :]).sum(dim=-1)  # [B, T - d]
        return RewardOutput(
            scores=similarity.mean(dim=1), components={"min_frame_similarity": similarity.amin(dim=1)}
        )
