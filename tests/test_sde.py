"""Tests for pipelines.sde: log densities, agreement with diffusers, and exact Gaussian marginals."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from diffusers import DDIMScheduler, FlowMatchEulerDiscreteScheduler

from pipelines.sde import (
    SDE_STEPS,
    StepOutput,
    cps_step,
    dance_grpo_step,
    ddim_step,
    flow_grpo_step,
    flow_sde_step,
    gaussian_log_prob,
    get_flow_step,
)

DATA_MEAN = 1.5
DATA_STD = 0.5
DATA_VAR = DATA_STD**2
NUM_PARTICLES = 20_000


def _generator(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _randn(*shape: int, generator: torch.Generator) -> torch.Tensor:
    return torch.randn(*shape, generator=generator)


# ----------------------------------------------------------------------------------------------------------
# Exact predictors for Gaussian data x0 ~ N(DATA_MEAN, DATA_STD^2)
# ----------------------------------------------------------------------------------------------------------


def _gaussian_velocity(sample: torch.Tensor, sigma: float) -> torch.Tensor:
    """Exact v(x, s) = E[eps - x0 | x_s = x] for x_s = (1 - s) x0 + s eps."""
    marginal_var = (1.0 - sigma) ** 2 * DATA_VAR + sigma**2
    centred = sample - (1.0 - sigma) * DATA_MEAN
    x0_posterior_mean = DATA_MEAN + (1.0 - sigma) * DATA_VAR / marginal_var * centred
    eps_posterior_mean = sigma / marginal_var * centred
    return eps_posterior_mean - x0_posterior_mean


def _gaussian_epsilon(sample: torch.Tensor, alpha_bar: float) -> torch.Tensor:
    """Exact E[eps | x_t = x] for x_t = sqrt(ab) x0 + sqrt(1 - ab) eps."""
    marginal_var = alpha_bar * DATA_VAR + 1.0 - alpha_bar
    return math.sqrt(1.0 - alpha_bar) / marginal_var * (sample - math.sqrt(alpha_bar) * DATA_MEAN)


def _run_flow_sampler(step_fn, noise_level: float, sigmas: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """Sample the Gaussian problem from s = sigmas[0] = 1 down to sigmas[-1] with the exact velocity."""
    generator = _generator(seed)
    sample = _randn(NUM_PARTICLES, 1, generator=generator)
    for sigma, sigma_next in zip(sigmas[:-1].tolist(), sigmas[1:].tolist(), strict=True):
        velocity = _gaussian_velocity(sample, sigma)
        noise = _randn(*sample.shape, generator=generator)
        sample = step_fn(sample, velocity, sigma, sigma_next, noise_level, noise=noise).next_sample
    return sample


def _ode_step(sample, velocity, sigma, sigma_next, _unused, *, noise):
    return flow_sde_step(sample, velocity, sigma, sigma_next, 0.0, noise=noise)


def _sde_without_drift_correction(sample, velocity, sigma, sigma_next, noise_level, *, noise):
    """Deliberately wrong Flow-GRPO sampler: same injected noise, but no g^2 score correction in the drift."""
    diffusion = noise_level * math.sqrt(sigma / (1.0 - (sigma_next if sigma >= 1.0 else sigma)))
    next_sample = sample + (sigma_next - sigma) * velocity + diffusion * math.sqrt(sigma - sigma_next) * noise
    return SimpleNamespace(next_sample=next_sample)


# ----------------------------------------------------------------------------------------------------------
# Log densities
# ----------------------------------------------------------------------------------------------------------

PER_SAMPLE_SIGMA = torch.tensor([1.0, 0.8, 0.5, 0.2])
PER_SAMPLE_SIGMA_NEXT = torch.tensor([0.9, 0.6, 0.45, 0.1])
PER_SAMPLE_ALPHA_BAR = torch.tensor([0.05, 0.3, 0.6, 0.9])
PER_SAMPLE_ALPHA_BAR_PREV = torch.tensor([0.1, 0.5, 0.7, 0.95])


def _call_step(kind: str, sample, prediction, **kwargs) -> StepOutput:
    """Run one step of ``kind`` at the per-sample noise levels above with a non-zero noise level."""
    if kind == "ddim":
        return ddim_step(sample, prediction, PER_SAMPLE_ALPHA_BAR, PER_SAMPLE_ALPHA_BAR_PREV, 0.8, **kwargs)
    if kind == "flow_sde":
        diffusion = torch.tensor([0.3, 0.5, 0.7, 1.1])
        return flow_sde_step(sample, prediction, PER_SAMPLE_SIGMA, PER_SAMPLE_SIGMA_NEXT, diffusion, **kwargs)
    return get_flow_step(kind)(sample, prediction, PER_SAMPLE_SIGMA, PER_SAMPLE_SIGMA_NEXT, 0.7, **kwargs)


def _expected_std(kind: str) -> torch.Tensor:
    """Independent per-sample std formulas for the settings used in :func:`_call_step`."""
    step = PER_SAMPLE_SIGMA - PER_SAMPLE_SIGMA_NEXT
    if kind == "ddim":
        ab, ab_prev = PER_SAMPLE_ALPHA_BAR, PER_SAMPLE_ALPHA_BAR_PREV
        return 0.8 * ((1 - ab_prev) / (1 - ab) * (1 - ab / ab_prev)).sqrt()
    if kind == "flow_sde":
        return torch.tensor([0.3, 0.5, 0.7, 1.1]) * step.sqrt()
    if kind == "flow_grpo":
        denominator = torch.tensor([1 - 0.9, 1 - 0.8, 1 - 0.5, 1 - 0.2])  # first sample sits at s = 1
        return 0.7 * (PER_SAMPLE_SIGMA / denominator).sqrt() * step.sqrt()
    if kind == "dance_grpo":
        return 0.7 * step.sqrt()
    return PER_SAMPLE_SIGMA_NEXT * math.sin(0.7 * math.pi / 2)  # cps


STEP_KINDS = ["flow_sde", "flow_grpo", "dance_grpo", "cps", "ddim"]


@pytest.mark.parametrize("kind", STEP_KINDS)
def test_log_prob_matches_torch_normal_with_per_sample_levels(kind: str) -> None:
    generator = _generator(1)
    sample, prediction, noise = (_randn(4, 3, 5, 5, generator=generator) for _ in range(3))
    out = _call_step(kind, sample, prediction, noise=noise)
    torch.testing.assert_close(out.std, _expected_std(kind), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(out.next_sample, out.mean + out.std.view(-1, 1, 1, 1) * noise)
    reference = torch.distributions.Normal(out.mean, out.std.view(-1, 1, 1, 1)).log_prob(out.next_sample)
    torch.testing.assert_close(out.log_prob, reference.mean(dim=(1, 2, 3)), rtol=1e-5, atol=1e-5)
    assert out.log_prob.shape == (4,) and out.std.shape == (4,)


@pytest.mark.parametrize("kind", STEP_KINDS)
def test_log_prob_recomputed_at_given_next_sample(kind: str) -> None:
    generator = _generator(2)
    sample, prediction, noise = (_randn(4, 6, generator=generator) for _ in range(3))
    rollout = _call_step(kind, sample, prediction, noise=noise)
    recomputed = _call_step(kind, sample, prediction, next_sample=rollout.next_sample)
    torch.testing.assert_close(recomputed.log_prob, rollout.log_prob, rtol=0, atol=0)
    shifted = _call_step(kind, sample, prediction, next_sample=rollout.next_sample + 0.5)
    assert torch.all(shifted.log_prob < rollout.log_prob)


def test_recomputed_log_prob_is_differentiable_in_the_velocity() -> None:
    generator = _generator(11)
    sample, noise = _randn(2, 3, generator=generator), _randn(2, 3, generator=generator)
    velocity = _randn(2, 3, generator=generator).requires_grad_(True)
    rollout = flow_grpo_step(sample, velocity.detach(), 0.6, 0.4, 0.7, noise=noise)
    recomputed = flow_grpo_step(sample, velocity, 0.6, 0.4, 0.7, next_sample=rollout.next_sample)
    recomputed.log_prob.sum().backward()
    # d log_prob / d mean = (x - mu) / (std^2 numel) = noise / (std numel)
    # d mean / d velocity = ds (1 + k (1 - s)) with drift gain k = g^2 / (2 s)
    sigma, sigma_next, std = 0.6, 0.4, rollout.std.view(-1, 1)
    drift_gain = 0.7**2 * sigma / (1 - sigma) / (2 * sigma)
    dmean_dvelocity = (sigma_next - sigma) * (1 + drift_gain * (1 - sigma))
    torch.testing.assert_close(velocity.grad, noise / (std * 3) * dmean_dvelocity)


def test_zero_noise_means_next_sample_is_mean() -> None:
    generator = _generator(3)
    sample, velocity = _randn(3, 4, generator=generator), _randn(3, 4, generator=generator)
    out = flow_grpo_step(sample, velocity, 0.6, 0.4, 0.7)
    assert torch.equal(out.next_sample, out.mean)


def test_gaussian_log_prob_is_nan_for_zero_std_and_exact_otherwise() -> None:
    x = torch.tensor([[0.0, 1.0], [2.0, 2.0]])
    mean = torch.tensor([[0.0, 0.0], [2.0, 2.0]])
    log_prob = gaussian_log_prob(x, mean, torch.tensor([2.0, 0.0]))
    expected_first = -math.log(2.0) - 0.5 * math.log(2 * math.pi) - 0.5 * (1.0 / 8.0)
    assert log_prob[0].item() == pytest.approx(expected_first, abs=1e-6)
    assert math.isnan(log_prob[1].item())


def test_ddim_final_step_to_alpha_one_is_deterministic() -> None:
    generator = _generator(4)
    sample, epsilon = _randn(2, 3, generator=generator), _randn(2, 3, generator=generator)
    out = ddim_step(sample, epsilon, 0.9, 1.0, 1.0, noise=torch.ones(2, 3))
    assert torch.all(out.std == 0) and torch.all(torch.isnan(out.log_prob))
    torch.testing.assert_close(out.next_sample, (sample - math.sqrt(0.1) * epsilon) / math.sqrt(0.9))


# ----------------------------------------------------------------------------------------------------------
# Agreement with diffusers at zero noise (and DDIM with shared noise)
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["flow_sde", "flow_grpo", "dance_grpo", "cps"])
def test_zero_noise_matches_diffusers_flow_match_euler(kind: str) -> None:
    scheduler = FlowMatchEulerDiscreteScheduler()
    scheduler.set_timesteps(10)
    generator = _generator(5)
    ours = theirs = _randn(2, 4, 8, 8, generator=generator)
    for index, timestep in enumerate(scheduler.timesteps):
        velocity = _randn(2, 4, 8, 8, generator=generator)
        sigma, sigma_next = scheduler.sigmas[index], scheduler.sigmas[index + 1]
        if kind == "flow_sde":
            out = flow_sde_step(ours, velocity, sigma, sigma_next, 0.0)
        else:
            out = get_flow_step(kind)(ours, velocity, sigma, sigma_next, 0.0)
        theirs = scheduler.step(velocity, timestep, theirs).prev_sample
        ours = out.next_sample
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
        assert torch.all(out.std == 0)


def _ddim_scheduler(num_steps: int, *, set_alpha_to_one: bool) -> DDIMScheduler:
    scheduler = DDIMScheduler(
        num_train_timesteps=1000,
        beta_schedule="scaled_linear",
        beta_start=0.00085,
        beta_end=0.012,
        set_alpha_to_one=set_alpha_to_one,
        steps_offset=1,
        clip_sample=False,
    )
    scheduler.set_timesteps(num_steps)
    return scheduler


def _ddim_alphas(scheduler: DDIMScheduler, timestep: int) -> tuple[torch.Tensor, torch.Tensor]:
    """alpha_bar at ``timestep`` and at the scheduler's previous timestep (or the final alpha)."""
    prev_timestep = timestep - scheduler.config.num_train_timesteps // scheduler.num_inference_steps
    final = scheduler.final_alpha_cumprod
    alpha_bar_prev = scheduler.alphas_cumprod[prev_timestep] if prev_timestep >= 0 else final
    return scheduler.alphas_cumprod[timestep], alpha_bar_prev


@pytest.mark.parametrize("eta", [0.0, 0.5, 1.0])
def test_ddim_matches_diffusers_scheduler(eta: float) -> None:
    scheduler = _ddim_scheduler(10, set_alpha_to_one=False)
    generator = _generator(6)
    ours = theirs = _randn(2, 4, 8, 8, generator=generator)
    for timestep in scheduler.timesteps.tolist():
        epsilon = _randn(2, 4, 8, 8, generator=generator)
        noise = _randn(2, 4, 8, 8, generator=generator) if eta > 0 else None
        alpha_bar, alpha_bar_prev = _ddim_alphas(scheduler, timestep)
        ours = ddim_step(ours, epsilon, alpha_bar, alpha_bar_prev, eta, noise=noise).next_sample
        theirs = scheduler.step(epsilon, timestep, theirs, eta=eta, variance_noise=noise).prev_sample
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------------------------------------
# Closed-form marginals
# ----------------------------------------------------------------------------------------------------------

UNIFORM_300 = torch.linspace(1.0, 0.0, 301)


@pytest.mark.parametrize(
    ("step_fn", "noise_level"),
    [(_ode_step, 0.0), (flow_grpo_step, 0.7), (dance_grpo_step, 0.5)],
    ids=["ode", "flow_grpo", "dance_grpo"],
)
def test_flow_samplers_recover_gaussian_data(step_fn, noise_level: float) -> None:
    # CPS is left out on purpose: with non-degenerate data its fresh-noise fraction sin(a pi / 2) does not
    # shrink with the step size, so even with the exact velocity it under-disperses (variance ~0.21 for
    # a = 0.5 at any step count). Its defining property is tested with point-mass data below.
    final = _run_flow_sampler(step_fn, noise_level, UNIFORM_300)
    # Monte-Carlo std of the estimates: mean ~0.0035, variance ~0.0025 (N = 20k); bias from 300 steps is tiny.
    assert final.mean().item() == pytest.approx(DATA_MEAN, abs=0.015)
    assert final.var().item() == pytest.approx(DATA_VAR, abs=0.015)


def test_sde_without_drift_correction_misses_the_variance() -> None:
    wrong = _run_flow_sampler(_sde_without_drift_correction, 0.7, UNIFORM_300)
    right = _run_flow_sampler(flow_grpo_step, 0.7, UNIFORM_300)
    assert abs(right.var().item() - DATA_VAR) < 0.015
    assert abs(wrong.var().item() - DATA_VAR) > 0.2


@pytest.mark.parametrize("eta", [0.0, 0.5, 1.0])
def test_ddim_recovers_gaussian_data(eta: float) -> None:
    scheduler = _ddim_scheduler(250, set_alpha_to_one=True)
    generator = _generator(7)
    first_alpha_bar = scheduler.alphas_cumprod[scheduler.timesteps[0]].item()
    start_std = math.sqrt(first_alpha_bar * DATA_VAR + 1.0 - first_alpha_bar)
    start_noise = _randn(NUM_PARTICLES, 1, generator=generator)
    sample = math.sqrt(first_alpha_bar) * DATA_MEAN + start_std * start_noise
    for timestep in scheduler.timesteps.tolist():
        alpha_bar, alpha_bar_prev = _ddim_alphas(scheduler, timestep)
        epsilon = _gaussian_epsilon(sample, alpha_bar.item())
        noise = _randn(*sample.shape, generator=generator)
        sample = ddim_step(sample, epsilon, alpha_bar, alpha_bar_prev, eta, noise=noise).next_sample
    assert sample.mean().item() == pytest.approx(DATA_MEAN, abs=0.015)
    assert sample.var().item() == pytest.approx(DATA_VAR, abs=0.015)


def test_cps_lands_exactly_on_the_interpolant_marginal() -> None:
    generator = _generator(8)
    data_point = torch.tensor([[2.0, -1.0]])
    noise_level = 0.6
    sigmas = torch.linspace(1.0, 0.0, 7)
    sample = _randn(NUM_PARTICLES, 2, generator=generator)
    for sigma, sigma_next in zip(sigmas[:-2].tolist(), sigmas[1:-1].tolist(), strict=True):
        velocity = (sample - data_point) / sigma  # exact: x0_hat = x0, x1_hat = eps
        noise = _randn(*sample.shape, generator=generator)
        out = cps_step(sample, velocity, sigma, sigma_next, noise_level, noise=noise)
        eps_hat = (sample - (1 - sigma) * data_point) / sigma
        angle = noise_level * math.pi / 2
        expected_mean = (1 - sigma_next) * data_point + sigma_next * math.cos(angle) * eps_hat
        torch.testing.assert_close(out.mean, expected_mean, rtol=1e-5, atol=1e-5)
        sample = out.next_sample
        # std of the variance estimate is s^2 * sqrt(2 / N) < 0.01 * s^2.
        torch.testing.assert_close(sample.mean(0), (1 - sigma_next) * data_point[0], rtol=0, atol=0.03)
        torch.testing.assert_close(sample.var(0), torch.full((2,), sigma_next**2), rtol=0.05, atol=0)


def test_flow_grpo_first_step_guard_is_finite() -> None:
    sigmas = torch.linspace(1.0, 0.0, 11)
    noise_level = 0.7
    sample, velocity = torch.zeros(3, 4), torch.ones(3, 4)
    out = flow_grpo_step(sample, velocity, sigmas[0], sigmas[1], noise_level, noise=torch.ones(3, 4))
    one_minus_next = 1.0 - sigmas[1].item()
    expected_std = noise_level * math.sqrt(1.0 / one_minus_next) * math.sqrt(one_minus_next)
    torch.testing.assert_close(out.std, torch.full((3,), expected_std), rtol=1e-5, atol=0)
    assert torch.isfinite(out.next_sample).all() and torch.isfinite(out.log_prob).all()


def test_flow_grpo_ten_steps_keep_the_data_variance() -> None:
    final = _run_flow_sampler(flow_grpo_step, 0.7, torch.linspace(1.0, 0.0, 11))
    assert final.var().item() == pytest.approx(DATA_VAR, abs=0.1)
    assert final.mean().item() == pytest.approx(DATA_MEAN, abs=0.1)


# ----------------------------------------------------------------------------------------------------------
# dtype, broadcasting, errors
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", STEP_KINDS)
def test_bf16_inputs_give_float32_outputs_equal_to_upcast(kind: str) -> None:
    generator = _generator(9)
    sample, prediction, noise = (_randn(4, 2, 3, generator=generator).bfloat16() for _ in range(3))
    low = _call_step(kind, sample, prediction, noise=noise)
    upcast = _call_step(kind, sample.float(), prediction.float(), noise=noise.float())
    for field in ("next_sample", "mean", "std", "log_prob"):
        assert getattr(low, field).dtype == torch.float32
        torch.testing.assert_close(getattr(low, field), getattr(upcast, field), rtol=0, atol=0, msg=field)


def test_sigma_forms_broadcast_identically() -> None:
    generator = _generator(10)
    sample, velocity, noise = (_randn(3, 2, 2, generator=generator) for _ in range(3))
    as_float = dance_grpo_step(sample, velocity, 0.7, 0.5, 0.4, noise=noise)
    for sigma, sigma_next in [
        (torch.tensor(0.7), torch.tensor(0.5)),
        (torch.full((3,), 0.7), torch.full((3,), 0.5)),
        (torch.full((3, 1, 1), 0.7), 0.5),
    ]:
        other = dance_grpo_step(sample, velocity, sigma, sigma_next, 0.4, noise=noise)
        assert torch.equal(other.next_sample, as_float.next_sample)
        assert torch.equal(other.log_prob, as_float.log_prob)


def test_sigma_out_of_range_is_rejected() -> None:
    sample = torch.zeros(2, 3)
    with pytest.raises(ValueError, match=r"sigma must lie in \[0\.0, 1\.0\]; got 1\.5"):
        flow_grpo_step(sample, sample, 1.5, 0.5, 0.7)
    with pytest.raises(ValueError, match="sigma_next must lie in"):
        cps_step(sample, sample, 0.5, torch.tensor([0.2, -0.1]), 0.7)
    with pytest.raises(ValueError, match="sigma_next must be <= sigma"):
        dance_grpo_step(sample, sample, 0.3, 0.5, 0.7)
    with pytest.raises(ValueError, match="alpha_bar must lie in"):
        ddim_step(sample, sample, 0.0, 0.5, 0.5)


def test_noise_and_next_sample_together_are_rejected() -> None:
    sample = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="not both"):
        flow_grpo_step(sample, sample, 0.5, 0.4, 0.7, noise=sample, next_sample=sample)


def test_bad_shapes_and_levels_are_rejected() -> None:
    sample = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="velocity must have the shape of sample"):
        flow_grpo_step(sample, torch.zeros(2, 4), 0.5, 0.4, 0.7)
    with pytest.raises(ValueError, match="noise_level must be >= 0"):
        cps_step(sample, sample, 0.5, 0.4, -0.1)
    with pytest.raises(ValueError, match=r"\[B\] tensor with B=2"):
        flow_grpo_step(sample, sample, torch.full((3,), 0.5), 0.4, 0.7)


def test_unknown_step_name_lists_known_names() -> None:
    with pytest.raises(ValueError, match="'euler'.*cps, dance_grpo, flow_grpo"):
        get_flow_step("euler")
    assert set(SDE_STEPS) == {"flow_grpo", "dance_grpo", "cps"}


def test_flow_steps_share_one_keyword_signature():
    sample = torch.randn(2, 3, generator=torch.Generator().manual_seed(0))
    for name in SDE_STEPS:
        out = get_flow_step(name)(sample, sample, sigma=0.6, sigma_next=0.5, noise_level=0.3)
        assert out.std.gt(0).all(), name
