"""Diffusion-DPO (Wallace et al. 2023, "Diffusion Model Alignment Using Direct Preference Optimization", eq. 14)
in its flow-matching form, against the frozen reference (the model with its LoRA disabled).

For a pair (preferred x0^w, other x0^l) noised at the same time t with the same noise eps, with
``l = mean over elements (v(x_t, t, c) - (eps - x0))^2`` of the trained (theta) and reference (ref) models:

    inside = -(beta / 2) [(l_theta^w - l_ref^w) - (l_theta^l - l_ref^l)]
    L      = mean_pairs -log sigmoid(inside)

as the authors' training script writes eq. 14 (``scale_term = -0.5 beta_dpo``; T and omega(lambda_t) folded
into beta). Two data sources:

- offline (``algorithm.pairs``: a JSONL of prompt, chosen, rejected images, ``gen_rl/preference_pairs.py``):
  each loss call draws as many pairs as the microbatch has samples; the images are encoded once with the
  sampler's VAE at the rollout's size. The trainer's rollouts then only measure the reward.
- online (``pairs: null``): in each group of the rollout the best sample (largest advantage) is preferred to
  the worst; a group whose advantages are all equal gives no pair. The pair trains at the best sample's time.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torch.nn import functional

from gen_rl.algorithms.base import Algorithm, LossBatch, Policy
from gen_rl.algorithms.forward_process import (
    OfflineImages,
    check_whole_groups,
    draw_noise,
    grid_times,
    group_index,
    matching_error,
    noise_clean,
    random_grid_points,
    refuse_non_flow,
    velocity_fn,
)
from gen_rl.algorithms.options_matching import DiffusionDPOOptions


def dpo_logits(
    errors_w: Tensor, reference_errors_w: Tensor, errors_l: Tensor, reference_errors_l: Tensor, beta: float
) -> Tensor:
    """Diffusion-DPO's ``inside`` term ``-(beta / 2) [(l^w - l_ref^w) - (l^l - l_ref^l)]`` per pair (eq. 14)."""
    return -0.5 * beta * ((errors_w - reference_errors_w) - (errors_l - reference_errors_l))


def best_and_worst(advantages: Tensor, groups: Tensor, num_groups: int) -> tuple[Tensor, Tensor]:
    """Rows of the best and the worst sample ``[P]`` of each group whose advantages are not all equal."""
    winners, losers = [], []
    for group in range(num_groups):
        rows = (groups == group).nonzero().flatten()
        values = advantages[rows]
        if rows.numel() > 1 and bool(values.max() > values.min()):
            winners.append(rows[values.argmax()])
            losers.append(rows[values.argmin()])
    empty = torch.zeros(0, dtype=torch.long, device=groups.device)
    return (torch.stack(winners), torch.stack(losers)) if winners else (empty, empty)


class DiffusionDPO(Algorithm):
    """Diffusion-DPO, offline from preference pairs or online best-vs-worst (see the module docstring)."""

    Options = DiffusionDPOOptions
    needs = frozenset({"clean_latents"})
    options: DiffusionDPOOptions

    def __init__(self, options: DiffusionDPOOptions, *, seed: int, num_steps: int) -> None:
        super().__init__(options, seed=seed, num_steps=num_steps)
        self.group_size: int | None = None
        self.pairs = None
        self.images: OfflineImages | None = None
        if options.pairs is not None:
            from gen_rl.preference_pairs import load_preference_pairs

            self.pairs = load_preference_pairs(options.pairs, key="algorithm.pairs")
            self.images = OfflineImages(self.pairs.prompts)

    @property
    def whole_groups(self) -> bool:
        """Online pairs come from whole groups (asks the trainer for group-aligned microbatches)."""
        return self.pairs is None

    def check(self, sampler: Any, rewards: dict[str, Any], sample: Any) -> None:
        """Refuse a non-flow sampler and CFG; remember the group size and the prompt-encoding settings."""
        refuse_non_flow("diffusion_dpo", sampler, sample)
        self.group_size = getattr(sample, "group_size", None)
        if self.images is not None:
            self.images.remember_sampling(sample)

    def select(self, rollout: Any, step: int) -> Tensor:
        """``floor(S x step_fraction)`` grid points ``[B, K]`` per sample, drawn from ``(seed, step)``."""
        return random_grid_points(
            rollout, self.options.step_fraction, self.seed, "dpo-units", step, shared=False
        )

    def loss(self, batch: LossBatch, policy: Policy) -> tuple[Tensor, dict[str, Tensor]]:
        """The DPO loss of this microbatch's pairs (drawn from the pair file, or best vs worst per group)."""
        rollout = batch.rollout
        device = rollout.latents.device
        times, model_times = grid_times(rollout, batch.units[:, 0])
        if self.pairs is None:
            groups, num_groups = group_index(rollout)
            check_whole_groups("diffusion_dpo", groups, num_groups, self.group_size)
            kept = (batch.weight.to(device) > 0).nonzero().flatten()  # samples whose reward was kept
            winners, losers = best_and_worst(
                batch.advantages.to(device).float()[kept], groups[kept], num_groups
            )
            winners, losers = kept[winners], kept[losers]
            if winners.numel() == 0:
                zero = torch.zeros((), device=device, requires_grad=True)
                return zero, {"loss/total": zero.detach(), "loss/policy": zero.detach()}
            clean_w, clean_l = rollout.latents[winners, -1].float(), rollout.latents[losers, -1].float()
            conditioning = {
                key: value[torch.cat([winners, losers]).to(value.device)]
                for key, value in rollout.conditioning.items()
            }
            times, model_times = times[winners.to(times.device)], model_times[winners.to(model_times.device)]
        else:
            assert self.images is not None and self.pairs is not None
            indices = self.images.draw(batch, len(rollout), "dpo-pairs", self.seed)
            sampler = policy.sampler
            clean_w = self.images.latents(
                sampler, [self.pairs.chosen[i] for i in indices], rollout.image_size
            )
            clean_l = self.images.latents(
                sampler, [self.pairs.rejected[i] for i in indices], rollout.image_size
            )
            conditioning = self.images.conditioning(sampler, indices + indices)
        noise = draw_noise(batch, clean_w.shape, "dpo-noise", self.seed).to(device)
        logits = self.pair_logits(policy, rollout, clean_w, clean_l, conditioning, times, model_times, noise)
        loss = functional.softplus(-logits).mean()
        stats = {
            "loss/total": loss.detach(),
            "loss/policy": loss.detach(),
            "dpo/implicit_accuracy": (logits.detach() > 0).float().mean(),
            "dpo/logit_mean": logits.detach().mean(),
            "dpo/pairs": logits.new_tensor(float(len(logits))),
        }
        return loss, stats

    def pair_logits(
        self,
        policy: Policy,
        rollout: Any,
        clean_w: Tensor,
        clean_l: Tensor,
        conditioning: dict[str, Tensor],
        times: Tensor,
        model_times: Tensor,
        noise: Tensor,
    ) -> Tensor:
        """``inside`` of eq. 14 for pairs ``[P]``: both images noised at the same t with the same eps."""
        clean = torch.cat([clean_w, clean_l])
        noised, target = noise_clean(clean, torch.cat([times, times]), torch.cat([noise, noise]))
        both_times = torch.cat([model_times, model_times])
        predict = velocity_fn(policy, rollout, conditioning)
        with torch.no_grad(), policy.reference():
            reference_errors = matching_error(predict(noised, both_times), target)
        errors = matching_error(predict(noised, both_times), target)
        errors_w, errors_l = errors.chunk(2)
        reference_w, reference_l = reference_errors.chunk(2)
        return dpo_logits(errors_w, reference_w, errors_l, reference_l, self.options.beta)
