"""SFT: supervised fine-tuning on reference images with the flow-matching loss (Lipman et al. 2023, eq. 23 /
rectified flow, Liu et al. 2023): for a reference image's clean latent x0 (the sampler's VAE ``encode``) and its
prompt c, at a grid time t with noise eps,

    L = mean_b mean over elements (v_theta((1 - t) x0 + t eps, t, c) - (eps - x0))^2.

The images come from ``algorithm.images`` (JSONL ``{"prompt", "image"}``, checked line by line at start-up);
each loss call draws as many records as the microbatch has samples, at those samples' grid times. Rewards and
advantages do not enter the loss: the trainer's rollouts only measure how the reward moves.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

from gen_rl.algorithms.base import Algorithm, LossBatch, Policy
from gen_rl.algorithms.forward_process import (
    OfflineImages,
    draw_noise,
    grid_times,
    matching_error,
    noise_clean,
    random_grid_points,
    refuse_non_flow,
    velocity_fn,
)
from gen_rl.algorithms.options_matching import SFTOptions


class SFT(Algorithm):
    """Flow-matching fine-tuning on reference images (see the module docstring)."""

    Options = SFTOptions
    needs = frozenset({"clean_latents"})
    options: SFTOptions

    def __init__(self, options: SFTOptions, *, seed: int, num_steps: int) -> None:
        super().__init__(options, seed=seed, num_steps=num_steps)
        from gen_rl.data import load_prompts

        records = load_prompts(options.images, "abort", "algorithm.images")
        self.image_paths = [record["image"] for record in records.metadata]
        self.images = OfflineImages(records.prompts)

    def check(self, sampler: Any, rewards: dict[str, Any], sample: Any) -> None:
        """Refuse a non-flow sampler and CFG; remember the prompt-encoding settings."""
        refuse_non_flow("sft", sampler, sample)
        self.images.remember_sampling(sample)

    def select(self, rollout: Any, step: int) -> Tensor:
        """``floor(S x step_fraction)`` grid points ``[B, K]`` per sample, drawn from ``(seed, step)``."""
        return random_grid_points(
            rollout, self.options.step_fraction, self.seed, "sft-units", step, shared=False
        )

    def loss(self, batch: LossBatch, policy: Policy) -> tuple[Tensor, dict[str, Tensor]]:
        """The flow-matching loss on as many reference images as the microbatch has samples."""
        rollout = batch.rollout
        device = rollout.latents.device
        indices = self.images.draw(batch, len(rollout), "sft-images", self.seed)
        sampler = policy.sampler
        clean = self.images.latents(sampler, [self.image_paths[i] for i in indices], rollout.image_size)
        conditioning = self.images.conditioning(sampler, indices)
        times, model_times = grid_times(rollout, batch.units[:, 0])
        noise = draw_noise(batch, clean.shape, "sft-noise", self.seed).to(device)
        noised, target = noise_clean(clean, times, noise)
        velocity = velocity_fn(policy, rollout, conditioning)(noised, model_times)
        loss = matching_error(velocity, target).mean()
        return loss, {"loss/total": loss.detach(), "loss/policy": loss.detach()}
