"""GRPO-family objectives for completion tokens, built on the shared core (gen_rl.advantages / gen_rl.losses).

Every mode minimises ``policy term + beta * KL term`` over a mini-batch of completions with per-token
``log_probs`` (current policy, with gradient), ``old_log_probs`` (sampling policy) and one advantage per
completion (from :func:`gen_rl.advantages.group_advantages`):

* ``grpo`` (DeepSeekMath eq. 3): per-token PPO clipped surrogate, mean over each completion's tokens, then
  mean over completions; advantages ``(r - mean) / std`` per group.
* ``dr_grpo`` (Dr.GRPO, Liu et al. 2025, eq. 2-3): the same surrogate summed over tokens and divided by a
  constant (completions x max completion length); advantages ``r - mean`` (no std).
* ``dapo`` (DAPO, Yu et al. 2025, eq. 8): token-level mean over all tokens of the mini-batch with asymmetric
  clip-higher ``[1 - clip_low, 1 + clip_high]``; zero-std groups are dropped by the trainer (dynamic sampling).
* ``gspo`` (GSPO, Zheng et al. 2025, eq. 5-7): sequence ratio ``s_i = exp(mean_t(logp - old_logp))``, clipped
  surrogate per sequence, mean over completions.
* ``gspo_token`` (GSPO eq. 13-14): per-token ratio ``sg[s_i] * pi(y_t) / sg[pi(y_t)]`` (value ``s_i``, gradient of
  token ``t`` alone), clipped per token, token mean per completion, then mean over completions.

The KL term is the per-token estimator (k3 by default, as GRPO) to the reference, aggregated like the policy
term (sequence modes: per-completion token mean).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from gen_rl.losses import aggregate, clipped_surrogate, surrogate_stats, token_kl

__all__ = ["LossMode", "LOSS_MODES", "LossOutput", "MiniBatchNorms", "sequence_log_ratio", "policy_loss"]


@dataclass(frozen=True)
class LossMode:
    """How a loss mode aggregates and normalises.

    Attributes:
        aggregation: ``gen_rl.losses.aggregate`` mode over tokens (``sample_mean``, ``global_mean``,
            ``constant``); sequence modes reduce over completions with ``sample_mean``.
        std_mode: default advantage normalisation for ``group_advantages``.
        ratio: ``"token"`` (PPO ratio per token), ``"sequence"`` (GSPO) or ``"sequence_token"`` (GSPO-token).
    """

    aggregation: str
    std_mode: str
    ratio: str


LOSS_MODES = {
    "grpo": LossMode(aggregation="sample_mean", std_mode="group", ratio="token"),
    "dr_grpo": LossMode(aggregation="constant", std_mode="none", ratio="token"),
    "dapo": LossMode(aggregation="global_mean", std_mode="group", ratio="token"),
    "gspo": LossMode(aggregation="sample_mean", std_mode="group", ratio="sequence"),
    "gspo_token": LossMode(aggregation="sample_mean", std_mode="group", ratio="sequence_token"),
}


@dataclass
class MiniBatchNorms:
    """Denominators of a mini-batch split into micro-batches, so the summed micro losses equal the full one.

    A completion without loss tokens (a dropped zero-std group, a masked truncated completion) counts nowhere,
    exactly as if it had been removed from the batch.

    Attributes:
        completions: completions in the mini-batch with at least one loss token (GRPO's and GSPO's ``G``;
            Dr.GRPO's constant is ``completions x max_completion_length``).
        tokens: loss tokens in the mini-batch (DAPO's token mean).
    """

    completions: float
    tokens: float

    @classmethod
    def of(cls, loss_mask: Tensor) -> MiniBatchNorms:
        """Norms of one whole mini-batch given its ``[B, T]`` loss mask."""
        weights = loss_mask.float()
        return cls(
            completions=float((weights.sum(dim=1) > 0).sum().clamp_min(1)),
            tokens=float(weights.sum().clamp_min(1)),
        )


@dataclass
class LossOutput:
    """A micro-batch loss (already divided by the mini-batch norms) and its diagnostics."""

    loss: Tensor
    policy_loss: Tensor
    kl: Tensor
    stats: dict[str, float]


def sequence_log_ratio(log_probs: Tensor, old_log_probs: Tensor, mask: Tensor) -> Tensor:
    """GSPO eq. 7 in log space: ``log s_i = (1 / |y_i|) sum_t (logp_t - old_logp_t)`` over masked tokens, ``[B]``.

    A completion without tokens gets 0 (ratio 1).
    """
    dtype = torch.promote_types(log_probs.dtype, torch.float32)
    weights = mask.to(dtype)
    log_ratio = (log_probs.to(dtype) - old_log_probs.detach().to(dtype)) * weights
    lengths = weights.sum(dim=1)
    return log_ratio.sum(dim=1) / lengths.clamp_min(1.0)


def _reduce(
    per_unit: Tensor, mask: Tensor, aggregation: str, norms: MiniBatchNorms, max_length: int
) -> Tensor:
    """``aggregate`` with mini-batch denominators: micro-batch losses then sum to the mini-batch loss."""
    if aggregation == "sample_mean":
        return aggregate(per_unit, mask, mode="sample_mean", normalizer=norms.completions)
    if aggregation == "global_mean":
        return aggregate(per_unit, mask, mode="global_mean", normalizer=norms.tokens)
    # Dr.GRPO: sum over tokens / (completions x max completion length), i.e. a global sum with that normaliser
    return aggregate(per_unit, mask, mode="global_mean", normalizer=norms.completions * max_length)


def policy_loss(
    loss_name: str,
    log_probs: Tensor,
    old_log_probs: Tensor,
    advantages: Tensor,
    loss_mask: Tensor,
    *,
    clip_low: float,
    clip_high: float,
    max_completion_length: int,
    norms: MiniBatchNorms | None = None,
    ref_log_probs: Tensor | None = None,
    beta: float = 0.0,
    kl_estimator: str = "k3",
) -> LossOutput:
    """The loss of ``loss_name`` (see the module docstring for each paper's equation) on one micro-batch.

    Args:
        log_probs / old_log_probs / ref_log_probs: ``[B, T]`` completion-token log-probs (current policy with
            gradient; sampling policy; reference policy, needed when ``beta > 0``).
        advantages: ``[B]`` one advantage per completion.
        loss_mask: ``[B, T]`` bool, the tokens that count.
        max_completion_length: Dr.GRPO's constant (``sample.max_new_tokens``).
        norms: denominators of the whole mini-batch when it is split into micro-batches (default: this batch).
    """
    if loss_name not in LOSS_MODES:
        raise ValueError(f"unknown loss {loss_name!r}; valid: {', '.join(LOSS_MODES)}")
    mode = LOSS_MODES[loss_name]
    norms = norms or MiniBatchNorms.of(loss_mask)
    mask = loss_mask.bool()

    if mode.ratio == "token":
        surrogate = clipped_surrogate(
            log_probs, old_log_probs, advantages, clip_low=clip_low, clip_high=clip_high
        )
        policy_term = _reduce(surrogate.loss, mask, mode.aggregation, norms, max_completion_length)
        stats = surrogate_stats(surrogate, log_probs, old_log_probs, mask)
    elif mode.ratio == "sequence":
        seq_log_ratio = sequence_log_ratio(log_probs, old_log_probs, mask)
        has_tokens = mask.any(dim=1, keepdim=True)
        surrogate = clipped_surrogate(
            seq_log_ratio[:, None], torch.zeros_like(seq_log_ratio[:, None]), advantages,
            clip_low=clip_low, clip_high=clip_high,
        )  # fmt: skip
        policy_term = aggregate(surrogate.loss, has_tokens, mode="sample_mean", normalizer=norms.completions)
        stats = surrogate_stats(
            surrogate, seq_log_ratio[:, None], torch.zeros_like(surrogate.ratio), has_tokens
        )
    else:  # sequence_token: value s_i, gradient of each token's own log-prob (GSPO eq. 13)
        seq_log_ratio = sequence_log_ratio(log_probs, old_log_probs, mask)
        token_log_ratio = seq_log_ratio.detach()[:, None] + log_probs - log_probs.detach()
        zeros = torch.zeros_like(token_log_ratio)
        surrogate = clipped_surrogate(
            token_log_ratio, zeros, advantages, clip_low=clip_low, clip_high=clip_high
        )
        policy_term = _reduce(surrogate.loss, mask, "sample_mean", norms, max_completion_length)
        stats = surrogate_stats(surrogate, token_log_ratio, zeros, mask)

    kl_term = policy_term.new_zeros(())
    if beta > 0:
        if ref_log_probs is None:
            raise ValueError("beta > 0 needs ref_log_probs (the reference policy's token log-probs)")
        per_token_kl = token_kl(log_probs, ref_log_probs, estimator=kl_estimator)
        kl_aggregation = "sample_mean" if mode.ratio != "token" else mode.aggregation
        kl_term = _reduce(per_token_kl, mask, kl_aggregation, norms, max_completion_length)
    loss = policy_term + beta * kl_term
    return LossOutput(loss=loss, policy_loss=policy_term.detach(), kl=kl_term.detach(), stats=stats)
