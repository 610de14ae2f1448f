"""TempFlow-GRPO (He et al. 2025, "TempFlow-GRPO: When Timing Matters for GRPO in Flow Models", arXiv 2508.04324).

- **Trajectory branching**: at training step ``t`` one branch step ``k`` is drawn (from ``(seed, t)``) among
  ``branch_steps``. Every member of a group starts from the group's initial noise (the paper's seed group) and runs
  the ODE up to ``k`` (a prefix the members share), takes one SDE step at ``k`` (the only stochastic decision) and
  runs the ODE to the end. The group's reward spread is then due to step ``k`` alone, and only ``k`` trains: its
  advantage is a process reward for that step, without an intermediate reward model.
- **Noise-aware weighting**: the surrogate of step ``k`` is multiplied by ``n_k / mean_{j in branch_steps} n_j``,
  ``n_j`` the std of step ``j``'s transition (``sigma_j sqrt(dt_j)`` for the flow SDE): steps with more exploration
  noise (early, high noise) weigh more, late refinement steps less, and the weights average 1 over the branch
  points. The paper's code is not public; this follows its text ("the magnitude of stochasticity sigma_t sqrt(dt)").

Through the trainer's rollout hook the group is sampled as a one-split tree (``pipelines/tree.py``: the prefix is
computed once, not once per member); without it the same distribution comes from the rollout overrides
``sde_window = (k, k + 1)`` and ``share_initial_noise = True``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from gen_rl.algorithms.base import Policy
from gen_rl.algorithms.likelihood_tools import step_coefficients
from gen_rl.algorithms.options_likelihood import TempFlowGRPOOptions
from gen_rl.algorithms.policy_gradient import PolicyGradient
from gen_rl.core.seeding import derive_seed
from pipelines.tree import Tree, tree_rollout


class TempFlowGRPO(PolicyGradient):
    """TempFlow-GRPO: one branch step per training step, noise-aware weight (see the module docstring)."""

    Options = TempFlowGRPOOptions
    options: TempFlowGRPOOptions

    def branch_candidates(self) -> list[int]:
        """The steps a training step may branch at (``branch_steps``, else every step inside ``trainable_steps``)."""
        if self.options.branch_steps is not None:
            return list(self.options.branch_steps)
        low, high = self.options.trainable_steps or (0, self.num_steps)
        return list(range(low, high))

    def branch_step(self, step: int) -> int:
        """The branch step of training step ``step``, drawn uniformly from ``(seed, step)``."""
        candidates = self.branch_candidates()
        generator = torch.Generator().manual_seed(derive_seed(self.seed, "tempflow-branch", step))
        return candidates[int(torch.randint(len(candidates), (1,), generator=generator))]

    def sampling(self, step: int) -> dict[str, Any]:
        """ODE except the branch step, every member from the group's initial noise."""
        branch = self.branch_step(step)
        return {"sde_window": (branch, branch + 1), "share_initial_noise": True}

    def rollout(self, sampler: Any, prompts: list[str], options: Any, **kwargs: Any) -> Any:
        """The group as a one-split tree at the branch step (shared prefix computed once)."""
        group_size = kwargs["group_size"]
        if group_size < 2:
            return sampler.rollout(prompts, options, **kwargs)
        tree = Tree((options.sde_window[0],), group_size, ode_between_branches=True)
        return tree_rollout(sampler, prompts, options, tree, **kwargs)

    def step_weight(self, part: Any, column: Tensor, policy: Policy) -> Tensor | None:
        """``n_k / mean_j n_j`` over the branch candidates (``noise_weighting``), else None."""
        if not self.options.noise_weighting:
            return None
        _, stds = step_coefficients(policy.sampler, part)
        candidates = torch.tensor(self.branch_candidates(), device=stds.device)
        weights = stds / stds[candidates].mean()
        return weights[column[:, 0].to(stds.device)]
