"""Flow-DPPO (Ping et al. 2026, "Flow-DPPO: Divergence Proximal Policy Optimization for Flow Matching Models",
arXiv 2606.11025; reference code Tencent-Hunyuan/UniRL ``unirl/algorithms/flowdppo.py``).

No ratio clipping. Each SDE step is Gaussian with the same std ``n`` under the old and the new policy, so their
divergence is exact and cheap (paper eq. 14, reduced by the mean over latent elements as the reference does):

    KL_i = mean |mu_theta - mu_old|^2 / (2 n^2)

A sample-step's surrogate ``-A_i rho_i`` is dropped (no gradient) only when it is both far and over-aggressive
(paper eq. 18):

    drop_i = (KL_i >= tau) and ((rho_i > 1 and A_i > 0) or (rho_i < 1 and A_i < 0))
    L      = mean_i w_i [not drop_i] (-A_i rho_i)  (+ beta KL to the reference, as Flow-GRPO)

A far step moving back towards the old policy (A > 0 with rho < 1) still trains. ``mu_old`` is the sampling
policy's mean (:class:`~gen_rl.algorithms.likelihood_tools.OldPolicyMeans`, the reference's frozen anchor).
"""

from __future__ import annotations

import torch
from torch import Tensor

from gen_rl.algorithms.base import LossBatch, Policy
from gen_rl.algorithms.likelihood_tools import OldPolicyMeans
from gen_rl.algorithms.options_likelihood import FlowDPPOOptions
from gen_rl.algorithms.policy_gradient import PolicyGradient
from gen_rl.core.losses import gaussian_kl


def divergence_masked_loss(
    log_ratio: Tensor, kl_old: Tensor, advantages: Tensor, threshold: float
) -> tuple[Tensor, Tensor, Tensor]:
    """Per-sample Flow-DPPO loss ``[b]``, the ratio ``[b]`` and the drop mask ``[b]`` (paper eq. 18).

    ``log_ratio`` ``[b]`` (with gradient), ``kl_old`` ``[b]`` the step KL to the old policy, ``advantages`` ``[b]``.
    """
    ratio = torch.exp(log_ratio.float())
    advantages = advantages.detach().float()
    far = kl_old.detach() >= threshold
    aggressive = ((ratio > 1.0) & (advantages > 0)) | ((ratio < 1.0) & (advantages < 0))
    drop = far & aggressive.detach()
    loss = torch.where(drop, torch.zeros_like(ratio), -advantages * ratio)
    return loss, ratio, drop


class FlowDPPO(OldPolicyMeans, PolicyGradient):
    """Flow-DPPO: the unclipped surrogate with the asymmetric divergence mask (see the module docstring)."""

    Options = FlowDPPOOptions
    options: FlowDPPOOptions

    def loss(self, batch: LossBatch, policy: Policy) -> tuple[Tensor, dict[str, Tensor]]:
        """The masked surrogate (+ beta KL to the reference) of one microbatch at one step."""
        self.check_unit_advantages()
        part, column = batch.rollout, batch.units
        step = self.new_and_old_steps(policy, part, column)
        means, stds = step.means, step.stds
        kl_old = gaussian_kl(means.detach(), step.old_means, stds[:, 0])
        log_ratio = (step.log_probs - step.old_log_probs)[:, 0]
        per_sample, ratio, drop = divergence_masked_loss(
            log_ratio, kl_old, batch.advantages, self.options.kl_threshold
        )
        weight = batch.weight.float()
        policy_loss = (per_sample * weight).mean()
        kl = self.reference_kl(policy, part, column, means, stds[:, 0]) if self.options.kl_coef else None
        kl_mean = (kl * weight).mean() if kl is not None else policy_loss.new_zeros(())
        loss = policy_loss + self.options.kl_coef * kl_mean
        ratio = ratio.detach()
        stats = {
            "loss/total": loss.detach(),
            "loss/policy": policy_loss.detach(),
            "loss/kl": kl_mean.detach(),
            "policy/clip_fraction": drop.float().mean(),
            "policy/approx_kl": 0.5 * log_ratio.detach().float().square().mean(),
            "policy/ratio_mean": ratio.mean(),
            "policy/ratio_dev_max": (ratio - 1).abs().max(),
            "dppo/kl_old_mean": kl_old.mean(),
            "dppo/kl_old_max": kl_old.max(),
        }
        return loss, stats
