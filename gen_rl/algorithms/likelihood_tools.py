"""Pieces shared by the likelihood-ratio algorithms of issue 16: the sampling policy's step means, a per-step
weighted clipped surrogate, and each step's noise std and mean gain read off the sampler's own transition.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from gen_rl.algorithms.options import PolicyGradientOptions
from gen_rl.core.losses import clipped_surrogate


class OldPolicyMeans:
    """Mixin: the Gaussian step means ``mu_old`` of the policy that sampled the rollout.

    The rollout stores each step's sample and log-prob, not its mean. :meth:`rollout_context` keeps a copy of the
    trained parameters as they sample; until the first optimizer update after it, ``mu_old`` is the current mean
    (same parameters, same inputs), afterwards it is recomputed with the copy swapped in (no gradient).
    """

    _old_tensors: list[Tensor] | None = None
    _stale: bool = False  # an optimizer update happened since the rollout

    def rollout_context(self, policy: Any) -> AbstractContextManager[None]:
        """Remember the sampling policy's parameters (the rollout itself runs with the current policy)."""
        self._old_tensors = [param.detach().clone() for param in policy.parameters]
        self._stale = False
        return nullcontext()

    def after_update(self, policy: Any) -> None:
        """After an optimizer step the current means are no longer the sampling policy's."""
        self._stale = True

    def old_means(self, policy: Any, part: Any, column: Tensor) -> Tensor | None:
        """``mu_old`` ``[b, ...]`` at ``column`` ``[b, 1]``, or None when it equals the current mean (no update
        since the rollout). Call it before the forward that builds the graph: swapping parameters afterwards would
        change tensors saved for backward."""
        if not self._stale:
            return None
        if self._old_tensors is None:
            raise RuntimeError(
                f"{type(self).__name__}: an update happened before any rollout_context(policy)"
            )
        with torch.no_grad(), policy.swapped(self._old_tensors):
            return policy.sampler.log_prob(part, column).means[:, 0].detach()

    def new_and_old_steps(self, policy: Any, part: Any, column: Tensor) -> StepTerms:
        """The current step (with gradients) and the sampling policy's at ``column`` ``[b, 1]``: ``mu_old`` comes
        first (see :meth:`old_means`); where no update happened yet it is the current mean, detached."""
        old_means = self.old_means(policy, part, column)
        out = policy.sampler.log_prob(part, column)
        means = out.means[:, 0]
        old_log_probs = part.log_probs.gather(1, column.to(part.log_probs.device)).to(out.log_probs.device)
        reference = means.detach() if old_means is None else old_means
        return StepTerms(out.log_probs, means, out.stds.detach(), old_log_probs, reference)


@dataclass(frozen=True)
class StepTerms:
    """One trained step: current ``log_probs`` ``[b, 1]`` and ``means`` ``[b, ...]`` (with gradients), detached
    ``stds`` ``[b, 1]``, the stored ``old_log_probs`` ``[b, 1]`` and the sampling policy's ``old_means``."""

    log_probs: Tensor
    means: Tensor
    stds: Tensor
    old_log_probs: Tensor
    old_means: Tensor


def weighted_step_loss(
    options: PolicyGradientOptions,
    log_ratio: Tensor,
    advantages: Tensor,
    weight: Tensor,
    step_weight: Tensor,
    kl: Tensor | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """PPO's clipped surrogate per step times a per-sample step weight, plus ``kl_coef`` x the KL.

    ``log_ratio`` ``[b, 1]`` (with gradient), ``advantages`` / ``weight`` / ``step_weight`` ``[b]``, ``kl`` ``[b]``:
    ``mean_i w_i lambda_i max(-A_i rho_i, -A_i clip(rho_i, 1 - eps_low, 1 + eps_high)) + beta mean_i w_i KL_i``
    (Flow-GRPO eq. 8 with the step weights of TempFlow-GRPO, Flash-GRPO and GRPO-Guard).
    """
    surrogate = clipped_surrogate(
        log_ratio,
        torch.zeros_like(log_ratio),
        advantages,
        clip_low=options.clip_low,
        clip_high=options.clip_high,
    )
    policy_loss = (surrogate.loss[:, 0] * weight * step_weight.detach()).mean()
    kl_mean = (kl * weight).mean() if kl is not None else policy_loss.new_zeros(())
    loss = policy_loss + options.kl_coef * kl_mean
    ratio = surrogate.ratio.detach()
    stats = {
        "loss/total": loss.detach(),
        "loss/policy": policy_loss.detach(),
        "loss/kl": kl_mean.detach(),
        "policy/clip_fraction": surrogate.clipped.float().mean(),
        "policy/approx_kl": 0.5 * log_ratio.detach().float().square().mean(),
        "policy/ratio_mean": ratio.mean(),
        "policy/ratio_dev_max": (ratio - 1).abs().max(),
        "policy/step_weight_mean": step_weight.detach().float().mean(),
    }
    return loss, stats


@torch.no_grad()
def step_coefficients(sampler: Any, rollout: Any) -> tuple[Tensor, Tensor]:
    """Each step's mean gain ``d mu / d output`` and noise std ``n``, both ``[S]`` float32, of the rollout's grid.

    Read off the sampler's own stochastic transition (``_transition``), whose mean is affine in the model output:
    the gain is ``mu(output = 1) - mu(output = 0)`` at ``x = 0``, the std does not depend on either. For the
    Flow-GRPO SDE this is ``dt (1 + g^2 (1 - s) / (2 s))`` and ``g sqrt|dt|``; it holds for every step kind.
    """
    levels = sampler._levels(
        rollout.sigmas[:1].float(), None if rollout.alpha_bars is None else rollout.alpha_bars[:1].float()
    )[0]
    device = levels.device
    latents = torch.zeros(2, 1, device=device)
    output = torch.tensor([[0.0], [1.0]], device=device)
    gains, stds = [], []
    for index in range(rollout.num_steps):
        out = sampler._transition(
            rollout.sde_type,
            latents,
            output,
            levels[index].expand(2),
            levels[index + 1].expand(2),
            rollout.noise_level,
            None,
            None,
        )
        gains.append(out.mean[1, 0] - out.mean[0, 0])
        stds.append(out.std[0])
    return torch.stack(gains).float(), torch.stack(stds).float()


def units_of(batch_units: Tensor, like: Tensor) -> Tensor:
    """The ``[b]`` step index of each sample of a loss batch (``units`` ``[b, 1]``) on ``like``'s device."""
    return batch_units[:, 0].to(like.device)
