"""Stateless, batched single-step maths for stochastic samplers used in GRPO-style RL.

Every function here takes the current sample and the model prediction for one denoising step and returns a
:class:`StepOutput`: the next sample, the Gaussian step mean and std, and the log-density of the next sample
under that Gaussian. Nothing here holds state, draws random numbers, or calls a model.

Conventions
-----------
Rectified flow, diffusers convention: ``x_s = (1 - s) x0 + s eps``; the model predicts the velocity
``v ~ eps - x0``; sampling runs ``s: 1 -> 0`` so ``ds = sigma_next - sigma < 0``. Under this convention
``eps = x + (1 - s) v`` and the score is ``grad log p_s(x) = -(x + (1 - s) v) / s``.

All maths is float32 whatever the input dtype (inputs are upcast with ``.float()``). ``sample`` is
``[B, ...]``; ``sigma`` / ``sigma_next`` / ``alpha_bar`` arguments may be Python floats, 0-d tensors or
``[B]`` tensors (every sample may sit at its own noise level).

Log-probability reduction
-------------------------
``log_prob`` is the exact per-element Gaussian log density **averaged** (not summed) over all non-batch
elements, giving one value per sample (shape ``[B]``). This matches the public Flow-GRPO and DanceGRPO
code for their flow SDE steps, so their clip ranges apply to those steps as published; Flow-GRPO's CPS
log-prob drops every constant and its KL divides by ``g^2`` instead of the step variance, which
``gen_rl/objective.py`` offers as named settings (``tests/test_recipes.py`` checks both). The summed
(true joint) log density is ``log_prob * sample[0].numel()``. A deterministic transition (std == 0) has no
density; its ``log_prob`` is NaN.

Noise / next_sample semantics
-----------------------------
``next_sample`` given (training-time recomputation): it is used as-is (upcast to float32) and ``log_prob``
is evaluated at it. Otherwise ``next_sample = mean + std * noise``, where ``noise=None`` means zero noise
(``next_sample == mean``). Giving both is an error. Callers draw the noise themselves, which keeps these
functions free of generators and device-placement concerns.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = [
    "DDIM_PREDICTION_TYPES",
    "SDE_STEPS",
    "StepOutput",
    "check_ddim_grid",
    "check_flow_grid",
    "cps_step",
    "dance_grpo_step",
    "ddim_step",
    "ddim_step_unchecked",
    "ddim_v_step",
    "flow_grpo_step",
    "flow_sde_step",
    "flow_step_unchecked",
    "gaussian_log_prob",
    "get_flow_step",
]

Scalar = float | Tensor

_HALF_LOG_TWO_PI = 0.5 * math.log(2.0 * math.pi)
# Floor for denominators that are exactly zero only where the matching numerator is exactly zero
# (sigma == 0 with ds == 0, sigma == sigma_next == 1, alpha_bar == alpha_bar_prev == 1): it turns 0/0 into 0.
_TINY = 1e-20


@dataclass(frozen=True)
class StepOutput:
    """Result of one stochastic sampler step.

    Attributes:
        next_sample: float32, shape of ``sample``.
        mean: float32, shape of ``sample``; the Gaussian step mean ``mu``.
        std: float32, shape ``[B]``; per-sample std shared by every element.
        log_prob: float32, shape ``[B]``; ``log N(next_sample; mean, std^2)`` averaged over the non-batch
            elements (see module docstring); NaN where ``std == 0``.
    """

    next_sample: Tensor
    mean: Tensor
    std: Tensor
    log_prob: Tensor


# --------------------------------------------------------------------------------------------------------
# Private helpers
# --------------------------------------------------------------------------------------------------------


def _per_sample(value: Scalar, sample: Tensor, name: str) -> Tensor:
    """Return ``value`` as a float32 ``[B]`` tensor on ``sample``'s device.

    Accepts a Python number, a tensor with one element, or a tensor with B elements whose shape is ``[B]``
    or ``[B, 1, ..., 1]``.
    """
    batch_size = sample.shape[0]
    if not isinstance(value, Tensor):
        return torch.full((batch_size,), float(value), dtype=torch.float32, device=sample.device)
    value = value.to(device=sample.device, dtype=torch.float32)
    if value.numel() == 1:
        return value.reshape(1).expand(batch_size)
    if value.dim() >= 1 and value.shape[0] == batch_size and value.numel() == batch_size:
        return value.reshape(batch_size)
    raise ValueError(
        f"{name} must be a float, a one-element tensor or a [B] tensor with B={batch_size}; "
        f"got a tensor of shape {tuple(value.shape)}"
    )


def _expand(per_sample: Tensor, sample: Tensor) -> Tensor:
    """View a ``[B]`` tensor as ``[B, 1, ..., 1]`` so it broadcasts over ``sample``'s trailing dims."""
    return per_sample.reshape(per_sample.shape[0], *([1] * (sample.dim() - 1)))


def _check_range(values: Tensor, name: str, low: float, high: float, *, low_open: bool = False) -> None:
    """Raise a ValueError naming ``name`` if any element lies outside ``[low, high]`` (or ``(low, high]``)."""
    smallest, largest = values.min().item(), values.max().item()
    too_small = smallest <= low if low_open else smallest < low
    if too_small or largest > high or math.isnan(smallest) or math.isnan(largest):
        bad = smallest if too_small or math.isnan(smallest) else largest
        interval = f"({low}, {high}]" if low_open else f"[{low}, {high}]"
        raise ValueError(f"{name} must lie in {interval}; got {bad}")


def _check_nonnegative(value: Scalar, name: str) -> None:
    """Raise a ValueError if a noise-level style parameter is negative (or NaN)."""
    smallest = value.min().item() if isinstance(value, Tensor) else float(value)
    if not smallest >= 0.0:
        raise ValueError(f"{name} must be >= 0; got {smallest}")


def _check_same_shape(tensor: Tensor | None, sample: Tensor, name: str) -> None:
    """Raise a ValueError if ``tensor`` is given and its shape differs from ``sample``'s."""
    if tensor is not None and tensor.shape != sample.shape:
        raise ValueError(
            f"{name} must have the shape of sample {tuple(sample.shape)}; got {tuple(tensor.shape)}"
        )


def _check_step_inputs(
    sample: Tensor, prediction: Tensor, prediction_name: str, noise: Tensor | None, next_sample: Tensor | None
) -> None:
    """Validate the tensors shared by every step function."""
    if sample.dim() < 1:
        raise ValueError("sample must have a batch dimension: shape [B, ...]")
    _check_same_shape(prediction, sample, prediction_name)
    _check_same_shape(noise, sample, "noise")
    _check_same_shape(next_sample, sample, "next_sample")
    if noise is not None and next_sample is not None:
        raise ValueError("give either noise (to draw next_sample) or next_sample (to score it), not both")


def _flow_sigmas(sigma: Scalar, sigma_next: Scalar, sample: Tensor) -> tuple[Tensor, Tensor]:
    """Return validated ``[B]`` float32 sigma and sigma_next with ``0 <= sigma_next <= sigma <= 1``."""
    sigma_now = _per_sample(sigma, sample, "sigma")
    sigma_after = _per_sample(sigma_next, sample, "sigma_next")
    _check_range(sigma_now, "sigma", 0.0, 1.0)
    _check_range(sigma_after, "sigma_next", 0.0, 1.0)
    if bool((sigma_after > sigma_now).any()):
        raise ValueError("sigma_next must be <= sigma (sampling runs from sigma=1 to sigma=0)")
    return sigma_now, sigma_after


def _finish_step(
    sample: Tensor, mean: Tensor, std: Tensor, noise: Tensor | None, next_sample: Tensor | None
) -> StepOutput:
    """Draw (or take) the next sample and score it under ``N(mean, std^2)``."""
    if next_sample is not None:
        next_sample = next_sample.float()
    elif noise is not None:
        next_sample = mean + _expand(std, sample) * noise.float()
    else:
        next_sample = mean
    return StepOutput(
        next_sample=next_sample, mean=mean, std=std, log_prob=gaussian_log_prob(next_sample, mean, std)
    )


# --------------------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------------------


def gaussian_log_prob(x: Tensor, mean: Tensor, std: Tensor) -> Tensor:
    """Per-sample Gaussian log density ``log N(x; mean, std^2 I)``, averaged over non-batch elements.

    Implements the exact per-element density ``-(x - mu)^2 / (2 std^2) - log std - 0.5 log(2 pi)`` used for
    the policy ratio in DDPO / Flow-GRPO / DanceGRPO, reduced by the MEAN over all non-batch elements (see
    the module docstring; ``sum = mean * numel``).

    Args:
        x: ``[B, ...]`` point at which to evaluate.
        mean: ``[B, ...]`` Gaussian mean.
        std: ``[B]`` (or one-element) per-sample standard deviation.

    Returns:
        float32 ``[B]``; NaN where ``std == 0`` (a deterministic transition has no density).
    """
    x, mean = x.float(), mean.float()
    if x.shape != mean.shape:
        raise ValueError(f"x and mean must have the same shape; got {tuple(x.shape)} and {tuple(mean.shape)}")
    std_per_sample = _per_sample(std, x, "std")
    std_b = _expand(std_per_sample, x)
    element_log_prob = -((x - mean) ** 2) / (2.0 * std_b**2) - torch.log(std_b) - _HALF_LOG_TWO_PI
    log_prob = element_log_prob.reshape(x.shape[0], -1).mean(dim=1)
    return torch.where(std_per_sample > 0, log_prob, torch.full_like(log_prob, float("nan")))


def flow_sde_step(
    sample: Tensor,
    velocity: Tensor,
    sigma: Scalar,
    sigma_next: Scalar,
    diffusion: Scalar,
    *,
    noise: Tensor | None = None,
    next_sample: Tensor | None = None,
) -> StepOutput:
    """Euler-Maruyama step of the marginal-preserving reverse-time flow SDE with diffusion coefficient g.

    Implements the ODE-to-SDE conversion of Flow-GRPO (Liu et al., 2025), i.e. the reverse SDE
    ``dx = [v - g^2/2 * score] ds + g dW`` with the rectified-flow score ``-(x + (1 - s) v) / s``:

        mu  = x + ds * [v + g^2 / (2 s) * (x + (1 - s) v)],    std = g * sqrt(|ds|),   ds = s_next - s.

    ``g = 0`` gives exactly the Euler ODE step ``x + ds * v``.

    Args:
        sample: ``[B, ...]`` current sample ``x`` at noise level ``sigma``.
        velocity: model prediction ``v ~ eps - x0``, shape of ``sample``.
        sigma, sigma_next: current and next noise levels in ``[0, 1]`` with ``sigma_next <= sigma``.
        diffusion: ``g >= 0`` as a float or ``[B]`` tensor.
        noise: standard normal noise shaped like ``sample``; None means zero noise.
        next_sample: if given, scored instead of drawn (training-time recomputation).
    """
    _check_step_inputs(sample, velocity, "velocity", noise, next_sample)
    sigma_now, sigma_after = _flow_sigmas(sigma, sigma_next, sample)
    diffusion_b = _per_sample(diffusion, sample, "diffusion")
    _check_nonnegative(diffusion_b, "diffusion")
    return _flow_sde_from_valid(sample, velocity, sigma_now, sigma_after, diffusion_b, noise, next_sample)


def _flow_sde_from_valid(
    sample: Tensor,
    velocity: Tensor,
    sigma_now: Tensor,
    sigma_after: Tensor,
    diffusion_b: Tensor,
    noise: Tensor | None,
    next_sample: Tensor | None,
) -> StepOutput:
    """Body of :func:`flow_sde_step` for already-validated ``[B]`` float32 sigmas and diffusion."""
    sample, velocity = sample.float(), velocity.float()
    sigma_step = sigma_after - sigma_now  # ds <= 0
    # sigma == 0 forces ds == 0, so the flooring below only turns the meaningless 0/0 into 0.
    drift_gain = diffusion_b**2 / (2.0 * sigma_now.clamp_min(_TINY))
    sigma_x = _expand(sigma_now, sample)
    score_term = sample + (1.0 - sigma_x) * velocity  # = -s * score = eps_hat
    drift = velocity + _expand(drift_gain, sample) * score_term
    mean = sample + _expand(sigma_step, sample) * drift
    std = diffusion_b * (sigma_now - sigma_after).sqrt()
    return _finish_step(sample, mean, std, noise, next_sample)


def flow_grpo_step(
    sample: Tensor,
    velocity: Tensor,
    sigma: Scalar,
    sigma_next: Scalar,
    noise_level: float,
    *,
    noise: Tensor | None = None,
    next_sample: Tensor | None = None,
) -> StepOutput:
    """Flow-GRPO SDE step: :func:`flow_sde_step` with ``g = a * sqrt(s / (1 - s))`` (Liu et al., 2025).

    The Flow-GRPO diffusion schedule ``sigma_t = a sqrt(t / (1 - t))`` is infinite at ``s = 1``, where
    every grid starts. As in Flow-GRPO's reference code, the ``(1 - s)`` in the denominator is replaced by
    ``(1 - s_next)`` where ``s >= 1``, giving ``g = a sqrt(s / (1 - s_next))`` at the first step, whose
    std is then ``a * sqrt(s / (1 - s_next)) * sqrt(s - s_next)`` (= ``a`` exactly when ``s = 1``).
    A tiny-epsilon guard instead (``1 - s + eps``) gives a first-step std of ``a * sqrt(|ds| / eps)``: already
    ~2.2 for ``a = 0.7``, ``|ds| = 0.1``, ``eps = 1e-2`` and hundreds for ``eps = 1e-6``, swamping the
    unit-variance starting noise and the drift that is supposed to compensate it.

    Args:
        noise_level: Flow-GRPO's ``a >= 0`` (the reference uses ~0.7). 0 gives the Euler ODE step.
        See :func:`flow_sde_step` for the other arguments.
    """
    _check_step_inputs(sample, velocity, "velocity", noise, next_sample)
    _check_nonnegative(noise_level, "noise_level")
    sigma_now, sigma_after = _flow_sigmas(sigma, sigma_next, sample)
    return _flow_grpo_from_valid(sample, velocity, sigma_now, sigma_after, noise_level, noise, next_sample)


def _flow_grpo_from_valid(
    sample: Tensor,
    velocity: Tensor,
    sigma_now: Tensor,
    sigma_after: Tensor,
    noise_level: float,
    noise: Tensor | None,
    next_sample: Tensor | None,
) -> StepOutput:
    """Body of :func:`flow_grpo_step` for already-validated ``[B]`` float32 sigmas."""
    denominator_sigma = torch.where(sigma_now >= 1.0, sigma_after, sigma_now)
    # Only sigma == sigma_next == 1 (a zero-length step, ds == 0) reaches a zero denominator.
    diffusion_b = noise_level * (sigma_now / (1.0 - denominator_sigma).clamp_min(_TINY)).sqrt()
    return _flow_sde_from_valid(sample, velocity, sigma_now, sigma_after, diffusion_b, noise, next_sample)


def dance_grpo_step(
    sample: Tensor,
    velocity: Tensor,
    sigma: Scalar,
    sigma_next: Scalar,
    noise_level: float,
    *,
    noise: Tensor | None = None,
    next_sample: Tensor | None = None,
) -> StepOutput:
    """DanceGRPO SDE step: :func:`flow_sde_step` with a constant diffusion ``g = eta`` (Xue et al., 2025).

    Implements DanceGRPO's rectified-flow reverse SDE ``dz = (u - eta^2/2 * score) dt + eta dw`` discretised
    with Euler-Maruyama. ``noise_level`` is DanceGRPO's ``eta`` (named like the other flow steps so that every
    entry of :data:`SDE_STEPS` takes the same keywords); see :func:`flow_sde_step` for the other arguments.
    """
    _check_step_inputs(sample, velocity, "velocity", noise, next_sample)
    _check_nonnegative(noise_level, "noise_level")
    sigma_now, sigma_after = _flow_sigmas(sigma, sigma_next, sample)
    return _dance_grpo_from_valid(sample, velocity, sigma_now, sigma_after, noise_level, noise, next_sample)


def _dance_grpo_from_valid(
    sample: Tensor,
    velocity: Tensor,
    sigma_now: Tensor,
    sigma_after: Tensor,
    noise_level: float,
    noise: Tensor | None,
    next_sample: Tensor | None,
) -> StepOutput:
    """Body of :func:`dance_grpo_step` for already-validated ``[B]`` float32 sigmas."""
    diffusion_b = torch.full_like(sigma_now, float(noise_level))
    return _flow_sde_from_valid(sample, velocity, sigma_now, sigma_after, diffusion_b, noise, next_sample)


def cps_step(
    sample: Tensor,
    velocity: Tensor,
    sigma: Scalar,
    sigma_next: Scalar,
    noise_level: float,
    *,
    noise: Tensor | None = None,
    next_sample: Tensor | None = None,
) -> StepOutput:
    """Coefficients-Preserving Sampling step (Wang & Yu, 2025), the DDIM-style flow update.

    With ``x0_hat = x - s v``, ``x1_hat = x + (1 - s) v`` and ``n = s_next * sin(a pi / 2)``:

        mu = (1 - s_next) x0_hat + sqrt(s_next^2 - n^2) x1_hat,    std = n,

    so that ``next_sample = (1 - s_next) x0_hat + s_next * (unit-variance mix of x1_hat and fresh noise)``
    keeps exactly the coefficients of the interpolant ``x_s = (1 - s) x0 + s eps``.

    Args:
        noise_level: ``a >= 0``; ``a = 0`` is the deterministic DDIM-like step (equal to the Euler step),
            ``a = 1`` replaces ``x1_hat`` by fresh noise entirely.
        See :func:`flow_sde_step` for the other arguments.
    """
    _check_step_inputs(sample, velocity, "velocity", noise, next_sample)
    _check_nonnegative(noise_level, "noise_level")
    sigma_now, sigma_after = _flow_sigmas(sigma, sigma_next, sample)
    return _cps_from_valid(sample, velocity, sigma_now, sigma_after, noise_level, noise, next_sample)


def _cps_from_valid(
    sample: Tensor,
    velocity: Tensor,
    sigma_now: Tensor,
    sigma_after: Tensor,
    noise_level: float,
    noise: Tensor | None,
    next_sample: Tensor | None,
) -> StepOutput:
    """Body of :func:`cps_step` for already-validated ``[B]`` float32 sigmas."""
    sample, velocity = sample.float(), velocity.float()
    sigma_x = _expand(sigma_now, sample)
    x0_hat = sample - sigma_x * velocity
    x1_hat = sample + (1.0 - sigma_x) * velocity
    angle = noise_level * math.pi / 2.0
    std = sigma_after * math.sin(angle)
    # sqrt(s_next^2 - n^2) == s_next * |cos(angle)|, written without cancellation.
    x1_coefficient = sigma_after * abs(math.cos(angle))
    mean = _expand(1.0 - sigma_after, sample) * x0_hat + _expand(x1_coefficient, sample) * x1_hat
    return _finish_step(sample, mean, std, noise, next_sample)


def ddim_step(
    sample: Tensor,
    epsilon: Tensor,
    alpha_bar: Scalar,
    alpha_bar_prev: Scalar,
    eta: float,
    *,
    noise: Tensor | None = None,
    next_sample: Tensor | None = None,
) -> StepOutput:
    """DDIM step with stochasticity ``eta`` for epsilon-prediction models, as in DDPO (Black et al., 2023).

    Implements Song et al. (2021) Eq. (12) with the variance of Eq. (16):

        x0_hat = (x - sqrt(1 - ab) eps) / sqrt(ab)
        var    = (1 - ab_prev) / (1 - ab) * (1 - ab / ab_prev),   std = eta * sqrt(var)
        mu     = sqrt(ab_prev) x0_hat + sqrt(1 - ab_prev - std^2) eps.

    Args:
        sample: ``[B, ...]`` current sample ``x_t``.
        epsilon: predicted noise, shape of ``sample``.
        alpha_bar, alpha_bar_prev: cumulative alphas of the current and the next (less noisy) timestep,
            in ``(0, 1]`` with ``alpha_bar_prev >= alpha_bar``.
        eta: in ``[0, 1]``; 0 is deterministic DDIM, 1 the DDPM posterior variance. Larger values make
            ``1 - ab_prev - std^2`` negative, so they are rejected.
        noise, next_sample: see the module docstring.
    """
    ab_now, ab_after = _ddim_inputs(
        sample, epsilon, "epsilon", alpha_bar, alpha_bar_prev, eta, noise, next_sample
    )
    return ddim_step_unchecked(sample, epsilon, ab_now, ab_after, eta, "epsilon", noise, next_sample)


def ddim_v_step(
    sample: Tensor,
    v_prediction: Tensor,
    alpha_bar: Scalar,
    alpha_bar_prev: Scalar,
    eta: float,
    *,
    noise: Tensor | None = None,
    next_sample: Tensor | None = None,
) -> StepOutput:
    """DDIM step with ``eta`` for v-prediction models (Salimans & Ho, 2022, ``v = sqrt(ab) eps - sqrt(1 - ab) x0``).

    The prediction is turned into ``x0_hat = sqrt(ab) x - sqrt(1 - ab) v`` and ``eps_hat = sqrt(ab) v +
    sqrt(1 - ab) x`` exactly as diffusers' ``DDIMScheduler`` does, then stepped as in :func:`ddim_step`.
    """
    ab_now, ab_after = _ddim_inputs(
        sample, v_prediction, "v_prediction", alpha_bar, alpha_bar_prev, eta, noise, next_sample
    )
    return ddim_step_unchecked(
        sample, v_prediction, ab_now, ab_after, eta, "v_prediction", noise, next_sample
    )


def _ddim_inputs(
    sample: Tensor,
    prediction: Tensor,
    prediction_name: str,
    alpha_bar: Scalar,
    alpha_bar_prev: Scalar,
    eta: float,
    noise: Tensor | None,
    next_sample: Tensor | None,
) -> tuple[Tensor, Tensor]:
    """Validated ``[B]`` float32 alpha-bars of a DDIM step (raises ValueError naming the bad input)."""
    _check_step_inputs(sample, prediction, prediction_name, noise, next_sample)
    _check_eta(eta)
    ab_now = _per_sample(alpha_bar, sample, "alpha_bar")
    ab_after = _per_sample(alpha_bar_prev, sample, "alpha_bar_prev")
    _check_range(ab_now, "alpha_bar", 0.0, 1.0, low_open=True)
    _check_range(ab_after, "alpha_bar_prev", 0.0, 1.0, low_open=True)
    if bool((ab_after < ab_now).any()):
        raise ValueError("alpha_bar_prev must be >= alpha_bar (the next timestep is less noisy)")
    return ab_now, ab_after


def _check_eta(eta: float) -> None:
    if not 0.0 <= eta <= 1.0:
        raise ValueError(f"eta must lie in [0, 1] for DDIM; got {eta}")


DDIM_PREDICTION_TYPES = ("epsilon", "v_prediction")


def ddim_step_unchecked(
    sample: Tensor,
    prediction: Tensor,
    ab_now: Tensor,
    ab_after: Tensor,
    eta: float,
    prediction_type: str,
    noise: Tensor | None,
    next_sample: Tensor | None,
) -> StepOutput:
    """:func:`ddim_step` / :func:`ddim_v_step` without input checks, for loops that validated their grid once.

    ``ab_now`` / ``ab_after``: ``[B]`` float32 alpha-bars already checked (e.g. by :func:`check_ddim_grid`);
    ``prediction_type``: ``epsilon`` or ``v_prediction``.
    """
    sample, prediction = sample.float(), prediction.float()
    root_ab = _expand(ab_now.sqrt(), sample)
    root_one_minus_ab = _expand((1.0 - ab_now).sqrt(), sample)
    if prediction_type == "epsilon":
        epsilon = prediction
        x0_hat = (sample - root_one_minus_ab * epsilon) / root_ab
    elif prediction_type == "v_prediction":
        x0_hat = root_ab * sample - root_one_minus_ab * prediction
        epsilon = root_ab * prediction + root_one_minus_ab * sample
    else:
        raise ValueError(
            f"DDIM prediction_type must be one of {DDIM_PREDICTION_TYPES}; got {prediction_type!r}"
        )
    # alpha_bar == 1 forces alpha_bar_prev == 1, so the floor only turns 0/0 into 0.
    variance = (1.0 - ab_after) / (1.0 - ab_now).clamp_min(_TINY) * (1.0 - ab_now / ab_after)
    std = eta * variance.clamp_min(0.0).sqrt()
    # Non-negative in exact arithmetic for eta <= 1; the clamp only absorbs float rounding.
    epsilon_coefficient = (1.0 - ab_after - std**2).clamp_min(0.0).sqrt()
    mean = _expand(ab_after.sqrt(), sample) * x0_hat + _expand(epsilon_coefficient, sample) * epsilon
    return _finish_step(sample, mean, std, noise, next_sample)


SDE_STEPS: dict[str, Callable[..., StepOutput]] = {
    "flow_grpo": flow_grpo_step,
    "dance_grpo": dance_grpo_step,
    "cps": cps_step,
}


def get_flow_step(name: str) -> Callable[..., StepOutput]:
    """Look up a flow-family step function by name in :data:`SDE_STEPS`.

    All returned functions share the signature
    ``(sample, velocity, sigma, sigma_next, noise_level, *, noise=None, next_sample=None) -> StepOutput``.
    """
    try:
        return SDE_STEPS[name]
    except KeyError:
        known = ", ".join(sorted(SDE_STEPS))
        raise ValueError(f"unknown flow SDE step kind {name!r}; known kinds: {known}") from None


_UNCHECKED_FLOW_STEPS: dict[str, Callable[..., StepOutput]] = {
    "flow_grpo": _flow_grpo_from_valid,
    "dance_grpo": _dance_grpo_from_valid,
    "cps": _cps_from_valid,
}


def flow_step_unchecked(name: str) -> Callable[..., StepOutput]:
    """The body of flow step ``name`` without input checks, for loops that validated their grid once.

    Signature ``(sample, velocity, sigma [B], sigma_next [B], noise_level, noise, next_sample) -> StepOutput``
    with float32 ``[B]`` sigmas already checked by :func:`check_flow_grid` and ``noise_level >= 0``; the result
    equals the checked function's (:data:`SDE_STEPS`) to the bit.
    """
    get_flow_step(name)  # the known-names error
    return _UNCHECKED_FLOW_STEPS[name]


def flow_euler_unchecked(
    sample: Tensor, velocity: Tensor, sigma_now: Tensor, sigma_after: Tensor
) -> StepOutput:
    """The deterministic Euler ODE step ``x + ds v`` (:func:`flow_sde_step` with ``g = 0``), unchecked."""
    zero = torch.zeros_like(sigma_now)
    return _flow_sde_from_valid(sample, velocity, sigma_now, sigma_after, zero, None, None)


def check_flow_grid(sigmas: Tensor) -> None:
    """Validate a whole flow grid ``[..., S+1]`` once: every sigma in [0, 1], non-increasing along the last dim.

    One host synchronisation for the whole grid (the per-step checks of the public step functions do one per
    call); raises the same ValueError messages as they do.
    """
    sigmas = sigmas.float()
    _check_range(sigmas.reshape(-1), "sigma", 0.0, 1.0)
    if bool((sigmas[..., 1:] > sigmas[..., :-1]).any()):
        raise ValueError("sigma_next must be <= sigma (sampling runs from sigma=1 to sigma=0)")


def check_ddim_grid(alpha_bars: Tensor) -> None:
    """Validate a whole DDIM alpha-bar grid ``[..., S+1]`` once: in (0, 1], non-decreasing along the last dim."""
    alpha_bars = alpha_bars.float()
    _check_range(alpha_bars.reshape(-1), "alpha_bar", 0.0, 1.0, low_open=True)
    if bool((alpha_bars[..., 1:] < alpha_bars[..., :-1]).any()):
        raise ValueError("alpha_bar_prev must be >= alpha_bar (the next timestep is less noisy)")
