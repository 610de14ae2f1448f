"""Flash-GRPO (He et al. 2026, "Flash-GRPO: Efficient Alignment for Video Diffusion via One-Step Policy
Optimization", arXiv 2605.15980; reference code Shredded-Pork/Flash-GRPO ``scripts/train_wanx2_1_flash.py``).

- **One step per sample, iso-temporal**: a rollout is the ODE except one SDE step ``k``; the members of a group
  share ``k`` (so their advantage compares the same decision), only ``k`` trains. Here ``k`` is the same for a whole
  training step and is drawn *stratified* over training steps: every ``n`` consecutive training steps visit each
  of the ``n`` candidate steps once, in an order drawn from ``(seed, block)`` (the reference draws ``k`` per prompt
  uniformly at random among the first 10 steps).
- **Temporal gradient rectification**: the gradient of a step's log-prob w.r.t. the model output carries the
  factor ``c_k = |d mu / d v| / n_k`` (for the flow SDE ``sqrt|dt| / g + g sqrt|dt| (1 - s) / (2 s)``), which
  varies by orders of magnitude over the schedule. The surrogate is multiplied by
  ``lambda_k = (1 / c_k) / mean_j (1 / c_j)`` (the reference: ``value / mean(value)``, value = ``1 / c`` from
  its ``sde_step_with_logprob``, the mean over the batch; here over the candidate steps, the batch mean's
  expectation under the stratified draw). ``c_k`` is read off the sampler's own transition, so it holds for any
  step kind.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from gen_rl.algorithms.base import Policy
from gen_rl.algorithms.likelihood_tools import step_coefficients
from gen_rl.algorithms.options_likelihood import FlashGRPOOptions
from gen_rl.algorithms.policy_gradient import PolicyGradient
from gen_rl.core.seeding import derive_seed


def rectification_weights(gains: Tensor, stds: Tensor, candidates: Tensor) -> Tensor:
    """``lambda`` ``[S]``: ``(1 / c) / mean_candidates (1 / c)`` with ``c = |gain| / std`` (Flash-GRPO Sec. 3.3)."""
    inverse = stds / gains.abs()
    return inverse / inverse[candidates].mean()


class FlashGRPO(PolicyGradient):
    """Flash-GRPO: one stratified SDE step per training step and its rectification weight (module docstring)."""

    Options = FlashGRPOOptions
    options: FlashGRPOOptions

    def candidates(self) -> list[int]:
        """The steps the single SDE step is drawn from (``flash_steps`` within ``trainable_steps``)."""
        low, high = self.options.flash_steps or (0, self.num_steps)
        if self.options.trainable_steps is not None:
            low, high = max(low, self.options.trainable_steps[0]), min(high, self.options.trainable_steps[1])
        return list(range(low, high))

    def flash_step(self, step: int) -> int:
        """Training step ``step``'s SDE step: position ``step mod n`` of block ``step // n``'s permutation."""
        candidates = self.candidates()
        block, position = divmod(step, len(candidates))
        generator = torch.Generator().manual_seed(derive_seed(self.seed, "flash-strata", block))
        return candidates[int(torch.randperm(len(candidates), generator=generator)[position])]

    def sampling(self, step: int) -> dict[str, Any]:
        """The ODE everywhere but the training step's single SDE step."""
        flash = self.flash_step(step)
        return {"sde_window": (flash, flash + 1)}

    def step_weight(self, part: Any, column: Tensor, policy: Policy) -> Tensor | None:
        """``lambda_k`` of each sample's step (``rectify``), else None."""
        if not self.options.rectify:
            return None
        gains, stds = step_coefficients(policy.sampler, part)
        candidates = torch.tensor(self.candidates(), device=stds.device)
        return rectification_weights(gains, stds, candidates)[column[:, 0].to(stds.device)]
