"""The generation objective, built from config: advantages, log-prob convention, transition KL, step loss.

Every paper convention that changes a number is a named setting here, so a recipe that names a paper can
reproduce its code exactly (``tests/test_recipes.py`` checks each against an independent implementation):

- **Advantages** (:func:`compute_advantages`): group mean with a group / batch / no std (``reward.std_mode``), the
  std's ``ddof`` (``reward.std_ddof``: 0 population as GRPO / Flow-GRPO, 1 sample as DanceGRPO's ``torch.std``)
  and ``eps`` (``reward.std_eps``: Flow-GRPO 1e-4, DanceGRPO 1e-8), or DDPO's per-prompt history tracker.
  Flow-GRPO's ``PerPromptStatTracker(global_std=True)``, cleared every epoch, is the per-prompt mean of the
  current batch over the batch-wide population std + 1e-4: ``std_mode: global`` (one group = one prompt).
- **Log-prob convention** (:func:`log_probs_in_convention`): ``gaussian`` is the exact Gaussian log-density
  averaged over latent elements (Flow-GRPO's and DanceGRPO's SDE steps); ``flow_grpo_cps`` is Flow-GRPO's CPS
  log-prob with every constant dropped, ``-mean((x - mu)^2)``. For the same step std ``n`` the two differ by an
  affine map of slope ``2 n^2``, so their log-ratios differ by the factor ``2 n^2`` and a clip range does not
  carry over between them.
- **KL to the reference** (:func:`transition_kl`): ``gaussian`` is the exact KL between the two Gaussian step
  distributions, ``mean |mu - mu_ref|^2 / (2 std^2)`` with ``std = g sqrt|ds|``; ``flow_grpo`` is Flow-GRPO's
  ``mean |mu - mu_ref|^2 / (2 g^2)`` (their ``std_dev_t`` is the diffusion coefficient ``g``, without
  ``sqrt|ds|``), which is the exact KL times ``|ds|`` for the flow SDE steps. For CPS their ``std_dev_t`` is
  the step std itself, so the two estimators coincide. A ``kl_coef`` tuned for one is ``1/|ds|`` (4-112x on a
  10-step SD3 grid) too weak or strong for the other.
- **Step loss** (:func:`step_loss`): PPO's clipped surrogate per trained step with separate low / high clip,
  weighted by the sample's validity, plus ``kl_coef`` times the KL, averaged over the samples of a microbatch.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from gen_rl.algorithms.options import PolicyGradientOptions
from gen_rl.core.advantages import AdvantageOutput, PerPromptStatTracker, combine_rewards
from gen_rl.core.losses import clipped_surrogate, gaussian_kl
from gen_rl.trainer_config import RewardConfig

__all__ = [
    "LOG_PROB_CONVENTIONS",
    "KL_ESTIMATORS",
    "compute_advantages",
    "log_probs_in_convention",
    "transition_kl",
    "step_loss",
]

LOG_PROB_CONVENTIONS = ("gaussian", "flow_grpo_cps")
KL_ESTIMATORS = ("gaussian", "flow_grpo")
_HALF_LOG_TWO_PI = 0.5 * math.log(2.0 * math.pi)


def compute_advantages(
    reward: RewardConfig,
    rewards: Mapping[str, Tensor],
    weights: Mapping[str, float],
    group_ids: Tensor,
    prompts: Sequence[str],
    tracker: PerPromptStatTracker | None = None,
) -> AdvantageOutput:
    """Advantages ``[N]`` of one step's gathered rewards as the config says (GRPO eq. 3 family).

    ``rewards``: name -> ``[N]`` raw scores (NaN: dropped); ``group_ids`` ``[N]``; ``prompts`` ``[N]`` in the
    same order (only the per-prompt ``tracker`` reads them). ``reward.advantage_clip`` clamps the result.
    """
    clip = reward.advantage_clip
    if tracker is None:
        return combine_rewards(
            rewards,
            weights,
            group_ids,
            mode=reward.combine,
            std_mode=reward.std_mode,
            eps=reward.std_eps,
            ddof=reward.std_ddof,
            clip=clip,
        )
    if len(prompts) != len(group_ids):
        raise ValueError(f"got {len(prompts)} prompts for {len(group_ids)} rewards; gather both in one order")
    combined = sum(weights[name] * value for name, value in rewards.items())
    values = tracker.update(list(prompts), combined)
    if clip is not None:
        values = values.clamp(-clip, clip)
    invalid = int((~torch.isfinite(combined)).sum())
    return AdvantageOutput(values, len(set(group_ids.tolist())), 0, invalid)


def log_probs_in_convention(log_probs: Tensor, stds: Tensor, convention: str) -> Tensor:
    """Step log-probs in the loss's convention, from the exact mean-over-elements Gaussian log-density.

    ``gaussian``: unchanged, ``-mean((x - mu)^2) / (2 n^2) - log n - log sqrt(2 pi)``. ``flow_grpo_cps``:
    Flow-GRPO's CPS value ``-mean((x - mu)^2) = 2 n^2 (log_prob + log n + log sqrt(2 pi))`` (``n`` = ``stds``,
    which depends only on the noise grid, so the same map applies to stored and recomputed log-probs).
    """
    if convention == "gaussian":
        return log_probs
    if convention == "flow_grpo_cps":
        stds = stds.to(log_probs.dtype)
        return 2.0 * stds.square() * (log_probs + torch.log(stds) + _HALF_LOG_TWO_PI)
    raise ValueError(f"unknown log-prob convention {convention!r}; known: {', '.join(LOG_PROB_CONVENTIONS)}")


def transition_kl(
    means: Tensor,
    ref_means: Tensor,
    stds: Tensor,
    sigmas: Tensor,
    sigmas_next: Tensor,
    *,
    sde_type: str,
    estimator: str,
) -> Tensor:
    """KL ``[B]`` of one SDE step to the reference's step: exact (``gaussian``) or Flow-GRPO's (``flow_grpo``).

    ``means`` / ``ref_means`` ``[B, ...]``, ``stds`` / ``sigmas`` / ``sigmas_next`` ``[B]``. Exact:
    ``mean |mu - mu_ref|^2 / (2 std^2)``; Flow-GRPO (train_sd3.py): ``/ (2 g^2)`` with ``g = std / sqrt|ds|``
    for the flow SDE steps (the exact value times ``|ds|``), and the exact value for CPS.
    """
    exact = gaussian_kl(means, ref_means, stds)
    if estimator == "gaussian" or (estimator == "flow_grpo" and sde_type == "cps"):
        return exact
    if estimator == "flow_grpo":
        return exact * (sigmas - sigmas_next).to(exact.dtype)
    raise ValueError(f"unknown KL estimator {estimator!r}; known: {', '.join(KL_ESTIMATORS)}")


def step_loss(
    options: PolicyGradientOptions,
    log_probs: Tensor,
    old_log_probs: Tensor,
    advantages: Tensor,
    weight: Tensor,
    kl: Tensor | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Loss of one microbatch at one trained step and its statistics (tensors, no host sync).

    ``log_probs`` / ``old_log_probs`` ``[b, 1]`` in the loss's convention, ``advantages`` / ``weight`` ``[b]``,
    ``kl`` ``[b]`` or None. Implements Flow-GRPO eq. 8 / DanceGRPO eq. 9 per step:
    ``mean_i w_i max(-A_i rho_i, -A_i clip(rho_i, 1 - eps_low, 1 + eps_high)) + beta mean_i w_i KL_i``.
    """
    surrogate = clipped_surrogate(
        log_probs,
        old_log_probs,
        advantages,
        clip_low=options.clip_low,
        clip_high=options.clip_high,
    )
    policy_loss = (surrogate.loss[:, 0] * weight).mean()
    kl_mean = (kl * weight).mean() if kl is not None else policy_loss.new_zeros(())
    loss = policy_loss + options.kl_coef * kl_mean
    log_ratio = (log_probs - old_log_probs).detach().float()
    ratio = surrogate.ratio.detach()
    stats: dict[str, Any] = {
        "loss/total": loss.detach(),
        "loss/policy": policy_loss.detach(),
        "loss/kl": kl_mean.detach(),
        "policy/clip_fraction": surrogate.clipped.float().mean(),
        "policy/approx_kl": 0.5 * log_ratio.square().mean(),
        "policy/ratio_mean": ratio.mean(),
        "policy/ratio_dev_max": (ratio - 1).abs().max(),
    }
    return loss, stats


def reward_key(index: int, name: str) -> str:
    """The key of ``reward.terms[index]`` in records (``colour``, a second ``colour`` -> ``colour_1``)."""
    base = name.rsplit(":", 1)[-1]
    return base if index == 0 else f"{base}_{index}"
