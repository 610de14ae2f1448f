"""Tree rollouts (pipelines/tree.py) and BranchGRPO's tree advantages (gen_rl/algorithms/branch_grpo.py).

- the shared prefix is not recomputed: the denoiser sees exactly one row per existing node per step (counted);
- every leaf's path is a real tree path: leaves share their states up to the split that separates them, siblings
  differ after it, and the log-probs recompute exactly from the record (ratio == 1);
- BranchGRPO's per-edge advantages and weights on hand-picked leaf values (mean of children, per-depth sample-std
  normalisation, one owner per shared edge, width and depth pruning) against numbers worked out here;
- a short BranchGRPO run on the colour demo raises the held-out reward (through the trainer's algorithm hooks).
"""

from __future__ import annotations

import math

import pytest
import torch
from trainer_helpers import LEARNING, small_config

from gen_rl.algorithms.base import LossBatch
from gen_rl.algorithms.branch_grpo import BranchGRPO, depth_advantages, width_kept
from gen_rl.algorithms.options_likelihood import BranchGRPOOptions
from gen_rl.core.config import ConfigError
from gen_rl.trainer import GenerationTrainer
from pipelines import FluxSampler, RolloutOptions
from pipelines.tiny import tiny_flux_pipeline
from pipelines.tree import Tree, tree_rollout

PROMPTS = ["a red ball", "a blue cube"]
OPTIONS = RolloutOptions(num_steps=4, height=16, width=16, noise_level=0.7, seed=3)


@pytest.fixture(scope="module")
def sampler() -> FluxSampler:
    return FluxSampler(tiny_flux_pipeline(seed=0, pixel_decoder=True))


def count_denoiser_rows(sampler: FluxSampler) -> tuple[list[int], torch.utils.hooks.RemovableHandle]:
    rows: list[int] = []

    def hook(module, args, kwargs):
        rows.append(int(kwargs["hidden_states"].shape[0]))

    return rows, sampler.denoiser.register_forward_pre_hook(hook, with_kwargs=True)


@pytest.mark.parametrize(
    ("tree", "expected_rows"),
    [
        # split at steps 1 and 2: 1, 1, 2, 4 nodes per prompt at the 4 steps (a flat rollout: 4 at every step)
        (Tree((1, 2), 2), [1, 1, 2, 4]),
        # TempFlow's single branch point: the ODE prefix once per prompt, then 4 children
        (Tree((2,), 4, ode_between_branches=True), [1, 1, 1, 4]),
        (Tree((0,), 4), [1, 4, 4, 4]),
    ],
)
def test_the_shared_prefix_is_computed_once(sampler, tree, expected_rows):
    rows, handle = count_denoiser_rows(sampler)
    try:
        rollout = tree_rollout(
            sampler, PROMPTS, OPTIONS, tree, group_size=tree.leaves, prompt_keys=["p0", "p1"]
        )
    finally:
        handle.remove()
    assert rows == [len(PROMPTS) * count for count in expected_rows]
    assert len(rollout) == len(PROMPTS) * tree.leaves
    assert rollout.members.tolist() == list(range(tree.leaves)) * len(PROMPTS)
    assert rollout.group_ids.tolist() == [0] * tree.leaves + [1] * tree.leaves


def test_leaves_share_exactly_their_common_path(sampler):
    tree = Tree((1, 2), 2)
    rollout = tree_rollout(sampler, PROMPTS, OPTIONS, tree, group_size=4, prompt_keys=["p0", "p1"])
    latents = rollout.latents.float()  # [8, 5, ...]
    for prompt in range(2):
        leaves = latents[prompt * 4 : prompt * 4 + 4]
        # grid points 0..1: one node; 2: two nodes (leaves 0, 1 | 2, 3); 3..4: four nodes
        for point in (0, 1):
            assert torch.equal(leaves[0, point], leaves[3, point])
        assert torch.equal(leaves[0, 2], leaves[1, 2]) and torch.equal(leaves[2, 2], leaves[3, 2])
        assert not torch.equal(leaves[0, 2], leaves[2, 2])
        assert not torch.equal(leaves[0, 3], leaves[1, 3])
    # the two prompts' trees start from different noise
    assert not torch.equal(latents[0, 0], latents[4, 0])
    assert rollout.stochastic.all()


def test_tree_log_probs_recompute_exactly(sampler):
    tree = Tree((0, 2), 2, ode_between_branches=True)
    rollout = tree_rollout(sampler, PROMPTS, OPTIONS, tree, group_size=4, prompt_keys=["p0", "p1"])
    assert rollout.stochastic[0].tolist() == [True, False, True, False]
    recomputed, _ = sampler.recompute_log_probs(rollout)
    stochastic = rollout.stochastic
    assert torch.isfinite(rollout.log_probs[stochastic]).all()
    assert torch.allclose(recomputed[stochastic], rollout.log_probs[stochastic], atol=1e-5, rtol=0)
    assert sampler.check_log_probs(rollout) <= 1e-5


def test_a_tree_needs_as_many_leaves_as_the_group(sampler):
    with pytest.raises(ValueError, match="has 4 leaves, but group_size is 8"):
        tree_rollout(sampler, PROMPTS, OPTIONS, Tree((0, 2), 2), group_size=8)


# ----- BranchGRPO's tree advantages on hand-picked leaf values ---------------------------------------------------
LEAVES = torch.tensor([1.0, 3.0, -2.0, 0.0])  # one tree: split at steps 0 and 2 into 2, 4 denoising steps


def test_depth_advantages_mean_of_children_normalised_per_depth():
    tree = Tree((0, 2), 2)
    # grid points 1 and 2: two nodes, rewards mean(1, 3) = 2 and mean(-2, 0) = -1; mean 0.5, sample std
    # sqrt(2 x 1.5^2 / 1) = 2.1213 -> +-0.7071 for the leaves below each node
    half = 1.5 / math.sqrt(2 * 1.5**2)
    for point in (1, 2):
        expected = torch.tensor([half, half, -half, -half])
        assert torch.allclose(depth_advantages(LEAVES, tree, point), expected, atol=1e-6)
    # grid points 3 and 4: the leaves themselves, mean 0.5, sample std sqrt((0.25 + 6.25 + 6.25 + 0.25) / 3)
    std = math.sqrt(13.0 / 3.0)
    expected = (LEAVES - 0.5) / std
    for point in (3, 4):
        assert torch.allclose(depth_advantages(LEAVES, tree, point), expected, atol=1e-6)
    # before the first split one node: advantage 0; a depth without spread: 0
    assert torch.equal(depth_advantages(LEAVES, tree, 0), torch.zeros(4))
    assert torch.equal(depth_advantages(torch.tensor([2.0, 2.0, 2.0, 2.0]), tree, 3), torch.zeros(4))


def test_width_pruning_keeps_the_best_and_the_worst():
    assert width_kept(LEAVES, 0.5).tolist() == [False, True, True, False]  # best 3.0, worst -2.0
    assert width_kept(LEAVES, 1.0).all()
    assert width_kept(torch.tensor([0.0, 5.0, 1.0, -1.0, 2.0, 3.0, 4.0, -3.0]), 0.5).tolist() == [
        False, True, False, True, False, False, True, True,
    ]  # fmt: skip


def branch_algorithm(**options) -> BranchGRPO:
    defaults = {"name": "branch_grpo", "branch_steps": (0, 2), "branch_factor": 2}
    return BranchGRPO(BranchGRPOOptions(**{**defaults, **options}), seed=0, num_steps=4)


class LeafRecord:
    """What unit_advantages reads of a tree rollout: each row's leaf (``members``) and the batch size."""

    def __init__(self, members: torch.Tensor) -> None:
        self.members = members
        self.log_probs = torch.zeros(len(members), 4)

    def __len__(self) -> int:
        return len(self.members)


def fake_tree_rollout(groups: int):
    # rows of one group may come in any order: members say which leaf each row is
    members = torch.tensor([2, 0, 3, 1] * groups)
    return LeafRecord(members), members


def test_unit_advantages_train_every_surviving_edge_once():
    algorithm = branch_algorithm()
    rollout, members = fake_tree_rollout(groups=2)
    group_ids = torch.tensor([5, 5, 5, 5, 7, 7, 7, 7])
    leaf_values = torch.cat([LEAVES[members[:4]], -LEAVES[members[4:]]])
    units = algorithm.select(rollout, step=0)
    assert units[0].tolist() == [0, 1, 2, 3]  # the split at step 0 makes every edge two-node or more
    advantages, weights = algorithm.unit_advantages(rollout, group_ids, leaf_values, units)
    half = 1.5 / math.sqrt(2 * 1.5**2)
    std = math.sqrt(13.0 / 3.0)
    by_leaf = {  # leaf -> (advantage at steps 0, 1, 2, 3), for the first tree
        leaf: [half if leaf < 2 else -half] * 2 + [float((LEAVES[leaf] - 0.5) / std)] * 2 for leaf in range(4)
    }
    owners = {0: [1, 1, 1, 1], 1: [0, 0, 1, 1], 2: [1, 1, 1, 1], 3: [0, 0, 1, 1]}  # steps 0, 1: leaves 0, 2
    for row in range(4):
        leaf = int(members[row])
        assert torch.allclose(advantages[row], torch.tensor(by_leaf[leaf]), atol=1e-6), (row, leaf)
        assert weights[row].tolist() == owners[leaf]
        # the second tree has the negated values: every advantage flips
        assert torch.allclose(advantages[4 + row], -torch.tensor(by_leaf[leaf]), atol=1e-6)
    assert float(weights.sum()) == 2 * (2 + 2 + 4 + 4)  # 12 edges per tree, each once


def test_width_and_depth_pruning_drop_edges():
    algorithm = branch_algorithm(width_keep=0.5, depth_pruning=(3,))
    rollout, members = fake_tree_rollout(groups=1)
    units = algorithm.select(rollout, step=0)
    assert units[0].tolist() == [0, 1, 3]  # the edges into depth 3 (step 2) are pruned
    _, weights = algorithm.unit_advantages(rollout, torch.zeros(4, dtype=torch.long), LEAVES[members], units)
    # after the last split (step 3) only the best (leaf 1) and worst (leaf 2) leaves' edges train
    step3 = {int(members[row]): float(weights[row, 2]) for row in range(4)}
    assert step3 == {0: 0.0, 1: 1.0, 2: 1.0, 3: 0.0}
    # width pruning starts after the last split: the split edges themselves (step 2) all train
    algorithm = branch_algorithm(width_keep=0.5)
    units = algorithm.select(rollout, step=0)
    _, weights = algorithm.unit_advantages(rollout, torch.zeros(4, dtype=torch.long), LEAVES[members], units)
    assert weights[:, 2].tolist() == [1.0] * 4
    assert {int(members[row]): float(weights[row, 3]) for row in range(4)} == step3


def test_branch_grpo_options_check_the_tree(tmp_path):
    with pytest.raises(ConfigError, match="has branch_factor \\*\\* len\\(branch_steps\\) = 8 leaves"):
        small_config(tmp_path, "algorithm.name=branch_grpo", "sample.group_size=6")
    with pytest.raises(ConfigError, match="branch_steps \\[0, 4\\] must be distinct"):
        small_config(tmp_path, "algorithm.name=branch_grpo", "algorithm.branch_steps=[0,4]")


def test_the_loss_uses_the_unit_advantage_and_weight(sampler):
    """One edge: the loss is Flow-GRPO's surrogate with the edge's advantage and weight (rho = 1 at start)."""
    algorithm = branch_algorithm(clip_low=0.2)
    tree = algorithm.tree
    rollout = tree_rollout(sampler, PROMPTS[:1], OPTIONS, tree, group_size=4, prompt_keys=["p0"])
    units = algorithm.select(rollout, 0)
    advantages, weights = algorithm.unit_advantages(rollout, torch.zeros(4, dtype=torch.long), LEAVES, units)

    class Policy:
        pass

    policy = Policy()
    policy.sampler = sampler
    batch = LossBatch(rollout, units[:, 2:3], advantages[:, 2], weights[:, 2], step=0)
    loss, _ = algorithm.loss(batch, policy)
    assert torch.allclose(loss, -(advantages[:, 2] * weights[:, 2]).mean(), atol=1e-5)


# ----- learning direction ----------------------------------------------------------------------------------------
def test_a_short_branch_grpo_run_raises_the_held_out_reward(tmp_path):
    """10 steps of 4 trees of 8 leaves (splits at 0, 1, 2) with trainer_helpers.LEARNING, as Flow-GRPO's test:
    held-out reward 0.4136 -> 0.4362 measured."""
    config = small_config(tmp_path, *LEARNING, "train.num_steps=10", "algorithm.name=branch_grpo")
    trainer = GenerationTrainer(config)
    before = trainer.evaluate(0)["eval/reward/mean"]
    train_rewards = [trainer.run_step(step)["reward/mean"] for step in range(10)]
    after = trainer.evaluate(10)["eval/reward/mean"]
    print(f"branch_grpo held-out {before:.4f} -> {after:.4f}; train {[round(r, 4) for r in train_rewards]}")
    assert after - before > 0.01, (before, after)


def test_a_trainer_that_skips_unit_advantages_is_refused(sampler):
    """Without the per-edge advantages the loss would train BranchGRPO as plain GRPO: it refuses in one line."""
    algorithm = branch_algorithm()
    rollout = tree_rollout(sampler, PROMPTS[:1], OPTIONS, algorithm.tree, group_size=4, prompt_keys=["p0"])
    units = algorithm.select(rollout, 0)

    class Policy:
        pass

    policy = Policy()
    policy.sampler = sampler
    batch = LossBatch(rollout, units[:, :1], LEAVES, torch.ones(4), step=0)
    with pytest.raises(RuntimeError, match="never called algorithm.unit_advantages"):
        algorithm.loss(batch, policy)
