"""Reward backpropagation for differentiable rewards: DRaFT-K, ReFL and InstructVideo's partial-chain editing.

The loss is ``-mean_b sum_r w_r r(decode(x0), c)``, differentiated through the decoder and some denoising steps
of the rectified-flow ODE ``x_{i+1} = x_i + (sigma_{i+1} - sigma_i) v_theta(x_i, t_i, c)`` (CFG-free):

- ``draft`` (Clark et al. 2024, "Directly Fine-Tuning Diffusion Models on Differentiable Rewards", Alg. 1 with
  truncation K): from the rollout's own latent at grid point S - K, the last K steps are recomputed with
  gradients, each under ``torch.utils.checkpoint`` (activations recomputed in the backward pass);
- ``refl`` (Xu et al. 2023, ImageReward, Alg. 1): from the rollout's latent at a random late step t, the one-step
  prediction ``x0 = x_t - sigma_t v_theta(x_t)`` is decoded and rewarded (loss -r: the paper's phi is a ReLU
  shift for ImageReward's scale, not used here);
- ``partial_edit`` (Yuan et al. 2024, InstructVideo, "reward fine-tuning as editing"): the rollout's clean x0 is
  noised to grid point j = S - edit_steps, ``x_j = (1 - sigma_j) x0 + sigma_j eps``, and denoised to the end
  with gradients through the last ``grad_steps`` steps.

Every reward must declare ``differentiable = True`` (``rewards/base.py``); ``check`` refuses any other at
start-up with one line. Advantages are not used; samples whose reward was dropped are left out. Rewards are
weighted by ``policy.reward_weights`` when the trainer provides it, else 1 each.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from gen_rl.algorithms.base import Algorithm, LossBatch, Policy, refuse
from gen_rl.algorithms.forward_process import draw_noise, expand, refuse_non_flow
from gen_rl.algorithms.options_matching import DraftOptions, PartialEditOptions, ReFLOptions
from gen_rl.core.seeding import derive_seed


class RewardBackprop(Algorithm):
    """What the three reward-backprop algorithms share: the differentiable reward, the ODE step, the loss."""

    needs = frozenset({"trajectory"})
    name = "reward backprop"

    def __init__(self, options: Any, *, seed: int, num_steps: int) -> None:
        super().__init__(options, seed=seed, num_steps=num_steps)
        self.rewards: dict[str, Any] = {}

    def check(self, sampler: Any, rewards: dict[str, Any], sample: Any) -> None:
        """Refuse a non-flow sampler, CFG and any reward that does not declare ``differentiable = True``."""
        refuse_non_flow(self.name, sampler, sample)
        frozen = [key for key, reward in rewards.items() if not getattr(reward, "differentiable", False)]
        if frozen:
            raise refuse(
                f"{self.name} backpropagates the reward into the model, but reward {frozen[0]!r} is not "
                "differentiable (its class does not set differentiable = True); optimise differentiable rewards "
                "only (e.g. colour) or use a likelihood-ratio algorithm (flow_grpo)"
            )
        self.rewards = dict(rewards)

    def sampling(self, step: int) -> dict[str, Any]:
        """Rollouts run the deterministic ODE, the chain the gradient flows through."""
        return {"noise_level": 0.0}

    # ----- shared maths --------------------------------------------------------------------------------------
    def reward(self, policy: Policy, rollout: Any, latents: Tensor) -> Tensor:
        """``sum_r w_r r(decode(latents))`` ``[B]`` on the latents' device, keeping the autograd graph."""
        if not self.rewards:
            raise RuntimeError(f"{self.name}: check(sampler, rewards, sample) must run before training")
        pixels = policy.sampler.decode(latents.to(rollout.latents.dtype), rollout.image_size)
        weights = getattr(policy, "reward_weights", None) or {}
        total = None
        for key, model in self.rewards.items():
            groups = {"group_ids": rollout.group_ids} if getattr(model, "uses_group_ids", False) else {}
            scores = model(
                pixels, rollout.prompts, rollout.metadata, **groups
            ).scores  # a rewards.base.Reward
            term = weights.get(key, 1.0) * scores.to(latents.device)
            total = term if total is None else total + term
        return total

    def denoise(
        self, policy: Policy, rollout: Any, latents: Tensor, start: int, grad_from: int, checkpointing: bool
    ) -> Tensor:
        """ODE steps ``start .. S-1`` from ``latents`` (float32); steps from ``grad_from`` on carry gradients."""
        sampler = policy.sampler
        sigmas, timesteps = rollout.sigmas.float(), rollout.timesteps

        def euler(current: Tensor, index: int) -> Tensor:
            velocity = sampler.predict_velocity(
                current.to(rollout.latents.dtype),
                timesteps[:, index],
                rollout.conditioning,
                1.0,
                rollout.image_size,
            ).float()
            return current + expand(sigmas[:, index + 1] - sigmas[:, index], current) * velocity

        for index in range(start, rollout.num_steps):
            if index < grad_from:
                with torch.no_grad():
                    latents = euler(latents, index)
            elif checkpointing:
                latents = checkpoint(euler, latents, index, use_reentrant=False)
            else:
                latents = euler(latents, index)
        return latents

    def finish(self, batch: LossBatch, scores: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """The loss ``-sum over kept samples of r / microbatch size`` and its statistics."""
        loss = -scores.sum() / len(batch.rollout)
        mean = scores.detach().mean() if scores.numel() else scores.new_zeros(())
        return loss, {"loss/total": loss.detach(), "loss/policy": loss.detach(), "backprop/reward_mean": mean}

    @staticmethod
    def kept_rows(batch: LossBatch) -> Tensor:
        """Rows of the samples whose reward was kept (a dropped sample's NaN would poison the gradient)."""
        return (batch.weight > 0).nonzero().flatten().cpu()


class DRaFT(RewardBackprop):
    """DRaFT-K: the reward's gradient through the last K ODE steps (see the module docstring)."""

    Options = DraftOptions
    name = "draft"
    options: DraftOptions

    def select(self, rollout: Any, step: int) -> Tensor:
        """One unit per sample (the whole truncated chain)."""
        return torch.zeros(len(rollout), 1, dtype=torch.long)

    def loss(self, batch: LossBatch, policy: Policy) -> tuple[Tensor, dict[str, Tensor]]:
        """-r(decode(x0)) with x0 recomputed from the stored latent at grid point S - K."""
        kept = self.kept_rows(batch)
        part = batch.rollout.select(kept)
        start = part.num_steps - self.options.grad_steps
        latents = part.latents[:, start].float()
        clean = self.denoise(policy, part, latents, start, start, self.options.checkpointing)
        return self.finish(batch, self.reward(policy, part, clean))


class ReFL(RewardBackprop):
    """ReFL: the reward of the one-step x0 prediction from a random late step (see the module docstring)."""

    Options = ReFLOptions
    name = "refl"
    options: ReFLOptions

    def select(self, rollout: Any, step: int) -> Tensor:
        """One step per sample, uniform in ``step_range`` (default the last half), drawn from ``(seed, step)``."""
        steps = rollout.num_steps
        low, high = self.options.step_range or (steps // 2, steps)
        generator = torch.Generator().manual_seed(derive_seed(self.seed, "refl-units", step))
        return torch.randint(low, high, (len(rollout), 1), generator=generator)

    def loss(self, batch: LossBatch, policy: Policy) -> tuple[Tensor, dict[str, Tensor]]:
        """-r(decode(x_t - sigma_t v_theta(x_t))) at each sample's step t."""
        kept = self.kept_rows(batch)
        part = batch.rollout.select(kept)
        rows = torch.arange(len(part), device=part.latents.device)
        units = batch.units[kept, 0].to(part.latents.device)
        latents = part.latents[rows, units].float()
        sigmas = part.sigmas[rows, units].float()
        velocity = policy.sampler.predict_velocity(
            latents.to(part.latents.dtype),
            part.timesteps[rows, units],
            part.conditioning,
            1.0,
            part.image_size,
        ).float()
        clean = latents - expand(sigmas, latents) * velocity
        return self.finish(batch, self.reward(policy, part, clean))


class PartialEdit(RewardBackprop):
    """InstructVideo's partial-chain editing (see the module docstring)."""

    Options = PartialEditOptions
    name = "partial_edit"
    options: PartialEditOptions

    def select(self, rollout: Any, step: int) -> Tensor:
        """One unit per sample (the edit)."""
        return torch.zeros(len(rollout), 1, dtype=torch.long)

    def loss(self, batch: LossBatch, policy: Policy) -> tuple[Tensor, dict[str, Tensor]]:
        """-r of the rollout's x0 noised to grid point S - edit_steps and denoised with gradients."""
        options = self.options
        kept = self.kept_rows(batch)
        part = batch.rollout.select(kept)
        start = part.num_steps - options.edit_steps
        clean = part.latents[:, -1].float()
        noise = draw_noise(batch, batch.rollout.latents[:, -1].shape, "edit-noise", self.seed)
        noise = noise[kept.to(noise.device)].to(clean.device)
        sigma = expand(part.sigmas[:, start].float(), clean)
        noised = (1.0 - sigma) * clean + sigma * noise
        grad_steps = options.edit_steps if options.grad_steps is None else options.grad_steps
        edited = self.denoise(policy, part, noised, start, part.num_steps - grad_steps, options.checkpointing)
        return self.finish(batch, self.reward(policy, part, edited))
