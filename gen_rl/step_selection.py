"""Which denoising steps are stochastic during a rollout and which of them are trained.

- ``all``: every step is an SDE step and every stochastic step is trained (Flow-GRPO);
- ``random_fraction``: every step is SDE; each sample trains a random ``fraction`` of its stochastic steps
  (DanceGRPO's / DDPO's timestep fraction);
- ``first``: every step is SDE; the first ``fraction`` of the stochastic steps are trained;
- ``random_window``: only a random window of ``window_size`` steps is SDE (ODE elsewhere) and exactly that
  window is trained (Flow-GRPO-Fast);
- ``sliding_window``: as ``random_window``, but the window starts at ``window_range[0]`` and moves by
  ``window_stride`` every ``window_every`` training steps, wrapping around (MixGRPO).

Every choice derives from ``(seed, step)`` so that all processes agree and a resumed run repeats it.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from gen_rl.seeding import derive_seed


def sde_window(
    strategy: str,
    step: int,
    num_steps: int,
    *,
    window_size: int,
    window_range: tuple[int, int] | None,
    stride: int,
    every: int,
    seed: int,
) -> tuple[int, int] | None:
    """The ``[start, end)`` steps sampled with the SDE at training step ``step``; None: all steps."""
    if strategy not in ("random_window", "sliding_window"):
        return None
    low, high = window_range or (0, num_steps)
    num_starts = high - low - window_size + 1
    if num_starts < 1:
        raise ValueError(f"window of {window_size} steps does not fit in [{low}, {high})")
    if strategy == "random_window":
        generator = torch.Generator().manual_seed(derive_seed(seed, "window", step))
        offset = int(torch.randint(num_starts, (1,), generator=generator))
    else:
        offset = (step // every * stride) % num_starts
    return low + offset, low + offset + window_size


def train_step_indices(stochastic: Tensor, strategy: str, *, fraction: float, seed: int, step: int) -> Tensor:
    """Per-sample indices ``[B, K]`` of the steps to train, chosen among ``stochastic`` ``[B, S]`` steps.

    K is the same for every sample: ``ceil(fraction * n)`` with ``n`` the smallest number of stochastic steps
    of any sample (for the window strategies and ``all``, ``fraction`` is ignored and K = n).
    """
    counts = stochastic.sum(dim=1)
    available = int(counts.min())
    if available == 0:
        raise ValueError("a sample has no stochastic step to train; check sde_window / noise_level > 0")
    positions = [torch.nonzero(row).flatten() for row in stochastic.cpu()]
    if strategy in ("all", "random_window", "sliding_window"):
        return torch.stack([row[:available] for row in positions])
    num_trained = max(1, math.ceil(fraction * available))
    if strategy == "first":
        return torch.stack([row[:num_trained] for row in positions])
    if strategy == "random_fraction":
        generator = torch.Generator().manual_seed(derive_seed(seed, "train-steps", step))
        chosen = [row[torch.randperm(len(row), generator=generator)[:num_trained]] for row in positions]
        return torch.stack([row.sort().values for row in chosen])
    raise ValueError(f"unknown step selection {strategy!r}")
