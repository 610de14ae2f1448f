"""The rollout / log-prob loops validate their grid once (not once per step), the unchecked step bodies they use
equal the public checked step functions, and DDIM with v-prediction matches diffusers' DDIMScheduler."""

from __future__ import annotations

import pytest
import torch
from diffusers import DDIMScheduler

import pipelines.sde as sde
from gen_rl.core.seeding import draw_noise, make_generators
from pipelines import RolloutOptions, build_sampler
from pipelines.tiny import SD15_SCHEDULE, tiny_flux_pipeline, tiny_sd_pipeline


@pytest.fixture
def range_checks(monkeypatch):
    """Counts calls of the host-syncing range check of pipelines.sde."""
    calls = []
    original = sde._check_range

    def counting(*args, **kwargs):
        calls.append(args[1])
        return original(*args, **kwargs)

    monkeypatch.setattr(sde, "_check_range", counting)
    return calls


@pytest.mark.parametrize(
    ("family", "builder", "sde_type"),
    [("sd", tiny_sd_pipeline, "ddim"), ("flux", tiny_flux_pipeline, "flow_grpo")],
)
def test_the_grid_is_validated_once_per_rollout_whatever_the_number_of_steps(
    range_checks, family, builder, sde_type
):
    sampler = build_sampler(family, builder(seed=0))
    counts = {}
    for steps in (2, 6):
        range_checks.clear()
        options = RolloutOptions(num_steps=steps, height=16, width=16, sde_type=sde_type, decode=False)
        rollout = sampler.rollout(["a red apple", "sky"], options, group_size=2)
        counts[steps] = len(range_checks)
    assert counts[2] == counts[6] == 1
    range_checks.clear()
    sampler.log_prob(rollout, [0, 3, 5])
    assert range_checks == []  # a record made by rollout was checked when it was made
    unchecked = rollout.select([0, 1])
    unchecked.grid_checked = False
    sampler.log_prob(unchecked, [0, 3, 5])
    assert len(range_checks) == 1


@pytest.mark.parametrize("name", sorted(sde.SDE_STEPS))
def test_unchecked_flow_steps_equal_the_public_ones_to_the_bit(name):
    generator = torch.Generator().manual_seed(0)
    sample, velocity, next_sample = (torch.randn(3, 4, 5, generator=generator) for _ in range(3))
    sigma, sigma_next = torch.tensor([1.0, 0.6, 0.3]), torch.tensor([0.8, 0.5, 0.0])
    checked = sde.SDE_STEPS[name](sample, velocity, sigma, sigma_next, 0.7, next_sample=next_sample)
    fast = sde.flow_step_unchecked(name)(sample, velocity, sigma, sigma_next, 0.7, None, next_sample)
    for field in ("next_sample", "mean", "std", "log_prob"):  # (CPS's last step has std 0: log-prob NaN)
        torch.testing.assert_close(
            getattr(fast, field), getattr(checked, field), atol=0, rtol=0, equal_nan=True
        )
    euler = sde.flow_euler_unchecked(sample, velocity, sigma, sigma_next)
    assert torch.equal(euler.mean, sde.flow_sde_step(sample, velocity, sigma, sigma_next, 0.0).mean)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_ddim_steps_match_diffusers_ddim_scheduler(prediction_type):
    """Independent computation: DDIMScheduler.step with the same variance noise, at every step of a 5-step grid."""
    scheduler = DDIMScheduler(**SD15_SCHEDULE, clip_sample=False, prediction_type=prediction_type)
    scheduler.set_timesteps(5)
    public = sde.ddim_step if prediction_type == "epsilon" else sde.ddim_v_step
    generator = torch.Generator().manual_seed(1)
    for timestep in scheduler.timesteps:
        sample, prediction, noise = (torch.randn(2, 4, 3, 3, generator=generator) for _ in range(3))
        previous = int(timestep) - 1000 // 5
        alpha_bar = scheduler.alphas_cumprod[timestep]
        alpha_bar_prev = (
            scheduler.alphas_cumprod[previous] if previous >= 0 else scheduler.final_alpha_cumprod
        )
        expected = scheduler.step(prediction, timestep, sample, eta=0.6, variance_noise=noise).prev_sample
        out = public(sample, prediction, alpha_bar, alpha_bar_prev, 0.6, noise=noise)
        torch.testing.assert_close(out.next_sample, expected, atol=1e-6, rtol=1e-6)
        fast = sde.ddim_step_unchecked(
            sample,
            prediction,
            alpha_bar.reshape(1).expand(2),
            torch.as_tensor(alpha_bar_prev).reshape(1).expand(2),
            0.6,
            prediction_type,
            noise,
            None,
        )
        assert torch.equal(fast.next_sample, out.next_sample) and torch.equal(fast.log_prob, out.log_prob)


def test_grid_checks_name_the_problem():
    with pytest.raises(ValueError, match="sigma must lie in"):
        sde.check_flow_grid(torch.tensor([1.2, 0.5, 0.0]))
    with pytest.raises(ValueError, match="sigma_next must be <= sigma"):
        sde.check_flow_grid(torch.tensor([[1.0, 0.5, 0.6]]))
    with pytest.raises(ValueError, match=r"alpha_bar must lie in \(0.0, 1.0\]"):
        sde.check_ddim_grid(torch.tensor([0.0, 0.5]))
    with pytest.raises(ValueError, match="alpha_bar_prev must be >= alpha_bar"):
        sde.check_ddim_grid(torch.tensor([0.2, 0.5, 0.4]))
    sde.check_flow_grid(torch.tensor([1.0, 0.5, 0.0]))
    sde.check_ddim_grid(torch.tensor([0.1, 0.5, 0.999]))


def test_noise_streams_are_per_sample_and_drawn_on_the_generator_device():
    seeds = [11, 22, 33]
    together = draw_noise(make_generators(seeds), (2, 3))
    alone = draw_noise(make_generators(seeds[1:2]), (2, 3))
    assert torch.equal(together[1], alone[0]) and not torch.equal(together[0], together[1])
    generators = make_generators(seeds, device="cpu")
    assert all(generator.device.type == "cpu" for generator in generators)
    assert draw_noise(generators, (2,)).device.type == "cpu"
