"""Which denoising steps are stochastic during a rollout and which of them are trained.

- ``all``: every step is an SDE step and every stochastic step is trained (Flow-GRPO);
- ``random_fraction``: every step is SDE; each sample trains a random ``fraction`` of its stochastic steps
  (DanceGRPO's / DDPO's timestep fraction: a fresh per-sample draw at every training step);
- ``first``: every step is SDE; the first ``fraction`` of the stochastic steps are trained (Flow-GRPO:
  ``timestep_fraction = 0.99`` of 10 steps trains steps 0..8);
- ``random_window``: only a random window of ``window_size`` steps is SDE (ODE elsewhere) and exactly that
  window is trained (Flow-GRPO-Fast);
- ``sliding_window``: as ``random_window``, but the window starts at ``window_range[0]`` and moves by
  ``window_stride`` every ``window_every`` training steps, wrapping around (MixGRPO).

The number of trained steps is ``floor(fraction * n)`` (at least 1), as ``int(num_steps * timestep_fraction)``
in the DDPO, Flow-GRPO and DanceGRPO reference code. ``trainable`` restricts the candidates to a ``[lo, hi)`` range
of step indices: DanceGRPO never trains the last of its 16 steps (``[0, 15)``).

Every choice derives from ``(seed, step)`` so that all processes agree and a resumed run repeats it.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from gen_rl.core.seeding import derive_seed


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


def num_trained_steps(fraction: float, available: int) -> int:
    """``floor(fraction * available)``, at least 1: how many of ``available`` steps a sample trains.

    ``floor`` is the papers' ``int(num_steps * timestep_fraction)`` (DDPO, Flow-GRPO, DanceGRPO).
    """
    return max(1, math.floor(fraction * available))


def train_step_indices(
    stochastic: Tensor,
    strategy: str,
    *,
    fraction: float,
    seed: int,
    step: int,
    trainable: tuple[int, int] | None = None,
) -> Tensor:
    """Per-sample indices ``[B, K]`` of the steps to train, chosen among ``stochastic`` ``[B, S]`` steps.

    Candidates are the stochastic steps inside ``trainable`` (``[lo, hi)``; None: all). K is the same for
    every sample: :func:`num_trained_steps` of ``n``, the smallest number of candidates of any sample (for the
    window strategies and ``all``, ``fraction`` is ignored and K = n). ``random_fraction`` draws a new subset
    per sample from ``(seed, step)``, so the trained steps vary from one training step to the next.
    """
    candidates = stochastic.clone()
    if trainable is not None:
        low, high = trainable
        inside = torch.zeros_like(candidates)
        inside[:, low:high] = True
        candidates &= inside
    counts = candidates.sum(dim=1)
    available = int(counts.min())
    if available == 0:
        raise ValueError(
            "a sample has no stochastic step to train (inside train.trainable_steps, if set); check the SDE window, "
            "noise_level > 0 and train.trainable_steps"
        )
    positions = [torch.nonzero(row).flatten() for row in candidates.cpu()]
    if strategy in ("all", "random_window", "sliding_window"):
        return torch.stack([row[:available] for row in positions])
    num_trained = num_trained_steps(fraction, available)
    if strategy == "first":
        return torch.stack([row[:num_trained] for row in positions])
    if strategy == "random_fraction":
        generator = torch.Generator().manual_seed(derive_seed(seed, "train-steps", step))
        chosen = [row[torch.randperm(len(row), generator=generator)[:num_trained]] for row in positions]
        return torch.stack([row.sort().values for row in chosen])
    raise ValueError(f"unknown step selection {strategy!r}")
