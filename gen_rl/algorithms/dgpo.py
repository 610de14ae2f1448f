"""DGPO: Direct Group Preference Optimization (Luo, Hu & Tang 2025, "Reinforcing Diffusion Models by Direct
Group Preference Optimization", arXiv 2510.08425; code Luo-Yihong/DGPO).

DPO's implicit reward of a sample under a diffusion model (Diffusion-DPO) is ``-beta (l_theta - l_ref)``, with
``l`` the per-sample flow-matching error at a shared time and noise. DGPO compares the group's positive
samples (A > 0) with its negative ones (A < 0), each weighted by |A|, in one Bradley-Terry preference:

    z_g = (beta / G) sum_{i in g} A_i (l_theta,i - l_ref,i)         (= -(weighted positive - negative rewards))
    L   = mean_g -log sigmoid(-z_g) = mean_g softplus(z_g)

The gradient is ``sigmoid(z_g) (beta / G) sum_i A_i grad l_theta,i``: the reference code's surrogate
``mean_i sigmoid(sg z_g) A_i l_theta,i`` up to the constant ``beta B / G`` (its ``_compute_group_dgpo_loss``).
As in the reference: the rollouts run the configured sampler (the ODE in its configs), every sample of the step
trains at the same grid times, the members of a group share their noise, ``l`` is a mean over latent
elements, and the reference is the frozen model (the LoRA disabled). Not implemented: the reference code's
optional switch to an EMA reference after N steps and its PPO-style clipping of the matching error.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torch.nn import functional

from gen_rl.algorithms.base import Algorithm, LossBatch, Policy
from gen_rl.algorithms.forward_process import (
    check_whole_groups,
    draw_noise,
    grid_times,
    group_index,
    matching_error,
    noise_clean,
    random_grid_points,
    refuse_non_flow,
    velocity_fn,
)
from gen_rl.algorithms.options_matching import DGPOOptions


def group_preference_logits(
    errors: Tensor, reference_errors: Tensor, advantages: Tensor, groups: Tensor, num_groups: int, beta: float
) -> Tensor:
    """``z_g = beta / G_g sum_{i in g} A_i (l_theta,i - l_ref,i)`` ``[num_groups]`` (G_g: members of group g)."""
    contributions = advantages * (errors - reference_errors)
    sums = torch.zeros(num_groups, dtype=contributions.dtype, device=contributions.device)
    sums = sums.index_add(0, groups, contributions)
    sizes = torch.bincount(groups, minlength=num_groups).to(contributions.dtype)
    return beta * sums / sizes


class DGPO(Algorithm):
    """Direct Group Preference Optimization on a rectified-flow sampler (see the module docstring)."""

    Options = DGPOOptions
    needs = frozenset({"clean_latents"})
    whole_groups = True  # asks the trainer for microbatches of whole groups (requests/beyond_algos.md)
    options: DGPOOptions

    def __init__(self, options: DGPOOptions, *, seed: int, num_steps: int) -> None:
        super().__init__(options, seed=seed, num_steps=num_steps)
        self.group_size: int | None = None

    def check(self, sampler: Any, rewards: dict[str, Any], sample: Any) -> None:
        """Refuse a non-flow sampler and CFG; remember the group size (a microbatch must hold whole groups)."""
        refuse_non_flow("dgpo", sampler, sample)
        self.group_size = getattr(sample, "group_size", None)

    def select(self, rollout: Any, step: int) -> Tensor:
        """``floor(S x step_fraction)`` grid points ``[B, K]``, the same for every sample of the step."""
        return random_grid_points(
            rollout, self.options.step_fraction, self.seed, "dgpo-units", step, shared=True
        )

    def loss(self, batch: LossBatch, policy: Policy) -> tuple[Tensor, dict[str, Tensor]]:
        """The group preference loss of the microbatch's groups at one shared grid point."""
        options = self.options
        rollout = batch.rollout
        device = rollout.latents.device
        groups, num_groups = group_index(rollout)
        check_whole_groups("dgpo", groups, num_groups, self.group_size)
        clean = rollout.latents[:, -1].float()
        times, model_times = grid_times(rollout, batch.units[:, 0])
        if options.shared_noise:
            noise = draw_noise(batch, (num_groups, *clean.shape[1:]), "dgpo-noise", self.seed).to(device)[
                groups
            ]
        else:
            noise = draw_noise(batch, clean.shape, "dgpo-noise", self.seed).to(device)
        noised, target = noise_clean(clean, times, noise)
        predict = velocity_fn(policy, rollout)
        with torch.no_grad(), policy.reference():
            reference_errors = matching_error(predict(noised, model_times), target)
        errors = matching_error(predict(noised, model_times), target)

        advantages = batch.advantages.to(device).float() * batch.weight.to(device).float()
        logits = group_preference_logits(
            errors, reference_errors, advantages, groups, num_groups, options.beta
        )
        loss = functional.softplus(logits).mean()
        stats = {
            "loss/total": loss.detach(),
            "loss/policy": loss.detach(),
            "dgpo/preference": torch.sigmoid(-logits.detach()).mean(),
            "dgpo/error_gap": (errors.detach() - reference_errors).mean(),
        }
        return loss, stats
