"""Unit-agnostic policy-gradient losses for GRPO-family training.

Per-unit tensors are ``[B, T]`` with a bool/float mask ``[B, T]``: for image / video generators a *unit* is a
trained denoising step (log-prob of the SDE transition, averaged over latent elements), for vision-language
models it is a completion token. The same functions serve both.

References
----------
* PPO (Schulman et al., 2017), eq. 7: clipped surrogate; GRPO (Shao et al., 2024) uses it per token.
* DAPO (Yu et al., 2025): asymmetric "clip-higher" (``clip_high > clip_low``) and token-mean aggregation.
* Dr.GRPO (Liu et al., 2025): constant normaliser instead of per-sample length.
* J. Schulman, "Approximating KL Divergence" (2020): k1 / k2 / k3 estimators.
* DDPO (Black et al., 2023): ``approx_kl = 0.5 * mean((logp - logp_old)^2)`` diagnostic.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = [
    "KL_ESTIMATORS",
    "AGGREGATION_MODES",
    "SurrogateOutput",
    "clipped_surrogate",
    "gaussian_kl",
    "token_kl",
    "aggregate",
    "surrogate_stats",
]

KL_ESTIMATORS = ("k1", "k2", "k3")
AGGREGATION_MODES = ("sample_mean", "global_mean", "constant")


@dataclass
class SurrogateOutput:
    """Per-unit PPO clipped surrogate.

    Attributes:
        loss: ``[B, T]`` ``max(-A * rho, -A * clip(rho, 1 - clip_low, 1 + clip_high))`` (to be minimised).
        ratio: ``[B, T]`` importance ratio ``rho = exp(log_probs - old_log_probs)``.
        clipped: ``[B, T]`` bool, the clipped branch is active (that unit contributes zero gradient).
    """

    loss: Tensor
    ratio: Tensor
    clipped: Tensor


def _check_same_shape(**tensors: Tensor) -> None:
    shapes = {name: tuple(t.shape) for name, t in tensors.items()}
    if len(set(shapes.values())) > 1:
        described = ", ".join(f"{name} {shape}" for name, shape in shapes.items())
        raise ValueError(f"shape mismatch: {described}; per-unit tensors and the mask must all be [B, T].")


def _check_2d(name: str, tensor: Tensor) -> None:
    if tensor.dim() != 2:
        raise ValueError(
            f"{name} must be [B, T] (batch x units), got shape {tuple(tensor.shape)}; "
            "use .unsqueeze(1) for a single unit per sample."
        )


def _float_dtype(tensor: Tensor) -> torch.dtype:
    # Compute ratios / KLs in at least float32 (bf16 exp() of log-ratios is too coarse).
    return torch.promote_types(tensor.dtype, torch.float32)


def clipped_surrogate(
    log_probs: Tensor,
    old_log_probs: Tensor,
    advantages: Tensor,
    *,
    clip_low: float,
    clip_high: float | None = None,
) -> SurrogateOutput:
    """PPO clipped surrogate (PPO eq. 7, as used per token by GRPO), per unit, as a loss to minimise.

    Args:
        log_probs: ``[B, T]`` log-probs under the current policy (carries the gradient).
        old_log_probs: ``[B, T]`` log-probs under the sampling policy (treated as constants).
        advantages: ``[B]`` (broadcast over units) or ``[B, T]`` (treated as constants).
        clip_low: ratio lower bound is ``1 - clip_low``.
        clip_high: ratio upper bound is ``1 + clip_high``; defaults to ``clip_low`` (DAPO "clip-higher" uses
            ``clip_high > clip_low``).

    Computed in at least float32.
    """
    _check_2d("log_probs", log_probs)
    _check_same_shape(log_probs=log_probs, old_log_probs=old_log_probs)
    if clip_high is None:
        clip_high = clip_low
    if not (clip_low >= 0 and clip_high >= 0):
        raise ValueError(
            f"clip_low and clip_high must be >= 0, got clip_low={clip_low}, clip_high={clip_high}."
        )
    batch_size = log_probs.shape[0]
    if advantages.dim() == 1 and advantages.shape[0] == batch_size:
        unit_advantages = advantages[:, None]
    elif tuple(advantages.shape) == tuple(log_probs.shape):
        unit_advantages = advantages
    else:
        raise ValueError(
            f"advantages must be [B] = ({batch_size},) or [B, T] = {tuple(log_probs.shape)}, "
            f"got {tuple(advantages.shape)}."
        )

    dtype = _float_dtype(log_probs)
    unit_advantages = unit_advantages.detach().to(dtype)
    ratio = torch.exp(log_probs.to(dtype) - old_log_probs.detach().to(dtype))
    unclipped_loss = -unit_advantages * ratio
    clipped_loss = -unit_advantages * ratio.clamp(1.0 - clip_low, 1.0 + clip_high)
    # The clipped branch wins the max exactly when the ratio has left the trust region in the direction the
    # advantage pushes it: A > 0 and rho > 1 + clip_high, or A < 0 and rho < 1 - clip_low.
    clipped = ((unit_advantages > 0) & (ratio > 1.0 + clip_high)) | (
        (unit_advantages < 0) & (ratio < 1.0 - clip_low)
    )
    loss = torch.where(clipped, clipped_loss, unclipped_loss)
    return SurrogateOutput(loss=loss, ratio=ratio, clipped=clipped)


def gaussian_kl(mean: Tensor, ref_mean: Tensor, std: Tensor | float) -> Tensor:
    """KL( N(mean, std^2) || N(ref_mean, std^2) ) = |mean - ref_mean|^2 / (2 std^2) for a Gaussian step.

    Averaged over the non-batch elements (the same "mean over latent elements" reduction used for step
    log-probs). This is the exact transition KL; Flow-GRPO's code divides by ``2 g^2`` instead of ``2 std^2``
    (``gen_rl.objective.transition_kl``, estimator ``flow_grpo``). ``mean`` / ``ref_mean``: ``[B, ...]``; ``std``:
    ``[B]``, a scalar, or broadcastable to ``mean``. Returns ``[B]``.
    """
    _check_same_shape(mean=mean, ref_mean=ref_mean)
    if mean.dim() < 1:
        raise ValueError("mean must have a batch dimension [B, ...], got a 0-d tensor.")
    std = torch.as_tensor(std, device=mean.device)
    batch_size = mean.shape[0]
    if std.dim() == 1 and std.shape[0] == batch_size and mean.dim() > 1:
        std = std.reshape(batch_size, *([1] * (mean.dim() - 1)))
    try:
        broadcast_shape = torch.broadcast_shapes(std.shape, mean.shape)
    except RuntimeError as err:
        raise ValueError(
            f"std of shape {tuple(std.shape)} does not broadcast to mean {tuple(mean.shape)}; "
            "pass std as [B], a scalar, or broadcastable to mean."
        ) from err
    if tuple(broadcast_shape) != tuple(mean.shape):
        raise ValueError(f"std of shape {tuple(std.shape)} would enlarge mean {tuple(mean.shape)}.")
    dtype = _float_dtype(mean)
    kl_elements = (mean.to(dtype) - ref_mean.to(dtype)).square() / (2.0 * std.to(dtype).square())
    return kl_elements.reshape(batch_size, -1).mean(dim=1)


def token_kl(log_probs: Tensor, ref_log_probs: Tensor, *, estimator: str = "k3") -> Tensor:
    """Per-unit estimators of KL(pi || ref) from samples of pi (Schulman, "Approximating KL Divergence").

    With ``log_ratio = ref_log_probs - log_probs``: ``k1 = -log_ratio`` (unbiased, can be negative),
    ``k2 = 0.5 * log_ratio^2`` (biased, low variance), ``k3 = exp(log_ratio) - log_ratio - 1`` (unbiased,
    always >= 0; used by GRPO). Same shape as the inputs, computed in at least float32.
    """
    if estimator not in KL_ESTIMATORS:
        raise ValueError(f"unknown KL estimator {estimator!r}; valid options are {list(KL_ESTIMATORS)}.")
    _check_same_shape(log_probs=log_probs, ref_log_probs=ref_log_probs)
    dtype = _float_dtype(log_probs)
    log_ratio = ref_log_probs.to(dtype) - log_probs.to(dtype)
    if estimator == "k1":
        return -log_ratio
    if estimator == "k2":
        return 0.5 * log_ratio.square()
    # expm1 keeps k3 accurate (and >= 0) for small log-ratios.
    return torch.expm1(log_ratio) - log_ratio


def aggregate(
    per_unit: Tensor,
    mask: Tensor,
    *,
    mode: str = "sample_mean",
    normalizer: float | None = None,
) -> Tensor:
    """Reduce a masked ``[B, T]`` per-unit loss to a scalar.

    Modes:
        ``"sample_mean"`` (GRPO): mean over each sample's masked units, then the sum over samples with >= 1
            unit divided by their number (or by ``normalizer`` when given, e.g. the number of such samples
            summed over processes / accumulation steps). Samples count equally.
        ``"global_mean"`` (DAPO token-mean): sum of masked units / number of masked units (or /
            ``normalizer``, e.g. the unit count summed over processes / accumulation steps). Units count
            equally.
        ``"constant"`` (Dr.GRPO): sum of masked units / (B * ``normalizer``), ``normalizer`` = max completion
            length or number of trained steps (required).

    A float mask acts as per-unit weights. An empty mask returns a zero that keeps the graph (no NaN).
    """
    if mode not in AGGREGATION_MODES:
        raise ValueError(f"unknown aggregation mode {mode!r}; valid options are {list(AGGREGATION_MODES)}.")
    _check_2d("per_unit", per_unit)
    _check_same_shape(per_unit=per_unit, mask=mask)
    if normalizer is not None and not normalizer > 0:
        raise ValueError(f"normalizer must be > 0 when given, got {normalizer}.")
    if mode == "constant" and normalizer is None:
        raise ValueError(
            "aggregate(mode='constant') needs normalizer (Dr.GRPO: the max completion length or the number "
            "of trained steps)."
        )

    weights = mask.to(_float_dtype(per_unit))
    values = per_unit.to(weights.dtype)
    # torch.where (not multiplication) so NaN/inf in masked-out positions (e.g. padding) cannot leak.
    masked_values = torch.where(weights != 0, values * weights, torch.zeros_like(values))
    total = masked_values.sum()
    # Denominators are kept as tensors (no host sync); when there is nothing to average the numerator is an
    # exact 0 that still carries the graph, and the denominator is replaced by 1, giving 0 instead of NaN.

    if mode == "sample_mean":
        unit_count = weights.sum(dim=1)
        has_units = unit_count != 0
        safe_count = torch.where(has_units, unit_count, torch.ones_like(unit_count))
        sample_means = masked_values.sum(dim=1) / safe_count
        sample_total = torch.where(has_units, sample_means, torch.zeros_like(sample_means)).sum()
        if normalizer is not None:
            return sample_total / float(normalizer)
        return sample_total / has_units.sum().clamp_min(1).to(sample_total.dtype)
    if mode == "global_mean":
        if normalizer is not None:
            return total / float(normalizer)
        unit_total = weights.sum()
        return total / torch.where(unit_total != 0, unit_total, torch.ones_like(unit_total))
    # constant (Dr.GRPO); normalizer validated above
    return total / (max(per_unit.shape[0], 1) * float(normalizer))


@torch.no_grad()
def surrogate_stats(
    out: SurrogateOutput,
    log_probs: Tensor,
    old_log_probs: Tensor,
    mask: Tensor,
) -> dict[str, float]:
    """Logging diagnostics of a :class:`SurrogateOutput` over the masked units.

    ``clip_fraction`` (masked mean of ``clipped``), ``approx_kl = 0.5 * masked mean (logp - logp_old)^2``
    (DDPO), ``ratio_mean``, ``ratio_min``, ``ratio_max``. With an empty mask: 0 for the fraction / KL and 1
    for the ratio statistics (identical policies).
    """
    _check_same_shape(
        log_probs=log_probs, old_log_probs=old_log_probs, mask=mask, ratio=out.ratio, clipped=out.clipped
    )
    weights = mask.to(_float_dtype(out.ratio))
    is_unit = weights != 0
    unit_weight = weights.sum()
    if not bool(is_unit.any()) or float(unit_weight) == 0.0:
        return {"clip_fraction": 0.0, "approx_kl": 0.0, "ratio_mean": 1.0, "ratio_min": 1.0, "ratio_max": 1.0}

    def masked_mean(values: Tensor) -> float:
        values = values.to(weights.dtype)
        return float(torch.where(is_unit, values * weights, torch.zeros_like(values)).sum() / unit_weight)

    log_ratio = log_probs.detach().to(weights.dtype) - old_log_probs.detach().to(weights.dtype)
    ratio = out.ratio.detach()
    return {
        "clip_fraction": masked_mean(out.clipped),
        "approx_kl": 0.5 * masked_mean(log_ratio.square()),
        "ratio_mean": masked_mean(ratio),
        "ratio_min": float(ratio[is_unit].min()),
        "ratio_max": float(ratio[is_unit].max()),
    }
