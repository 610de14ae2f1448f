"""Shared pieces of the forward-process algorithms (AWM, DGPO, Diffusion-DPO, SFT).

All of them train a rectified-flow velocity ``v_theta`` on ``x_t = (1 - t) x0 + t eps`` with the target
``v = eps - x0`` (the flow-matching loss of Lipman et al. 2023 / Liu et al. 2023) at the rollout's own grid
times, CFG-free, and differ in which clean latents ``x0`` they use and how the per-sample errors are combined.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from gen_rl.algorithms.base import LossBatch, Policy, refuse
from gen_rl.algorithms.diffusion_nft import is_rectified_flow
from gen_rl.core.seeding import derive_seed
from gen_rl.core.step_selection import num_trained_steps


def refuse_non_flow(name: str, sampler: Any, sample: Any) -> None:
    """One line for a sampler without the rectified-flow forward process, or for CFG."""
    if not is_rectified_flow(sampler):
        family = getattr(sampler, "family", type(sampler).__name__)
        raise refuse(
            f"{name} trains on the rectified-flow forward process x_t = (1 - t) x0 + t eps, and the {family} "
            "sampler is not one. Use a FLUX or SD3 model, or a likelihood-ratio algorithm (flow_grpo)"
        )
    cfg_scale = getattr(sample, "cfg_scale", 1.0)
    if cfg_scale > 1.0:
        raise refuse(f"{name} trains CFG-free, but sample.cfg_scale is {cfg_scale}; set sample.cfg_scale: 1")


def expand(values: Tensor, like: Tensor) -> Tensor:
    """``[B]`` values broadcast against ``[B, ...]`` tensors."""
    return values.view(-1, *([1] * (like.ndim - 1)))


def noise_clean(clean: Tensor, times: Tensor, noise: Tensor) -> tuple[Tensor, Tensor]:
    """``x_t = (1 - t) x0 + t eps`` and the flow-matching target ``eps - x0`` (float32)."""
    times = expand(times.float(), clean)
    return (1.0 - times) * clean + times * noise, noise - clean


def matching_error(velocity: Tensor, target: Tensor) -> Tensor:
    """Per-sample flow-matching error ``[B]``: ``mean over elements of (v - target)^2``."""
    return (velocity.float() - target).square().mean(dim=tuple(range(1, velocity.ndim)))


def draw_noise(batch: LossBatch, shape: torch.Size, tag: str, seed: int) -> Tensor:
    """``eps ~ N(0, I)`` of ``shape`` from the batch's generator (or one seeded from (seed, tag, step, units))."""
    generator = batch.generator
    if generator is None:
        generator = torch.Generator().manual_seed(
            derive_seed(seed, tag, batch.step, batch.units.flatten().tolist())
        )
    return torch.randn(shape, generator=generator, device=generator.device, dtype=torch.float32)


def velocity_fn(policy: Policy, rollout: Any, conditioning: dict[str, Tensor] | None = None) -> Callable:
    """``predict(x_t, model_times) -> v`` (float32, CFG-free) with the rollout's (or given) conditioning."""
    sampler = policy.sampler
    dtype = rollout.latents.dtype
    conditioning = rollout.conditioning if conditioning is None else conditioning

    def predict(noised: Tensor, model_times: Tensor) -> Tensor:
        return sampler.predict_velocity(
            noised.to(dtype), model_times, conditioning, 1.0, rollout.image_size
        ).float()

    return predict


def grid_times(rollout: Any, units: Tensor) -> tuple[Tensor, Tensor]:
    """The noise level ``t`` ``[B]`` and the model timestep ``[B]`` of each sample's grid point ``units [B]``."""
    rows = torch.arange(len(rollout), device=rollout.sigmas.device)
    units = units.to(rollout.sigmas.device)
    return rollout.sigmas[rows, units].float(), rollout.timesteps[rows, units]


def random_grid_points(rollout: Any, fraction: float, seed: int, tag: str, step: int, shared: bool) -> Tensor:
    """``floor(S x fraction)`` distinct grid points ``[B, K]`` per sample (the same for all when ``shared``)."""
    grid_points = rollout.timesteps.shape[1]
    count = num_trained_steps(fraction, grid_points)
    generator = torch.Generator().manual_seed(derive_seed(seed, tag, step))
    rows = 1 if shared else len(rollout)
    units = torch.stack([torch.randperm(grid_points, generator=generator)[:count] for _ in range(rows)])
    return units.sort(dim=1).values.expand(len(rollout), -1).clone()


def group_index(rollout: Any) -> tuple[Tensor, int]:
    """Each sample's group ``[B]`` (0..G-1, by prompt and group id: members share both) and the number of groups."""
    keys = list(zip(rollout.prompts, rollout.group_ids.tolist(), strict=True))
    first: dict[tuple, int] = {}
    index = [first.setdefault(key, len(first)) for key in keys]
    return torch.tensor(index, device=rollout.latents.device), len(first)


def check_whole_groups(name: str, groups: Tensor, num_groups: int, group_size: int | None) -> None:
    """Refuse a microbatch that holds only part of a group (the group-level loss would be wrong)."""
    if group_size is None:
        return
    counts = torch.bincount(groups, minlength=num_groups)
    if bool((counts != group_size).any()):
        raise RuntimeError(
            f"{name}: a microbatch holds {counts.tolist()} members of its groups, not whole groups of "
            f"{group_size}; set train.samples_per_update and train.microbatch_size to multiples of group_size"
        )


class OfflineImages:
    """Prompts with image files (reference images, preference pairs) encoded for training, cached once each.

    The prompt embeddings come from the sampler's own ``encode_prompts`` (CFG-free, with the run's sequence
    length and guidance) and the latents from its ``encode`` at the rollout's image size; the text encoders and
    the VAE are frozen, so each prompt and image is encoded once and kept on the model's device.
    """

    def __init__(self, prompts: list[str]) -> None:
        self.prompts = prompts
        self.encoding_options: Any = None  # set by ``remember_sampling``
        self._conditioning: dict[str, dict[str, Tensor]] = {}
        self._latents: dict[tuple[str, tuple[int, int]], Tensor] = {}

    def remember_sampling(self, sample: Any) -> None:
        """The prompt-encoding settings of the run (``sample`` section): sequence length and guidance."""
        from types import SimpleNamespace

        self.encoding_options = SimpleNamespace(
            cfg_scale=1.0,
            negative_prompt="",
            guidance=getattr(sample, "guidance", None),
            max_sequence_length=getattr(sample, "max_sequence_length", None),
        )

    def draw(self, batch: LossBatch, count: int, tag: str, seed: int) -> list[int]:
        """``count`` record indices drawn uniformly (with replacement) from the batch's generator."""
        generator = torch.Generator().manual_seed(
            derive_seed(seed, tag, batch.step, batch.units.flatten().tolist())
        )
        if batch.generator is not None:
            generator = torch.Generator().manual_seed(
                int(torch.randint(2**62, (1,), generator=batch.generator, device=batch.generator.device))
            )
        return torch.randint(len(self.prompts), (count,), generator=generator).tolist()

    @torch.no_grad()
    def conditioning(self, sampler: Any, indices: list[int]) -> dict[str, Tensor]:
        """Batch-first prompt embeddings of records ``indices``."""
        if self.encoding_options is None:
            self.remember_sampling(None)
        rows = []
        for index in indices:
            prompt = self.prompts[index]
            if prompt not in self._conditioning:
                self._conditioning[prompt] = sampler.encode_prompts([prompt], self.encoding_options, 1)
            rows.append(self._conditioning[prompt])
        return {key: torch.cat([row[key] for row in rows]) for key in rows[0]}

    @torch.no_grad()
    def latents(self, sampler: Any, paths: list[str], image_size: tuple[int, int]) -> Tensor:
        """Clean latents ``[n, ...]`` (float32) of the images at ``paths``, resized to ``image_size``."""
        from gen_rl.core.images import load_condition_image

        rows = []
        for path in paths:
            key = (path, tuple(image_size))
            if key not in self._latents:
                pixels = load_condition_image(path, image_size[0], image_size[1])[None].to(sampler.device)
                self._latents[key] = sampler.encode(pixels).float()
            rows.append(self._latents[key])
        return torch.cat(rows)
