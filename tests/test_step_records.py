"""The per-step reward / advantage statistics the generation trainer logs, against hand-worked numbers.

Both trainers log the population std (ddof 0) under ``reward/std`` and ``advantage/std``.
"""

from __future__ import annotations

import math

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
