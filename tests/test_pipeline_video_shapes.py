"""Video shapes through the sampler side: a toy video family (a Conv3d denoiser over [C, T, H, W] latents) runs
the real rollout / log-prob / select / cat code written once in ``pipelines.base``."""

from __future__ import annotations

import dataclasses
from types import SimpleNamespace

import pytest
import torch
from diffusers import DiffusionPipeline, FlowMatchEulerDiscreteScheduler

from gen_rl.core.images import save_image_grid
from pipelines import FlowMatchSampler, Rollout, RolloutOptions

CHANNELS, SCALE = 2, 4


class ToyVideoSampler(FlowMatchSampler):
    """Latents [B, 2, T, H/4, W/4]; the 'velocity' is a seeded Conv3d plus a per-prompt offset."""

    family = "toy_video"
    pipeline_class = DiffusionPipeline
    required_components = ("transformer",)
    video = True

    def encode_prompts(self, prompts, options, num_per_prompt):
        codes = torch.tensor([float(len(prompt)) for prompt in prompts]).repeat_interleave(num_per_prompt)
        return {"prompt_embeds": codes[:, None] / 10}

    def initial_latents(self, generators, image_size, num_frames=None):
        height, width = image_size
        shape = (CHANNELS, num_frames, height // SCALE, width // SCALE)
        return torch.stack([torch.randn(shape, generator=generator) for generator in generators])

    def grid(self, options, latents):
        scheduler = FlowMatchEulerDiscreteScheduler.from_config(self.scheduler.config)
        scheduler.set_timesteps(options.num_steps)
        return scheduler.sigmas.float(), scheduler.timesteps.float()

    def model_output(self, latents, timesteps, conditioning, image_size):
        offset = conditioning["prompt_embeds"] + timesteps[:, None] / 1000
        return self.active_denoiser(latents) + offset[:, :, None, None, None]

    def decode(self, latents, image_size):
        return torch.sigmoid(latents.float()).repeat_interleave(2, dim=1)[:, :3]

    def encode(self, pixels, generator=None):
        raise NotImplementedError


@pytest.fixture(scope="module")
def sampler():
    torch.manual_seed(0)
    denoiser = torch.nn.Conv3d(CHANNELS, CHANNELS, kernel_size=3, padding=1)
    pipeline = SimpleNamespace(
        transformer=denoiser,
        scheduler=FlowMatchEulerDiscreteScheduler(),
        _execution_device=torch.device("cpu"),
    )
    return ToyVideoSampler(pipeline)


OPTIONS = RolloutOptions(num_steps=4, height=16, width=20, num_frames=3, noise_level=0.7)


@pytest.mark.parametrize("sde_type", ["flow_grpo", "dance_grpo", "cps"])
def test_video_rollout_shapes_and_ratio_one(sampler, sde_type, tmp_path):
    options = dataclasses.replace(OPTIONS, sde_type=sde_type)
    rollout = sampler.rollout(["red", "blue sky"], options, group_size=2)
    assert rollout.latents.shape == (4, 5, CHANNELS, 3, 4, 5) and rollout.num_frames == 3
    assert rollout.pixels.shape == (4, 3, 3, 4, 5)
    assert sampler.check_log_probs(rollout, atol=1e-5) <= 1e-5
    steps = rollout.stochastic[0].nonzero().flatten().tolist()
    out = sampler.log_prob(rollout.select([2, 1]), steps)
    assert out.means.shape == (2, len(steps), CHANNELS, 3, 4, 5)
    torch.testing.assert_close(out.log_probs, rollout.log_probs[[2, 1]][:, steps], atol=1e-5, rtol=0)
    save_image_grid(rollout.pixels, tmp_path / "video.png")


def test_video_select_cat_and_batch_independence(sampler):
    pair = sampler.rollout(["red", "blue sky"], OPTIONS, group_size=2)
    alone = sampler.rollout(["blue sky"], OPTIONS, group_size=2)
    torch.testing.assert_close(alone.latents, pair.latents[2:], atol=1e-6, rtol=0)
    merged = Rollout.cat([pair.select([0, 1]), pair.select([2, 3])])
    for name in ("latents", "log_probs", "sigmas", "pixels"):
        assert torch.equal(getattr(merged, name), getattr(pair, name))
    assert merged.grid_checked and merged.num_frames == 3
    other_frames = sampler.rollout(["red"], dataclasses.replace(OPTIONS, num_frames=5))
    with pytest.raises(ValueError, match="different settings"):
        Rollout.cat([pair, other_frames])


def test_video_log_prob_has_gradients(sampler):
    rollout = sampler.rollout(["red"], OPTIONS, group_size=2)
    sampler.denoiser.zero_grad()
    sampler.log_prob(rollout, [0, 2]).log_probs.sum().backward()
    assert sampler.denoiser.weight.grad.abs().sum() > 0
    sampler.denoiser.zero_grad()


def test_a_hand_built_record_is_checked_once_per_call(sampler):
    """A record not made by rollout (grid_checked False) has its grid validated: a rising sigma is refused."""
    rollout = sampler.rollout(["red"], OPTIONS)
    broken = dataclasses.replace(rollout, sigmas=rollout.sigmas.flip(1), grid_checked=False)
    with pytest.raises(ValueError, match="sigma_next must be <= sigma"):
        sampler.log_prob(broken, [0])
    fine = dataclasses.replace(rollout, grid_checked=False)
    torch.testing.assert_close(
        sampler.log_prob(fine, [1]).log_probs, rollout.log_probs[:, [1]], atol=1e-6, rtol=0
    )
