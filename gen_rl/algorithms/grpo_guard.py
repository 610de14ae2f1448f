"""GRPO-Guard (Wang et al. 2025, "GRPO-Guard: Mitigating Implicit Over-Optimization in Flow Matching via Regulated
Clipping", arXiv 2510.22319): Flow-GRPO's clipped surrogate on a normalised ratio, reweighted per step.

With ``x = mu_old + n eps`` the step log-ratio of two Gaussians of std ``n`` is
``log rho = mean(eps . (mu - mu_old)) / n - mean|mu - mu_old|^2 / (2 n^2)``: its mean is negative and its spread
changes with ``n`` across steps, so clipping at ``1 + eps`` never catches over-confident positive updates.

- **RatioNorm**: ``log rho~ = (log rho + b) n`` with ``b = mean|mu - mu_old|^2 / (2 n^2)`` (the mean over latent
  elements, as the step log-probs), i.e. ``log rho~ = mean((x - mu_old) . (mu - mu_old)) / n``: zero-mean, and
  of the same scale at every step. ``n = g sqrt|dt|`` is the step std (Flow-Factory's ``sqrt(-dt) std_dev_t``).
- **Gradient reweighting**: each step's surrogate is multiplied by ``1 / |dt|`` (``dt`` the step's noise-level
  difference ``s_i - s_{i+1}``), which evens out the gradient magnitudes across noise levels.

The public implementations disagree on the second point. The paper (Sec. 4.2, "1/dt reweighting") and verl-omni's
``GRPOGuardLoss`` (``L_t / (sqrt(-dt))^2``) divide by the step size; Flow-Factory's ``GRPOGuardTrainer`` applies
RatioNorm only and averages the steps unweighted. We follow the paper and verl-omni by default
(``algorithm.step_reweight: inverse_dt``); ``step_reweight: none`` gives Flow-Factory's loss.
``tests/test_algorithms_likelihood.py`` checks both against the formula written out there.

``mu_old`` is the sampling policy's step mean (:class:`~gen_rl.algorithms.likelihood_tools.OldPolicyMeans`).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from gen_rl.algorithms.base import LossBatch, Policy
from gen_rl.algorithms.likelihood_tools import OldPolicyMeans, weighted_step_loss
from gen_rl.algorithms.options_likelihood import GRPOGuardOptions
from gen_rl.algorithms.policy_gradient import PolicyGradient


def ratio_norm(
    log_probs: Tensor, old_log_probs: Tensor, means: Tensor, old_means: Tensor, stds: Tensor
) -> Tensor:
    """RatioNorm's log-ratio ``[b, 1]``: ``(log p - log p_old + mean|mu - mu_old|^2 / (2 n^2)) n`` (GRPO-Guard
    Sec. 4.1). ``log_probs`` / ``old_log_probs`` / ``stds`` ``[b, 1]``, ``means`` / ``old_means`` ``[b, ...]``."""
    dims = tuple(range(1, means.ndim))
    bias = (means.float() - old_means.float()).square().mean(dim=dims)[:, None] / (2 * stds.square())
    return (log_probs - old_log_probs + bias) * stds


class GRPOGuard(OldPolicyMeans, PolicyGradient):
    """GRPO-Guard: RatioNorm and 1/|dt| step reweighting on Flow-GRPO's surrogate (see the module docstring)."""

    Options = GRPOGuardOptions
    options: GRPOGuardOptions

    def loss(self, batch: LossBatch, policy: Policy) -> tuple[Tensor, dict[str, Tensor]]:
        """Clipped surrogate of the normalised ratio x the step weight (+ beta KL) of one microbatch at one step."""
        self.check_unit_advantages()
        part, column = batch.rollout, batch.units
        step = self.new_and_old_steps(policy, part, column)
        log_ratio = ratio_norm(step.log_probs, step.old_log_probs, step.means, step.old_means, step.stds)
        kl = (
            self.reference_kl(policy, part, column, step.means, step.stds[:, 0])
            if self.options.kl_coef
            else None
        )
        return weighted_step_loss(
            self.options,
            log_ratio,
            batch.advantages,
            batch.weight,
            self.step_weight(part, column, policy),
            kl,
        )

    def step_weight(self, part: Any, column: Tensor, policy: Policy) -> Tensor:
        """``1 / |dt|`` per sample (``step_reweight: inverse_dt``), else 1."""
        rows = column[:, 0].to(part.sigmas.device)
        index = torch.arange(len(part), device=part.sigmas.device)
        step_size = (part.sigmas[index, rows] - part.sigmas[index, rows + 1]).float()
        if self.options.step_reweight == "none":
            return step_size.new_ones(step_size.shape)
        return 1.0 / step_size
