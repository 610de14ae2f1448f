"""AWM: Advantage Weighted Matching (Xue et al. 2025, "Advantage Weighted Matching: Aligning RL with
Pretraining in Diffusion Models", arXiv 2509.25050).

The flow-matching loss is the diffusion model's (negative, up to constants and weighting) log-likelihood
surrogate, so policy gradient on it is the pretraining loss weighted by the advantage. With
``l(theta) = w(t) mean((v_theta(x_t, t, c) - (eps - x0))^2)`` at a time ``t`` and noise ``eps`` shared by the
current and the sampling ("old") policy, the implemented objective is PPO's clipped surrogate

    rho  = exp(l_old - l_theta)                                (log p ~ -l)
    L    = mean_b max(-A rho, -A clip(rho, 1 - eps_low, 1 + eps_high))  [+ kl_coef mean (v_theta - v_ref)^2]

whose gradient at ``rho = 1`` is ``A grad l_theta``: advantage-weighted matching (the paper's eq. for
L_AWM = E[A w(t) ||v_theta - (eps - x0)||^2]). As in Flow-Factory's AWM trainer (``trainers/rl/awm.py``),
``w`` is 1 (``uniform``) or ``t``, the error is a mean over latent elements, and the old policy is the one
that sampled the rollout (its parameters are snapshotted when the step's rollouts start).
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from typing import Any

import torch
from torch import Tensor

from gen_rl.algorithms.base import Algorithm, LossBatch, Policy
from gen_rl.algorithms.forward_process import (
    draw_noise,
    grid_times,
    matching_error,
    noise_clean,
    random_grid_points,
    refuse_non_flow,
    velocity_fn,
)
from gen_rl.algorithms.options_matching import AWMOptions
from gen_rl.core.losses import clipped_surrogate


def matching_log_likelihood(velocity: Tensor, target: Tensor, times: Tensor, weighting: str) -> Tensor:
    """AWM's per-sample log-likelihood surrogate ``-w(t) mean (v - target)^2`` ``[B]`` (w = 1 or t)."""
    error = matching_error(velocity, target)
    return -(error * times.float()) if weighting == "t" else -error


class AWM(Algorithm):
    """Advantage Weighted Matching on a rectified-flow sampler (see the module docstring)."""

    Options = AWMOptions
    needs = frozenset({"clean_latents"})
    options: AWMOptions

    def __init__(self, options: AWMOptions, *, seed: int, num_steps: int) -> None:
        super().__init__(options, seed=seed, num_steps=num_steps)
        self.old_tensors: list[Tensor] | None = None  # the parameters that sampled this step's rollouts

    def check(self, sampler: Any, rewards: dict[str, Any], sample: Any) -> None:
        """Refuse a sampler without the rectified-flow forward process, and CFG."""
        refuse_non_flow("awm", sampler, sample)

    def rollout_context(self, policy: Policy) -> AbstractContextManager[None]:
        """Snapshot the sampling policy (the "old" policy of the ratio); rollouts run with the policy itself."""
        self.old_tensors = [param.detach().clone() for param in policy.parameters]
        return nullcontext()

    def select(self, rollout: Any, step: int) -> Tensor:
        """``floor(S x step_fraction)`` grid points ``[B, K]`` per sample, drawn from ``(seed, step)``."""
        return random_grid_points(
            rollout, self.options.step_fraction, self.seed, "awm-units", step, shared=False
        )

    def loss(self, batch: LossBatch, policy: Policy) -> tuple[Tensor, dict[str, Tensor]]:
        """The clipped advantage-weighted matching loss of one microbatch at one grid point per sample."""
        options = self.options
        rollout = batch.rollout
        device = rollout.latents.device
        clean = rollout.latents[:, -1].float()
        times, model_times = grid_times(rollout, batch.units[:, 0])
        noise = draw_noise(batch, clean.shape, "awm-noise", self.seed).to(device)
        noised, target = noise_clean(clean, times, noise)
        predict = velocity_fn(policy, rollout)

        # frozen passes first (swapping parameters after v_theta's graph is built would invalidate it)
        with torch.no_grad():
            if self.old_tensors is None:
                old_velocity = predict(noised, model_times)  # no snapshot yet: the current policy sampled
            else:
                with policy.swapped(self.old_tensors):
                    old_velocity = predict(noised, model_times)
        reference_velocity = None
        if options.kl_coef > 0:
            with torch.no_grad(), policy.reference():
                reference_velocity = predict(noised, model_times)
        velocity = predict(noised, model_times)

        old_log_likelihood = matching_log_likelihood(old_velocity, target, times, options.weighting)
        log_likelihood = matching_log_likelihood(velocity, target, times, options.weighting)
        advantages = batch.advantages.to(device).float()
        surrogate = clipped_surrogate(
            log_likelihood[:, None],
            old_log_likelihood[:, None],
            advantages,
            clip_low=options.clip_low,
            clip_high=options.clip_high_or_low,
        )
        weight = batch.weight.to(device).float()
        policy_loss = (surrogate.loss[:, 0] * weight).mean()
        if reference_velocity is not None:
            kl = (matching_error(velocity, reference_velocity) * weight).mean()
        else:
            kl = policy_loss.new_zeros(())
        loss = policy_loss + options.kl_coef * kl
        ratio = surrogate.ratio[:, 0].detach()
        stats = {
            "loss/total": loss.detach(),
            "loss/policy": policy_loss.detach(),
            "loss/kl": kl.detach(),
            "policy/ratio_mean": ratio.mean(),
            "policy/ratio_dev_max": (ratio - 1.0).abs().max(),
            "policy/clip_fraction": surrogate.clipped.float().mean(),
            "awm/matching_error": -log_likelihood.detach().mean(),
        }
        return loss, stats

    def state_dict(self) -> dict[str, Any]:
        """Stateless across steps: the old snapshot is retaken when each step's rollouts start."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Nothing to restore (see :meth:`state_dict`)."""
        super().load_state_dict(state)
