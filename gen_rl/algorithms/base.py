"""The algorithm contract: what a training algorithm declares, and what the trainer gives it.

The generation trainer never branches on an algorithm's name. It asks the algorithm

- ``needs``: what the rollout must record (:data:`RECORDS`);
- ``check(sampler, rewards, config)``: refuse an impossible combination with one line, before training;
- ``sampling(step)``: rollout option overrides for training step ``step`` (an SDE window, the ODE, ...);
- ``rollout_context(policy)``: the context training rollouts run in (an old policy swapped in, ...);
- ``rollout(sampler, prompts, options, **kwargs)``: the training rollout (default ``sampler.rollout``; a tree
  algorithm builds its own from the sampler's hooks);
- ``select(rollout, step)``: which units of each sample train, ``[B, K]`` indices (denoising steps, or grid
  points of the forward process);
- ``unit_advantages(rollout, group_ids, advantages, units)``: advantages and weights ``[B, K]`` per trained unit
  (default: each sample's advantage at every unit, weight 1; BranchGRPO's per-node, best-of-N's subset);
- ``whole_groups``: True when a microbatch must hold whole groups (the trainer orders samples group by group);
- ``loss(batch, policy)``: the loss of one microbatch at one unit and its named statistics (tensors, no host
  sync; a statistic whose name ends in ``_max`` is reduced by max, the others by mean);
- ``after_update(policy)``: called after every optimizer step (an EMA "old" policy, a schedule, ...);
- ``state_dict()`` / ``load_state_dict()``: its state, saved with the run and restored on resume.

A user algorithm is a subclass of :class:`Algorithm` named in the config as ``algorithm.name:
package.module:Class``; its options are its ``Options`` dataclass (a subclass of ``AlgorithmOptions``).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol

import torch
from torch import Tensor

from gen_rl.algorithms.options import AlgorithmOptions
from gen_rl.core.config import ConfigError

# what a rollout can be asked to record
RECORDS = frozenset({"log_probs", "step_means", "clean_latents", "trajectory", "branches"})


@dataclass
class LossBatch:
    """One microbatch at one trained unit: the sub-rollout and what the trainer computed for it.

    ``units`` ``[b, 1]`` the unit index of each sample (a denoising step for likelihood-ratio algorithms);
    ``advantages`` / ``weight`` ``[b]``: group advantages and 1 / 0 for a sample whose reward was kept / dropped;
    ``step`` the training step; ``generator`` a seeded generator on the model's device for any noise the loss
    draws (derived from the run seed, step, update and unit).
    """

    rollout: Any
    units: Tensor
    advantages: Tensor
    weight: Tensor
    step: int
    generator: torch.Generator | None = None


class Policy(Protocol):
    """What the trainer exposes to an algorithm's loss."""

    sampler: Any  # the family sampler: log_prob(rollout, units), predict(...), encode / decode
    parameters: list[torch.nn.Parameter]  # the trained parameters (LoRA or all)
    reward_weights: dict[str, float]  # reward key -> weight of reward.terms (reward backprop sums them)

    def reference(self) -> AbstractContextManager[None]:
        """Inside the block the sampler runs the frozen reference (LoRA disabled), without gradients."""

    def swapped(self, tensors: list[Tensor]) -> AbstractContextManager[None]:
        """Inside the block the trained parameters hold ``tensors`` (e.g. an EMA "old" policy)."""


class Algorithm(ABC):
    """A declared training algorithm (see the module docstring for the contract)."""

    Options: ClassVar[type[AlgorithmOptions]] = AlgorithmOptions
    needs: ClassVar[frozenset[str]] = frozenset()
    whole_groups: ClassVar[bool] = False  # microbatches of whole groups (losses comparing a group's members)

    def __init__(self, options: AlgorithmOptions, *, seed: int, num_steps: int) -> None:
        self.options = options
        self.seed = seed
        self.num_steps = num_steps  # denoising steps S of a rollout

    @property
    def trust_region(self) -> float | None:
        """The ratio range the update trusts (the smaller clip epsilon), or None for likelihood-free algorithms.

        When it is a number the trainer checks "ratio == 1 before the first update" against a fraction of it.
        """
        return None

    def log_probs_for_ratio(self, log_probs: Tensor, stds: Tensor) -> Tensor:
        """Step log-probs ``[B, S]`` in the convention the loss compares (the ratio check uses it)."""
        return log_probs

    def check(self, sampler: Any, rewards: dict[str, Any], sample: Any) -> None:  # noqa: B027 - optional hook
        """Raise ``ConfigError`` (one line naming the fix) if this algorithm cannot run with these parts."""

    def setup(self, policy: Policy) -> None:  # noqa: B027 - optional hook
        """Called once after the model is prepared, before the first rollout (build state from parameters)."""

    def sampling(self, step: int) -> dict[str, Any]:
        """Rollout option overrides for training step ``step`` (``RolloutOptions`` field -> value)."""
        return {}

    def rollout_context(self, policy: Policy) -> AbstractContextManager[None]:
        """The context the training rollouts run in (e.g. an "old" policy swapped in); default: the policy."""
        return nullcontext()

    def rollout(self, sampler: Any, prompts: list[str], options: Any, **kwargs: Any) -> Any:
        """The training rollout of ``prompts`` (``Sampler.rollout``'s arguments); default ``sampler.rollout``."""
        return sampler.rollout(prompts, options, **kwargs)

    def unit_advantages(
        self, rollout: Any, group_ids: Tensor, advantages: Tensor, units: Tensor
    ) -> tuple[Tensor, Tensor]:
        """Advantages and weights ``[B, K]`` of the selected ``units`` from the samples' advantages ``[B]`` of this
        process's whole groups (``group_ids`` ``[B]``: each sample's group in the step). Default: each sample's
        advantage at every unit, weight 1."""
        expanded = advantages[:, None].expand(-1, units.shape[1])
        return expanded, torch.ones(expanded.shape, device=advantages.device)

    @abstractmethod
    def select(self, rollout: Any, step: int) -> Tensor:
        """Units ``[B, K]`` to train for each sample at training step ``step`` (same K for every sample)."""

    @abstractmethod
    def loss(self, batch: LossBatch, policy: Policy) -> tuple[Tensor, dict[str, Tensor]]:
        """Loss (a scalar, mean over the microbatch) and named statistics of one microbatch at one unit."""

    def after_update(self, policy: Policy) -> None:  # noqa: B027 - optional hook
        """Called after every optimizer step."""

    def state_dict(self) -> dict[str, Any]:
        """State to save with the run (tensors and plain values); empty when stateless."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""
        if state:
            raise ValueError(f"{type(self).__name__} keeps no state but the checkpoint holds {sorted(state)}")


def refuse(message: str) -> ConfigError:
    """A ConfigError for an impossible combination (the trainer prints it as one line)."""
    return ConfigError(message)


def reduce_stats(totals: dict[str, Tensor], stats: dict[str, Tensor]) -> None:
    """Add one call's statistics into running totals on the device: max for ``*_max`` names, else sum."""
    for key, value in stats.items():
        value = value.detach().float()
        if key not in totals:
            totals[key] = value
        elif key.endswith("_max"):
            totals[key] = torch.maximum(totals[key], value)
        else:
            totals[key] = totals[key] + value


def finish_stats(totals: dict[str, Tensor], calls: int) -> dict[str, float]:
    """Host values of the totals, one sync: means (sum / calls) and maxima."""
    if not totals:
        return {}
    keys = list(totals)
    values = torch.stack([totals[key] for key in keys]).cpu().tolist()
    return {
        key: value if key.endswith("_max") else value / calls for key, value in zip(keys, values, strict=True)
    }
