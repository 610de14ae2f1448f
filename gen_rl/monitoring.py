"""The trainer's reward-hacking monitors: image statistics, in-group diversity and gold rewards, as metrics.

Every step: the mean of each image statistic over the whole step (gathered from every process) and the mean /
minimum in-group diversity (``monitor_*``). At eval: the same over the eval samples (``eval_monitor_*``; each
eval prompt's fixed-seed samples form a group) and every gold reward (``eval_gold_<name>``).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from rewards.monitors import STATISTICS, group_diversity, image_statistics, pixel_features


class HackingMonitor:
    """Computes the monitor metrics; ``diversity_model`` (a DINOv2 path / hub id) or pixel features."""

    def __init__(self, diversity_model: str = "", device: torch.device | None = None) -> None:
        self.embedder = None
        if diversity_model:
            from rewards.dino import DinoEmbedder

            self.embedder = DinoEmbedder(diversity_model, device=str(device) if device else None)

    def features(self, pixels: Tensor) -> tuple[Tensor, str]:
        """Diversity features of ``pixels`` and their metric: DINOv2 (cosine) or downsampled pixels (rms)."""
        if self.embedder is None or pixels.ndim != 4:
            return pixel_features(pixels), "rms"
        return self.embedder.embed(pixels), "cosine"

    @torch.no_grad()
    def local(self, pixels: Tensor, group_ids: Tensor) -> tuple[Tensor, Tensor]:
        """This process's per-sample statistics ``[n, 4]`` and per-group diversity ``[g]`` (whole groups)."""
        per_sample = image_statistics(pixels)
        statistics = torch.stack([per_sample[name] for name in STATISTICS], dim=1)
        features, metric = self.features(pixels)
        _, diversity = group_diversity(features, group_ids.to(features.device), metric)
        return statistics, diversity

    @staticmethod
    def record(statistics: Tensor, diversity: Tensor, prefix: str = "monitor/") -> dict[str, float]:
        """Metrics from gathered per-sample statistics ``[N, 4]`` and per-group diversity ``[G]``."""
        record: dict[str, Any] = {
            f"{prefix}{name}": float(statistics[:, column].mean()) for column, name in enumerate(STATISTICS)
        }
        finite = diversity[torch.isfinite(diversity)]
        if finite.numel():  # groups of one sample (e.g. one eval sample per prompt) have no diversity
            record[f"{prefix}diversity"] = float(finite.mean())
            record[f"{prefix}diversity_min"] = float(finite.min())
        return record
