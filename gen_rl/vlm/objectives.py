"""GRPO-family objectives for completion tokens, built on the shared core (gen_rl.core.advantages / gen_rl.core.losses).

Every mode minimises ``policy term + kl_coef * KL term`` over a mini-batch of completions with per-token
``log_probs`` (current policy, with gradient), ``old_log_probs`` (sampling policy) and one advantage per
completion. A mode is three independent choices, declared in :data:`LOSS_MODES` and looked up (never branched
on by name): the *ratio* (per token, per sequence, or GSPO-token), the per-token *surrogate* and the default
*aggregation* of per-token losses into one number (overridable by ``algorithm.loss_aggregation``).

Modes (the paper's equation each reproduces with its default aggregation):

* ``grpo`` (DeepSeekMath eq. 3): PPO clipped surrogate per token, sequence mean of token means.
* ``dr_grpo`` (Dr.GRPO, Liu et al. 2025, eq. 2-3): summed over tokens, divided by completions x max length;
  advantages ``r - mean`` (no std).
* ``dapo`` (DAPO, Yu et al. 2025, eq. 8): token mean over the mini-batch, clip-higher ``[1 - lo, 1 + hi]``.
* ``gspo`` (GSPO, Zheng et al. 2025, eq. 5-7): sequence ratio ``s_i = exp(mean_t(logp - old_logp))``, clipped
  per sequence (its loss is put on each of the sequence's tokens, so any aggregation applies).
* ``gspo_token`` (GSPO eq. 13-14): per-token ratio ``sg[s_i] * pi(y_t) / sg[pi(y_t)]``.
* ``cispo`` (MiniMax-M1, 2025, the CISPO objective): ``-sg[clip(r, 1 - lo, 1 + hi)] * A * log pi(y_t)``: the clipped
  importance weight is a constant, so every token keeps a gradient (the paper sets no lower bound: lo >= 1).
* ``sapo`` (SAPO, Gao et al. 2025, the SAPO objective): ``-f(r) * A`` with the soft gate
  ``f(r) = 4 / tau * sigmoid(tau * (r - 1))``, ``tau = tau_pos`` for ``A > 0`` and ``tau_neg`` otherwise;
  its gradient is ``4 sigma (1 - sigma) * r * A * grad log pi``, the plain policy gradient at ``r = 1``.

Aggregations (:data:`AGGREGATIONS`), ``L_it`` the per-token loss, ``|o_i|`` the loss tokens of completion ``i``,
``G`` the completions with at least one loss token, ``T_max`` the token budget:
``token_mean`` ``sum_it L_it / sum_i |o_i|`` (DAPO); ``seq_mean_token_mean`` ``1/G sum_i 1/|o_i| sum_t L_it``
(GRPO); ``seq_mean_token_sum`` ``1/G sum_i sum_t L_it``; ``constant`` ``sum_it L_it / (G * T_max)`` (Dr.GRPO).

Dual-clip (Ye et al. 2020, "Mastering complex control in MOBA games"), for the clipped-surrogate modes: with
``c = dual_clip > 1``, a token with ``A < 0`` has its loss capped at ``-c * A`` (the objective
``max(min(r A, clip(r) A), c A)``), so a huge ratio on a bad token no longer drives an unbounded update.

``token_weights`` multiply the per-token policy loss (high-entropy-token training, Wang et al. 2025 "Beyond the
80/20 rule": only tokens whose entropy reaches the batch's top-rho threshold get a policy gradient; the
denominators stay those of all loss tokens). The KL term is the per-token estimator (k3 by default) to the
reference, aggregated like the policy term, over every loss token.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import torch
from torch import Tensor

from gen_rl.core.advantages import AdvantageOutput, reinforce_pp_advantages, rloo_advantages
from gen_rl.core.losses import SurrogateOutput, aggregate, clipped_surrogate, surrogate_stats, token_kl

__all__ = [
    "AGGREGATIONS",
    "ADVANTAGE_FUNCTIONS",
    "entropy_threshold",
    "LossMode",
    "LOSS_MODES",
    "LossOutput",
    "MiniBatchNorms",
    "SurrogateOptions",
    "sequence_log_ratio",
    "policy_loss",
]

AGGREGATIONS = ("token_mean", "seq_mean_token_mean", "seq_mean_token_sum", "constant")


@dataclass(frozen=True)
class LossMode:
    """One loss mode: which ratio, which per-token surrogate, which default aggregation and advantage std.

    Attributes:
        ratio: ``"token"`` (PPO ratio per token), ``"sequence"`` (GSPO) or ``"sequence_token"`` (GSPO-token).
        surrogate: ``"clip"`` (PPO clipped surrogate), ``"cispo"`` or ``"sapo"`` (see the module docstring).
        aggregation: default of ``algorithm.loss_aggregation``, one of :data:`AGGREGATIONS`.
        std_mode: default advantage normalisation for ``group_advantages``.
    """

    ratio: str
    surrogate: str
    aggregation: str
    std_mode: str


LOSS_MODES = {
    "grpo": LossMode("token", "clip", "seq_mean_token_mean", "group"),
    "dr_grpo": LossMode("token", "clip", "constant", "none"),
    "dapo": LossMode("token", "clip", "token_mean", "group"),
    "gspo": LossMode("sequence", "clip", "seq_mean_token_mean", "group"),
    "gspo_token": LossMode("sequence_token", "clip", "seq_mean_token_mean", "group"),
    "cispo": LossMode("token", "cispo", "token_mean", "group"),
    "sapo": LossMode("token", "sapo", "seq_mean_token_mean", "group"),
}


@dataclass(frozen=True)
class SurrogateOptions:
    """Per-token surrogate settings.

    Attributes:
        clip_low / clip_high: ratio bounds ``[1 - clip_low, 1 + clip_high]`` (PPO clip; CISPO's IS-weight clip).
        dual_clip: ``c > 1`` caps the loss of negative-advantage tokens at ``-c * A``; 0 disables.
        tau_pos / tau_neg: SAPO gate temperatures for positive / non-positive advantages.
    """

    clip_low: float = 0.2
    clip_high: float = 0.2
    dual_clip: float = 0.0
    tau_pos: float = 1.0
    tau_neg: float = 1.05


@dataclass
class MiniBatchNorms:
    """Denominators of a mini-batch split into micro-batches, so the summed micro losses equal the full one.

    A completion without loss tokens (a dropped zero-std group, a masked truncated completion) counts nowhere,
    exactly as if it had been removed from the batch. Over several processes whose gradients DDP averages,
    pass the totals over processes divided by the number of processes.

    Attributes:
        completions: completions with at least one loss token (``G``).
        tokens: loss tokens (``sum_i |o_i|``).
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


# ------------------------------------------------------------------------------------------------------
# ratios: (log_probs, old_log_probs, mask) -> (new, old) whose difference is the per-token log-ratio
# ------------------------------------------------------------------------------------------------------


def _token_ratio(log_probs: Tensor, old_log_probs: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    return log_probs, old_log_probs.detach()


def _sequence_ratio(log_probs: Tensor, old_log_probs: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    seq_log_ratio = sequence_log_ratio(log_probs, old_log_probs, mask)
    per_token = seq_log_ratio[:, None].expand_as(log_probs)
    return per_token, torch.zeros_like(per_token)


def _sequence_token_ratio(log_probs: Tensor, old_log_probs: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """GSPO eq. 13: value ``s_i``, gradient of each token's own log-prob."""
    seq_log_ratio = sequence_log_ratio(log_probs, old_log_probs, mask).detach()
    per_token = seq_log_ratio[:, None] + log_probs - log_probs.detach()
    return per_token, torch.zeros_like(per_token)


RATIOS: dict[str, Callable[[Tensor, Tensor, Tensor], tuple[Tensor, Tensor]]] = {
    "token": _token_ratio,
    "sequence": _sequence_ratio,
    "sequence_token": _sequence_token_ratio,
}


# ------------------------------------------------------------------------------------------------------
# surrogates: (new, old, log_probs, advantages [B, 1], options) -> SurrogateOutput (per-token loss)
# ------------------------------------------------------------------------------------------------------


def _clip_surrogate(new, old, log_probs, advantages, options: SurrogateOptions) -> SurrogateOutput:
    """PPO eq. 7 per token, with Ye et al.'s dual clip for negative advantages when ``dual_clip > 1``."""
    surrogate = clipped_surrogate(
        new, old, advantages[:, 0], clip_low=options.clip_low, clip_high=options.clip_high
    )
    if options.dual_clip <= 0:
        return surrogate
    bound = -options.dual_clip * advantages.to(surrogate.loss.dtype)
    capped = (advantages < 0) & (surrogate.loss > bound)
    loss = torch.where(capped, bound.expand_as(surrogate.loss), surrogate.loss)
    return SurrogateOutput(loss=loss, ratio=surrogate.ratio, clipped=surrogate.clipped | capped)


def _cispo_surrogate(new, old, log_probs, advantages, options: SurrogateOptions) -> SurrogateOutput:
    """MiniMax-M1 CISPO: ``-sg[clip(r, 1 - lo, 1 + hi)] * A * log pi``; the gradient is ``-w A grad log pi``."""
    dtype = torch.promote_types(log_probs.dtype, torch.float32)
    ratio = torch.exp(new.detach().to(dtype) - old.detach().to(dtype))
    weight = ratio.clamp(1.0 - options.clip_low, 1.0 + options.clip_high)
    loss = -weight * advantages.detach().to(dtype) * log_probs.to(dtype)
    clipped = (ratio < 1.0 - options.clip_low) | (ratio > 1.0 + options.clip_high)
    return SurrogateOutput(loss=loss, ratio=ratio, clipped=clipped)


def _sapo_surrogate(new, old, log_probs, advantages, options: SurrogateOptions) -> SurrogateOutput:
    """SAPO: ``-4 / tau * sigmoid(tau * (r - 1)) * A``, ``tau`` by the sign of ``A``."""
    dtype = torch.promote_types(new.dtype, torch.float32)
    unit_advantages = advantages.detach().to(dtype)
    ratio = torch.exp(new.to(dtype) - old.detach().to(dtype))
    tau = torch.where(
        unit_advantages > 0,
        torch.full_like(unit_advantages, options.tau_pos),
        torch.full_like(unit_advantages, options.tau_neg),
    )
    gate = torch.sigmoid(tau * (ratio - 1.0)) * (4.0 / tau)
    return SurrogateOutput(
        loss=-gate * unit_advantages, ratio=ratio, clipped=torch.zeros_like(ratio, dtype=torch.bool)
    )


SURROGATES: dict[str, Callable[..., SurrogateOutput]] = {
    "clip": _clip_surrogate,
    "cispo": _cispo_surrogate,
    "sapo": _sapo_surrogate,
}


# ------------------------------------------------------------------------------------------------------
# aggregation
# ------------------------------------------------------------------------------------------------------


def _reduce(
    per_token: Tensor, mask: Tensor, aggregation: str, norms: MiniBatchNorms, max_length: int
) -> Tensor:
    """One of :data:`AGGREGATIONS` with mini-batch denominators: micro-batch losses sum to the mini-batch's."""
    if aggregation == "seq_mean_token_mean":
        return aggregate(per_token, mask, mode="sample_mean", normalizer=norms.completions)
    if aggregation == "token_mean":
        return aggregate(per_token, mask, mode="global_mean", normalizer=norms.tokens)
    if aggregation == "seq_mean_token_sum":
        return aggregate(per_token, mask, mode="global_mean", normalizer=norms.completions)
    if aggregation == "constant":  # Dr.GRPO: a global sum over completions x max completion length
        return aggregate(per_token, mask, mode="global_mean", normalizer=norms.completions * max_length)
    raise ValueError(f"unknown loss aggregation {aggregation!r}; valid: {', '.join(AGGREGATIONS)}")


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
    kl_coef: float = 0.0,
    kl_estimator: str = "k3",
    aggregation: str = "",
    dual_clip: float = 0.0,
    tau_pos: float = 1.0,
    tau_neg: float = 1.05,
    token_weights: Tensor | None = None,
) -> LossOutput:
    """The loss of ``loss_name`` (see the module docstring for each paper's equation) on one micro-batch.

    Args:
        log_probs / old_log_probs / ref_log_probs: ``[B, T]`` completion-token log-probs (current policy with
            gradient; sampling policy; reference policy, needed when ``kl_coef > 0``).
        advantages: ``[B]`` one advantage per completion.
        loss_mask: ``[B, T]`` bool, the tokens that count.
        max_completion_length: Dr.GRPO's constant (``sample.max_new_tokens``).
        norms: denominators of the whole mini-batch when it is split into micro-batches (default: this batch).
        aggregation: one of :data:`AGGREGATIONS`; empty = the mode's default.
        dual_clip: Ye et al.'s ``c > 1`` for the clipped-surrogate modes; 0 disables.
        tau_pos / tau_neg: SAPO temperatures.
        token_weights: ``[B, T]`` multipliers of the per-token policy loss (the high-entropy token gate).
    """
    if loss_name not in LOSS_MODES:
        raise ValueError(f"unknown loss {loss_name!r}; valid: {', '.join(LOSS_MODES)}")
    mode = LOSS_MODES[loss_name]
    aggregation = aggregation or mode.aggregation
    norms = norms or MiniBatchNorms.of(loss_mask)
    mask = loss_mask.bool()
    options = SurrogateOptions(clip_low, clip_high, dual_clip, tau_pos, tau_neg)

    new, old = RATIOS[mode.ratio](log_probs, old_log_probs, mask)
    surrogate = SURROGATES[mode.surrogate](new, old, log_probs, advantages[:, None], options)
    per_token = surrogate.loss
    if token_weights is not None:
        per_token = per_token * token_weights.detach().to(per_token.dtype)
    policy_term = _reduce(per_token, mask, aggregation, norms, max_completion_length)
    stats = surrogate_stats(surrogate, new, old, mask)

    kl_term = policy_term.new_zeros(())
    if kl_coef > 0:
        if ref_log_probs is None:
            raise ValueError("kl_coef > 0 needs ref_log_probs (the reference policy's token log-probs)")
        per_token_kl = token_kl(log_probs, ref_log_probs, estimator=kl_estimator)
        kl_term = _reduce(per_token_kl, mask, aggregation, norms, max_completion_length)
    loss = policy_term + kl_coef * kl_term
    return LossOutput(loss=loss, policy_loss=policy_term.detach(), kl=kl_term.detach(), stats=stats)


# ------------------------------------------------------------------------------------------------------
# advantages other than GRPO's (which combine_rewards computes per reward) and the high-entropy token gate
# ------------------------------------------------------------------------------------------------------

ADVANTAGE_FUNCTIONS: dict[str, Callable[..., AdvantageOutput]] = {
    "rloo": lambda rewards, group_ids, eps, clip: rloo_advantages(rewards, group_ids, clip=clip),
    "reinforce_pp": partial(reinforce_pp_advantages, baseline=False),
    "reinforce_pp_baseline": partial(reinforce_pp_advantages, baseline=True),
}
"""``reward.advantage_estimator`` -> ``fn(total_reward [N], group_ids [N], eps=, clip=)`` over the whole batch."""


def entropy_threshold(entropies: Tensor, fraction: float) -> float:
    """The entropy at or above which a token is among the top ``fraction`` of ``entropies`` (1-D, every loss
    token of the batch): the ``ceil(fraction * n)``-th largest value (Wang et al. 2025's ``tau_rho``)."""
    if entropies.numel() == 0:
        return math.inf
    count = max(1, math.ceil(fraction * entropies.numel()))
    return float(torch.topk(entropies.float(), count).values[-1])
