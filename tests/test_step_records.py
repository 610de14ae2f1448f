"""The per-step reward / advantage statistics the generation trainer logs, against hand-worked numbers.

Both trainers log the population std (ddof 0) under ``reward/std`` and ``advantage/std``.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from gen_rl.core.advantages import AdvantageOutput
from gen_rl.trainer import _even_shard, _reward_stats


def test_reward_statistics_by_hand():
    rewards = {"a": torch.tensor([1.0, 3.0, float("nan"), 5.0]), "b": torch.tensor([0.0, 1.0, 2.0, 1.0])}
    weights = {"a": 1.0, "b": 2.0}
    valid = torch.tensor([True, True, False, True])
    advantages = torch.tensor([-1.0, 0.0, 0.0, 1.0])
    output = AdvantageOutput(advantages, 2, 1, 1)
    stats = _reward_stats(rewards, weights, output, valid, num_groups=2)
    combined = [1.0, 5.0, 7.0]  # a + 2 b of the kept samples
    mean = sum(combined) / 3
    assert stats["reward/mean"] == pytest.approx(mean)
    assert stats["reward/std"] == pytest.approx(math.sqrt(sum((c - mean) ** 2 for c in combined) / 3))
    assert stats["reward/a/mean"] == pytest.approx(3.0)
    assert stats["reward/a/std"] == pytest.approx(math.sqrt(8 / 3))
    assert stats["reward/a/nan"] == 1 and stats["reward/b/nan"] == 0
    assert stats["reward/dropped_samples"] == 1
    assert stats["advantage/mean"] == 0.0
    assert stats["advantage/std"] == pytest.approx(math.sqrt(0.5))
    assert stats["advantage/abs_mean"] == pytest.approx(0.5)
    assert stats["advantage/zero_std_group_fraction"] == pytest.approx(0.5)


@pytest.mark.parametrize(("count", "world"), [(3, 2), (4, 2), (1, 2), (5, 3), (6, 4)])
def test_even_eval_shards_cover_every_prompt_with_equal_sizes(count, world):
    shards = [_even_shard(count, rank, world) for rank in range(world)]
    assert len({len(shard) for shard in shards}) == 1  # every process runs the same number of forwards
    assert sorted({index for shard in shards for index in shard}) == list(range(count))
    assert all(0 <= index < count for shard in shards for index in shard)


def test_update_statistics_are_means_over_calls_except_maxima():
    """``reduce_stats`` sums each call's statistic on the device (max for ``*_max``); ``finish_stats`` divides the
    sums by the number of calls and leaves the maxima: hand-worked over three calls."""
    from gen_rl.algorithms.base import finish_stats, reduce_stats

    totals: dict = {}
    calls = [
        {"loss/total": torch.tensor(1.0), "policy/ratio_dev_max": torch.tensor(0.5)},
        {"loss/total": torch.tensor(3.0), "policy/ratio_dev_max": torch.tensor(2.0)},
        {"loss/total": torch.tensor(-1.0), "policy/ratio_dev_max": torch.tensor(1.0)},
    ]
    for stats in calls:
        reduce_stats(totals, stats)
    assert finish_stats(totals, len(calls)) == {"loss/total": pytest.approx(1.0), "policy/ratio_dev_max": 2.0}
    assert finish_stats({}, 0) == {}


def test_eval_record_counts_a_padded_prompt_once_and_orders_the_grid_by_prompt(tmp_path):
    """Two processes evaluate 3 prompts x 2 samples: rank 0 holds prompts [0, 2], rank 1 [1, 1] (padded). The mean
    weights every prompt once (a repeat is dropped), gold rewards stay apart, and the grid rows follow the prompts."""
    from types import SimpleNamespace

    from PIL import Image

    from gen_rl.core.grids import labelled_grid
    from gen_rl.trainer import GenerationTrainer

    trainer = SimpleNamespace(
        config=SimpleNamespace(
            eval=SimpleNamespace(samples_per_prompt=2), log=SimpleNamespace(tracker="none")
        ),
        reward_weights={"colour": 2.0},
        monitor=None,
        output_dir=tmp_path,
        eval_set=SimpleNamespace(prompts=["prompt zero", "prompt one", "prompt two"]),
    )
    pixels = {
        index: torch.full((2, 3, 4, 4), index / 4) for index in range(3)
    }  # prompt i is grey level i / 4
    scores = {index: [float(index), float(index) + 1.0] for index in range(3)}
    gathered = [
        ([0, 2], {"colour": scores[0] + scores[2], "gold/x": [1.0] * 4}, torch.cat([pixels[0], pixels[2]])),
        ([1, 1], {"colour": scores[1] + scores[1], "gold/x": [3.0] * 4}, torch.cat([pixels[1], pixels[1]])),
    ]
    record = GenerationTrainer._eval_record(trainer, 5, gathered)
    assert record["eval/reward/colour"] == pytest.approx((0 + 1 + 1 + 2 + 2 + 3) / 6)
    assert record["eval/reward/mean"] == pytest.approx(2.0 * 1.5)
    assert record["eval/gold/x"] == pytest.approx((1 + 1 + 1 + 1 + 3 + 3) / 6)
    # the grid: prompts 0, 1, 2 top to bottom, each row labelled with its prompt, each sample with its reward
    grid = np.asarray(Image.open(tmp_path / "eval" / "step-000005.png"))
    ordered = torch.cat([pixels[0], pixels[1], pixels[2]])
    labels = [f"reward {2.0 * value:.3f}" for index in range(3) for value in scores[index]]
    expected = labelled_grid(ordered, ["prompt zero", "prompt one", "prompt two"], labels)
    assert np.array_equal(grid, np.asarray(expected))


def test_whole_groups_first_makes_each_group_adjacent_in_first_seen_order():
    from gen_rl.trainer import whole_groups_first

    group_ids = torch.tensor([7, 7, 7, 3, 3, 3, 5, 5, 5])  # three groups of three, as the trainer lays them out
    order = torch.tensor([4, 0, 8, 1, 3, 6, 2, 5, 7])  # a random permutation of the samples
    reordered = whole_groups_first(group_ids, order)
    assert reordered.tolist() == [4, 3, 5, 0, 1, 2, 8, 6, 7]  # group 3 seen first, then 7, then 5; stable within
    assert sorted(reordered.tolist()) == list(range(9))
    for chunk in reordered.split(3):  # microbatches of group_size hold one whole group each
        assert len(set(group_ids[chunk].tolist())) == 1
