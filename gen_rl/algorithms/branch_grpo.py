"""BranchGRPO (Li et al. 2025, "BranchGRPO: Stable and Efficient GRPO with Structured Branching in Diffusion
Models", arXiv 2509.06040; reference code Fredreic1849/BranchGRPO ``fastvideo/train_branchgrpo_flux.py``).

- **Branch sampling**: each prompt's group is a tree (``pipelines/tree.py``): one root noise, every node splits
  into ``branch_factor`` children at ``branch_steps``, shared prefixes computed once. The leaves are the group.
- **Tree advantages**: a leaf's reward is its score; an inner node's reward is the mean of its children's (= the
  mean of its leaves, the trees being balanced). At each depth (the grid point a node sits at) the nodes of a tree
  are normalised together, ``(R - mean) / (std + 1e-8)`` with the sample std, and 0 when the std is below 1e-6 or
  the depth has one node. The edge into a node trains with that node's advantage.
- **Pruning**: edges into the depths ``depth_pruning`` never train; with ``width_keep < 1``, after the last split
  only the edges on the paths of the best and the worst ``width_keep`` fraction of a tree's leaves train (the
  reference's width-pruning mode 2, per tree).

Only non-pruned stochastic edges train, each exactly once: a shared edge is trained by the first leaf below it
(:meth:`pipelines.tree.Tree.owns_edge`), the other leaves' copies weigh 0. Edges before the first split sit at a
depth with one node, whose advantage is 0, so they are not selected at all.

Leaf rewards enter as the trainer's group advantages (the group's rewards standardised); every node reward is the
same positive-affine map of the raw node reward, so the per-depth normalisation gives the reference's values (up
to its epsilons). The trainer calls :meth:`BranchGRPO.rollout` and :meth:`BranchGRPO.unit_advantages` through the
two hooks of ``/work/helpers/requests/lr_algos.md``.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from gen_rl.algorithms.options_likelihood import BranchGRPOOptions
from gen_rl.algorithms.policy_gradient import PolicyGradient
from pipelines.tree import Tree, tree_rollout

STD_FLOOR = 1e-6  # the reference: a depth whose node rewards spread less than this gets advantage 0
STD_EPS = 1e-8


def depth_advantages(leaf_values: Tensor, tree: Tree, grid_point: int) -> Tensor:
    """Advantage ``[leaves]`` of the node at ``grid_point`` above each leaf, from the leaves' values ``[leaves]``:
    node value = mean of its leaves, normalised over the tree's nodes at that depth (BranchGRPO Sec. 3.2)."""
    nodes = tree.factor ** tree.splits_before(grid_point)
    node_values = leaf_values.float().reshape(nodes, -1).mean(dim=1)
    if nodes == 1:
        normalised = torch.zeros_like(node_values)
    else:
        std = node_values.std(correction=1)
        normalised = (node_values - node_values.mean()) / (std + STD_EPS)
        if float(std) < STD_FLOOR:
            normalised = torch.zeros_like(node_values)
    leaves = torch.arange(len(leaf_values), device=leaf_values.device)
    return normalised[tree.node_of(leaves, grid_point)]


def width_kept(leaf_values: Tensor, keep: float) -> Tensor:
    """``[leaves]`` bool: the best and the worst leaves, ``max(2, floor(keep x leaves))`` of them in all (half each,
    the extra one among the worst), as the reference's width pruning mode 2; all when ``keep`` is 1."""
    count = len(leaf_values)
    if keep >= 1.0:
        return torch.ones(count, dtype=torch.bool, device=leaf_values.device)
    kept = max(2, math.floor(count * keep))
    best = kept // 2
    order = torch.sort(leaf_values, descending=True, stable=True).indices
    chosen = torch.zeros(count, dtype=torch.bool, device=leaf_values.device)
    chosen[order[:best]] = True
    chosen[order[count - (kept - best) :]] = True
    return chosen


class BranchGRPO(PolicyGradient):
    """BranchGRPO: tree rollouts, tree advantages per depth, pruning (see the module docstring)."""

    Options = BranchGRPOOptions
    options: BranchGRPOOptions

    @property
    def tree(self) -> Tree:
        """The tree every prompt's group grows."""
        options = self.options
        return Tree(tuple(options.branch_steps), options.branch_factor, options.ode_between_branches)

    def sampling(self, step: int) -> dict[str, Any]:
        """No SDE window: the tree decides which steps are stochastic."""
        return {}

    def rollout(self, sampler: Any, prompts: list[str], options: Any, **kwargs: Any) -> Any:
        """One tree per prompt (``pipelines.tree.tree_rollout``): its leaves are the group."""
        return tree_rollout(sampler, prompts, options, self.tree, **kwargs)

    def trained_steps(self) -> list[int]:
        """Steps whose edges may train: stochastic, after the first split (inclusive), depth not pruned."""
        tree, pruned = self.tree, set(self.options.depth_pruning)
        return [
            step
            for step in range(self.num_steps)
            if tree.stochastic(step) and tree.splits_before(step + 1) >= 1 and step + 1 not in pruned
        ]

    @property
    def needs_unit_advantages(self) -> bool:
        """Always: each edge's advantage and weight come from :meth:`unit_advantages`."""
        return True

    def select(self, rollout: Any, step: int) -> Tensor:
        """Every trainable edge step ``[B, K]`` (the same for every leaf; :meth:`unit_advantages` weighs them)."""
        self.expect_unit_advantages()
        steps = self.trained_steps()
        if not steps:
            raise ValueError("branch_grpo: every edge after the first split is pruned; shrink depth_pruning")
        return torch.tensor(steps, device=rollout.log_probs.device).expand(len(rollout), -1)

    def unit_advantages(
        self, rollout: Any, group_ids: Tensor, advantages: Tensor, units: Tensor
    ) -> tuple[Tensor, Tensor]:
        """Per-edge advantages and weights ``[B, K]`` from the leaves' advantages ``[B]`` (one tree per group).

        Weight 1 where the row owns the edge of that step and the edge survives width pruning, else 0."""
        self._units_weighed = True
        tree, leaves = self.tree, self.tree.leaves
        device = advantages.device
        members = rollout.members.to(device)
        group_ids = group_ids.to(device)
        unit_advantages = torch.zeros(units.shape, device=device)
        weights = torch.zeros(units.shape, device=device)
        last_split = tree.branch_steps[-1]
        for group in torch.unique(group_ids):
            rows = torch.nonzero(group_ids == group).flatten()
            if len(rows) != leaves:
                raise ValueError(f"branch_grpo: group {int(group)} has {len(rows)} leaves, the tree {leaves}")
            rows = rows[torch.argsort(members[rows])]  # leaf order
            leaf_values = advantages[rows].float()
            kept = width_kept(leaf_values, self.options.width_keep)
            leaf_index = torch.arange(leaves, device=device)
            for column in range(units.shape[1]):
                step = int(units[rows[0], column])
                unit_advantages[rows, column] = depth_advantages(leaf_values, tree, step + 1)
                owns = tree.owns_edge(leaf_index, step)
                if step > last_split:
                    owns = owns & kept
                weights[rows, column] = owns.float()
        return unit_advantages, weights
