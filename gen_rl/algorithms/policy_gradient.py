"""Likelihood-ratio policy gradients over SDE denoising steps: Flow-GRPO and DanceGRPO as declarations.

Both train the clipped surrogate per trained step (Flow-GRPO eq. 8, DanceGRPO eq. 9) on log-probs recomputed
from the rollout record, with an optional KL to the frozen reference (the LoRA-disabled model, run through the
prepared model). Their differences from each other are settings, not code: the SDE (``sample.sde_type``), the
step selection (Flow-GRPO-Fast / MixGRPO windows, DanceGRPO's random fraction), the log-prob convention and KL
estimator (``gen_rl/objective.py``) and the advantage std (``reward.std_ddof`` / ``std_eps``);
``tests/test_recipes.py`` checks each recipe against the papers' own code.

DanceGRPO's best-of-N subset (``algorithm.best_of_n_k``) is an option of the family: advantages come from the whole
group, then only each group's k highest and k lowest samples train (:meth:`PolicyGradient.unit_advantages` gives
the others weight 0, the advantages are not renormalised). Subclasses weight each step's surrogate through
:meth:`PolicyGradient.step_weight` (TempFlow-GRPO, Flash-GRPO).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from gen_rl.algorithms.base import Algorithm, LossBatch, Policy
from gen_rl.algorithms.likelihood_tools import weighted_step_loss
from gen_rl.algorithms.options import PolicyGradientOptions
from gen_rl.core.step_selection import sde_window, train_step_indices
from gen_rl.objective import log_probs_in_convention, step_loss, transition_kl


class PolicyGradient(Algorithm):
    """GRPO's clipped surrogate over the Gaussian steps of any stochastic sampler (flow SDEs, CPS, the DDIM SDE)."""

    Options = PolicyGradientOptions
    needs = frozenset({"log_probs", "step_means"})
    options: PolicyGradientOptions

    @property
    def trust_region(self) -> float:
        """The smaller clip epsilon: the ratio check's tolerance is a fraction of it."""
        return min(self.options.clip_low, self.options.clip_high_or_low)

    def log_probs_for_ratio(self, log_probs: Tensor, stds: Tensor) -> Tensor:
        """Log-probs in the configured convention (Flow-GRPO's CPS drops the constants)."""
        return log_probs_in_convention(log_probs, stds, self.options.log_prob_convention)

    def sampling(self, step: int) -> dict[str, Any]:
        """The SDE window of training step ``step`` for the window selections (ODE outside it)."""
        options = self.options
        window = sde_window(
            options.step_selection,
            step,
            self.num_steps,
            window_size=options.window_size,
            window_range=options.window_range,
            stride=options.window_stride,
            every=options.window_every,
            seed=self.seed,
        )
        return {} if window is None else {"sde_window": window}

    @property
    def needs_unit_advantages(self) -> bool:
        """Whether the loss needs the per-unit advantages of :meth:`unit_advantages` (best-of-N)."""
        return self.options.best_of_n_k is not None

    def expect_unit_advantages(self) -> None:
        """Called by ``select``: until :meth:`unit_advantages` runs, a loss that needs it refuses to train."""
        self._units_weighed = not self.needs_unit_advantages

    def check_unit_advantages(self) -> None:
        """One line when the trainer skipped :meth:`unit_advantages` (the loss would silently ignore it)."""
        if not getattr(self, "_units_weighed", True):
            raise RuntimeError(
                f"{type(self).__name__} with these options trains per-unit advantages and weights, but the trainer "
                "never called algorithm.unit_advantages(rollout, group_ids, advantages, units); use a trainer with "
                "the Algorithm.unit_advantages hook (gen_rl/trainer.py update)"
            )

    def select(self, rollout: Any, step: int) -> Tensor:
        """Trained steps ``[B, K]`` among the stochastic ones (``gen_rl/core/step_selection.py``)."""
        self.expect_unit_advantages()
        options = self.options
        return train_step_indices(
            rollout.stochastic,
            options.step_selection,
            fraction=options.step_fraction,
            seed=self.seed,
            step=step,
            trainable=options.trainable_steps,
        ).to(rollout.log_probs.device)

    def loss(self, batch: LossBatch, policy: Policy) -> tuple[Tensor, dict[str, Tensor]]:
        """Clipped surrogate (+ beta KL) of one microbatch at one trained step, in the configured conventions."""
        self.check_unit_advantages()
        part, column, convention = batch.rollout, batch.units, self.options.log_prob_convention
        old_log_probs = part.log_probs.gather(1, column.to(part.log_probs.device))
        out = policy.sampler.log_prob(part, column)
        stds = out.stds.detach()
        kl = (
            self.reference_kl(policy, part, column, out.means[:, 0], stds[:, 0])
            if self.options.kl_coef
            else None
        )
        new = log_probs_in_convention(out.log_probs, stds, convention)
        old = log_probs_in_convention(old_log_probs, stds, convention)
        step_weight = self.step_weight(part, column, policy)
        if step_weight is None:
            return step_loss(self.options, new, old, batch.advantages, batch.weight, kl)
        return weighted_step_loss(
            self.options, new - old.detach(), batch.advantages, batch.weight, step_weight, kl
        )

    def step_weight(self, part: Any, column: Tensor, policy: Policy) -> Tensor | None:
        """A per-sample weight ``[b]`` of the surrogate at ``column`` (TempFlow-GRPO, Flash-GRPO); None: 1."""
        return None

    def unit_advantages(
        self, rollout: Any, group_ids: Tensor, advantages: Tensor, units: Tensor
    ) -> tuple[Tensor, Tensor]:
        """Advantages and weights ``[B, K]``: each sample's advantage at every unit; with ``best_of_n_k`` only each
        group's top and bottom k samples by advantage weigh 1, the others 0 (advantages unchanged)."""
        self._units_weighed = True
        expanded = advantages[:, None].expand(-1, units.shape[1])
        weights = torch.ones(expanded.shape, device=advantages.device)
        if self.options.best_of_n_k is not None:
            chosen = best_of_n_mask(advantages, group_ids, self.options.best_of_n_k)
            weights = weights * chosen[:, None].float()
        return expanded, weights

    def reference_kl(self, policy: Policy, part: Any, column: Tensor, means: Tensor, stds: Tensor) -> Tensor:
        """KL ``[b]`` of the policy's step (``means`` with grad) to the frozen reference's (no grad)."""
        with policy.reference():
            reference = policy.sampler.log_prob(part, column)
        rows = torch.arange(len(part), device=column.device)
        return transition_kl(
            means,
            reference.means[:, 0],
            stds,
            part.sigmas[rows, column[:, 0]],
            part.sigmas[rows, column[:, 0] + 1],
            sde_type=part.sde_type,
            estimator=self.options.kl_estimator,
        )


def best_of_n_mask(advantages: Tensor, group_ids: Tensor, k: int) -> Tensor:
    """``[B]`` bool: the ``k`` highest and ``k`` lowest advantages of every group (DanceGRPO's best-of-N subset:
    advantages come from the whole group, only this subset trains). Ties keep the earlier sample."""
    chosen = torch.zeros(advantages.shape, dtype=torch.bool, device=advantages.device)
    group_ids = group_ids.to(advantages.device)
    for group in torch.unique(group_ids):
        members = torch.nonzero(group_ids == group).flatten()
        if 2 * k > len(members):
            raise ValueError(
                f"best_of_n_k={k} needs at least {2 * k} samples per group; group {int(group)} has {len(members)}"
            )
        order = torch.sort(advantages[members], descending=True, stable=True).indices
        chosen[members[order[:k]]] = True
        chosen[members[order[len(order) - k :]]] = True
    return chosen


class FlowGRPO(PolicyGradient):
    """Flow-GRPO (Liu et al. 2025): over the flow SDE's steps (also CPS, the Fast windows and MixGRPO's)."""


class DanceGRPO(PolicyGradient):
    """DanceGRPO (Xue et al. 2025): the same surrogate over its constant-eta SDE (``sample.sde_type: dance_grpo``),
    a random fraction of steps per sample and the sample std of rewards (``configs/flux/dev_hps_dancegrpo.yaml``)."""
