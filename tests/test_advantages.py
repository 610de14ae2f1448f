"""Tests for gen_rl.core.advantages: hand-worked numbers plus independent (numpy / plain-python) cross-checks."""

from __future__ import annotations

import json
import math
from collections import deque

import numpy as np
import pytest
import torch

from gen_rl.core.advantages import (
    AdvantageOutput,
    PerPromptStatTracker,
    combine_rewards,
    group_advantages,
)


def _t(values) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32)


def _ids(values) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.long)


def _close(actual: torch.Tensor, expected, atol: float = 1e-6) -> None:
    torch.testing.assert_close(actual, torch.tensor(expected, dtype=actual.dtype), atol=atol, rtol=1e-5)


# ----------------------------------------------------------------------------------------------------
# group_advantages: hand-worked numbers per std_mode
# ----------------------------------------------------------------------------------------------------


def test_group_mode_hand_worked():
    # rewards [1,2,3,4], groups [0,0,1,1]: means 1.5 / 3.5, population std 0.5 in both groups
    # -> A = +-0.5 / (0.5 + 1e-4) = +-0.99980004
    out = group_advantages(_t([1, 2, 3, 4]), _ids([0, 0, 1, 1]))
    assert isinstance(out, AdvantageOutput)
    assert out.advantages.dtype == torch.float32
    _close(out.advantages, [-0.99980004, 0.99980004, -0.99980004, 0.99980004])
    assert (out.num_groups, out.num_zero_std_groups, out.num_invalid) == (2, 0, 0)


def test_group_std_is_population_std():
    # group [2,3,4]: mean 3, population std sqrt(2/3) = 0.81649658 (sample std would be 1.0)
    # -> A = [-1, 0, 1] / (0.81649658 + 1e-4) = [-1.22459489, 0, 1.22459489]
    out = group_advantages(_t([2, 3, 4]), _ids([5, 5, 5]))
    _close(out.advantages, [-1.22459489, 0.0, 1.22459489])


def test_global_vs_group_std_hand_worked():
    # rewards [0,2 | 10,30]: group means 1, 20; group stds 1, 10.
    rewards, groups = _t([0, 2, 10, 30]), _ids([0, 0, 1, 1])
    # "group": both groups become +-1/(std+eps) -> +-0.9999 and +-0.99999 (scale information lost)
    group_out = group_advantages(rewards, groups, std_mode="group")
    _close(group_out.advantages, [-1 / 1.0001, 1 / 1.0001, -10 / 10.0001, 10 / 10.0001])
    # "global": batch mean 10.5, deviations -10.5,-8.5,-0.5,19.5 -> squares sum 563, /4 = 140.75,
    # global pop std sqrt(140.75) = 11.86381052; mean is still per group:
    # A = [-1, 1, -10, 10] / (11.86381052 + 1e-4) = [-0.08428924, 0.08428924, -0.84289240, 0.84289240]
    global_out = group_advantages(rewards, groups, std_mode="global")
    _close(global_out.advantages, [-0.08428924, 0.08428924, -0.8428924, 0.8428924])
    # "none" (Dr.GRPO): r - mean_g only
    none_out = group_advantages(rewards, groups, std_mode="none")
    _close(none_out.advantages, [-1.0, 1.0, -10.0, 10.0])


def test_clip_hand_worked():
    # One 1 among 101 rewards (100 zeros), eps=0: mean p = 1/101, pop std sqrt(p(1-p)),
    # A_outlier = (1-p)/sqrt(p(1-p)) = sqrt((1-p)/p) = sqrt(100) = 10; A_zero = -sqrt(p/(1-p)) = -0.1
    rewards = torch.zeros(101)
    rewards[17] = 1.0
    groups = torch.zeros(101, dtype=torch.long)
    unclipped = group_advantages(rewards, groups, eps=0.0)
    assert unclipped.advantages[17].item() == pytest.approx(10.0, rel=1e-5)
    assert unclipped.advantages[0].item() == pytest.approx(-0.1, rel=1e-5)
    clipped = group_advantages(rewards, groups, eps=0.0, clip=5.0)  # DanceGRPO-style clip
    assert clipped.advantages[17].item() == 5.0
    assert clipped.advantages[0].item() == pytest.approx(-0.1, rel=1e-5)
    # clip works in "none" mode too: [0, 10] -> [-5, 5] -> clamp to [-2, 2]
    _close(group_advantages(_t([0, 10]), _ids([0, 0]), std_mode="none", clip=2.0).advantages, [-2.0, 2.0])


def test_zero_std_groups_get_exact_zero_and_are_counted():
    # group 0 = [1,1,1] (zero std), group 1 = [2,3,4] (std sqrt(2/3))
    out = group_advantages(_t([1, 1, 1, 2, 3, 4]), _ids([0, 0, 0, 1, 1, 1]))
    assert out.advantages[:3].tolist() == [0.0, 0.0, 0.0]
    _close(out.advantages[3:], [-1.22459489, 0.0, 1.22459489])
    assert (out.num_groups, out.num_zero_std_groups, out.num_invalid) == (2, 1, 0)


@pytest.mark.parametrize("std_mode", ["group", "global", "none"])
def test_zero_std_is_robust_to_rounding_even_with_eps_zero(std_mode):
    # 0.1 is not representable; the float mean of identical values need not equal them bit-for-bit.
    # With eps=0 a naive (r - mean) / std would give 0/0 = NaN or rounding noise / tiny std = O(1) garbage.
    rewards = torch.full((7,), 0.1, dtype=torch.float32)
    out = group_advantages(rewards, torch.zeros(7, dtype=torch.long), std_mode=std_mode, eps=0.0)
    assert out.advantages.tolist() == [0.0] * 7
    assert out.num_zero_std_groups == 1


def test_nan_rewards_excluded_and_counted():
    # one group [1, NaN, 3, 5]: finite [1,3,5], mean 3, pop std sqrt(8/3) = 1.63299316
    # -> A = [-2/(1.63299316+1e-4), 0, 0, 2/(...)] = [-1.22466988, 0, 0, 1.22466988]
    out = group_advantages(_t([1, float("nan"), 3, 5]), _ids([0, 0, 0, 0]))
    _close(out.advantages, [-1.22466988, 0.0, 0.0, 1.22466988])
    assert (out.num_groups, out.num_zero_std_groups, out.num_invalid) == (1, 0, 1)


def test_nonfinite_edge_cases():
    # group 0: [inf, 2] -> only one finite reward -> zero spread; group 1: [NaN, NaN] -> no finite reward
    # (counted as zero-std, both invalid); group 2: [-inf, 4, 6] -> [0, -1/(1+eps), 1/(1+eps)]
    rewards = _t([float("inf"), 2, float("nan"), float("nan"), float("-inf"), 4, 6])
    out = group_advantages(rewards, _ids([0, 0, 1, 1, 2, 2, 2]))
    _close(out.advantages, [0.0, 0.0, 0.0, 0.0, 0.0, -1 / 1.0001, 1 / 1.0001])
    assert (out.num_groups, out.num_zero_std_groups, out.num_invalid) == (3, 2, 4)
    assert torch.isfinite(out.advantages).all()


def test_all_nan_global_mode_is_finite():
    out = group_advantages(_t([float("nan")] * 3), _ids([0, 1, 1]), std_mode="global")
    assert out.advantages.tolist() == [0.0, 0.0, 0.0]
    assert (out.num_groups, out.num_zero_std_groups, out.num_invalid) == (2, 2, 3)


def test_group_ids_need_not_be_contiguous_or_sorted():
    out = group_advantages(_t([1, 3, 2, 4]), _ids([7, 100, 7, 100]))
    _close(out.advantages, [-0.99980004, -0.99980004, 0.99980004, 0.99980004])
    assert out.num_groups == 2


def test_integer_rewards_and_empty_batch():
    _close(group_advantages(torch.tensor([0, 1]), _ids([0, 0]), eps=0.0).advantages, [-1.0, 1.0])
    empty = group_advantages(torch.zeros(0), torch.zeros(0, dtype=torch.long))
    assert empty.advantages.shape == (0,)
    assert (empty.num_groups, empty.num_zero_std_groups, empty.num_invalid) == (0, 0, 0)


def _numpy_reference(rewards: np.ndarray, groups: np.ndarray, std_mode: str, eps: float, clip):
    """Independent loop implementation using np.mean / np.std (ddof=0)."""
    advantages = np.zeros_like(rewards, dtype=np.float64)
    finite = np.isfinite(rewards)
    global_std = np.std(rewards[finite]) if finite.any() else 0.0
    for group in np.unique(groups):
        members = np.nonzero((groups == group) & finite)[0]
        if members.size == 0:
            continue
        values = rewards[members].astype(np.float64)
        if values.max() == values.min():
            continue
        std = {"group": np.std(values), "global": global_std, "none": None}[std_mode]
        centered = values - np.mean(values)
        advantages[members] = centered if std is None else centered / (std + eps)
    if clip is not None:
        advantages = np.clip(advantages, -clip, clip)
    return advantages


@pytest.mark.parametrize("std_mode", ["group", "global", "none"])
@pytest.mark.parametrize("clip", [None, 1.5])
def test_matches_numpy_reference_on_random_data(std_mode, clip):
    rng = np.random.default_rng(0)
    rewards = rng.normal(size=96).astype(np.float32) * rng.uniform(0.1, 5.0, size=96).astype(np.float32)
    groups = rng.integers(0, 12, size=96)
    rewards[groups == 3] = 0.25  # force a zero-std group
    rewards[rng.choice(96, size=7, replace=False)] = np.nan
    out = group_advantages(torch.from_numpy(rewards), torch.from_numpy(groups), std_mode=std_mode, clip=clip)
    expected = _numpy_reference(rewards, groups, std_mode, 1e-4, clip)
    np.testing.assert_allclose(out.advantages.numpy(), expected, rtol=1e-5, atol=1e-6)
    assert out.num_groups == len(np.unique(groups))
    assert out.num_invalid == 7


def test_within_group_advantages_sum_to_zero():
    rng = np.random.default_rng(1)
    rewards = torch.from_numpy(rng.normal(size=64))
    groups = torch.arange(64) // 8
    out = group_advantages(rewards, groups)
    per_group_sum = torch.zeros(8).index_add_(0, groups, out.advantages)
    torch.testing.assert_close(per_group_sum, torch.zeros(8), atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    ("rewards", "groups", "kwargs", "message"),
    [
        ([1.0, 2.0, 3.0], [0, 0], {}, "mismatched batch/group sizes"),
        ([[1.0, 2.0]], [0], {}, "rewards must be 1-D"),
        ([1.0, 2.0], [[0, 0]], {}, "group_ids must be 1-D"),
        ([1.0, 2.0], [0, 0], {"std_mode": "batch"}, "valid options are \\['group', 'global', 'none'\\]"),
        ([1.0, 2.0], [0, 0], {"eps": -1e-3}, "eps must be >= 0"),
        ([1.0, 2.0], [0, 0], {"clip": 0.0}, "clip must be a positive"),
    ],
)
def test_group_advantages_errors(rewards, groups, kwargs, message):
    with pytest.raises(ValueError, match=message):
        group_advantages(torch.tensor(rewards), torch.tensor(groups), **kwargs)


# ----------------------------------------------------------------------------------------------------
# PerPromptStatTracker (DDPO)
# ----------------------------------------------------------------------------------------------------


def test_tracker_min_count_fallback_then_history_then_eviction():
    tracker = PerPromptStatTracker(buffer_size=4, min_count=3, eps=1e-6)
    # Step 1: histories a=[1,3], b=[1,3] (len 2 < 3) -> whole-batch stats: mean 2, pop std 1
    # -> A = [-1, 1, -1, 1] / (1 + 1e-6)
    adv = tracker.update(["a", "a", "b", "b"], _t([1, 3, 1, 3]))
    _close(adv, [-1 / (1 + 1e-6), 1 / (1 + 1e-6), -1 / (1 + 1e-6), 1 / (1 + 1e-6)])
    # Step 2: history a=[1,3,5,7] (len 4 >= 3) -> its own stats: mean 4, pop std sqrt(5)
    # -> A = [1, 3] / sqrt(5) = [0.44721360, 1.34164079]   (batch stats would have given [-1, 1])
    adv = tracker.update(["a", "a"], _t([5, 7]))
    _close(adv, [0.4472136, 1.34164079])
    # Step 3: buffer_size 4 evicts the oldest reward: a=[3,5,7,9], mean 6, pop std sqrt(5) -> A = 3/sqrt(5)
    # (without eviction: [1,3,5,7,9], mean 5, std sqrt(8) -> 4/sqrt(8) = 1.41421356)
    adv = tracker.update(["a"], _t([9]))
    _close(adv, [1.34164079])
    assert tracker.state_dict()["history"] == {"a": [3.0, 5.0, 7.0, 9.0], "b": [1.0, 3.0]}


def test_tracker_batch_stats_use_whole_batch_not_prompt():
    # a new prompt 'c' with 1 reward next to 'd' with 3: all below min_count -> batch stats of [0, 2, 4, 6]:
    # mean 3, pop std sqrt(5) -> A = [-3, -1, 1, 3] / (sqrt(5) + 1e-6)
    tracker = PerPromptStatTracker(buffer_size=8, min_count=4)
    adv = tracker.update(["c", "d", "d", "d"], _t([0, 2, 4, 6]))
    _close(adv, [-1.34164079, -0.4472136, 0.4472136, 1.34164079])


def test_tracker_nan_not_recorded_and_gets_zero():
    tracker = PerPromptStatTracker(buffer_size=8, min_count=2)
    # finite batch rewards [1, 3]: mean 2, std 1; 'x' history [1] (len 1 < 2) -> batch stats; 'y' has only NaN
    adv = tracker.update(["x", "x", "y", "z"], _t([1, float("nan"), float("nan"), 3]))
    _close(adv, [-1 / (1 + 1e-6), 0.0, 0.0, 1 / (1 + 1e-6)])
    assert tracker.state_dict()["history"] == {"x": [1.0], "z": [3.0]}


def _reference_tracker_step(history: dict, prompts, rewards, buffer_size, min_count, eps):
    """Plain-python re-implementation of DDPO per-prompt stat tracking (no numpy, no torch)."""
    finite = [r for r in rewards if math.isfinite(r)]

    def mean_std(values):
        m = sum(values) / len(values)
        return m, math.sqrt(sum((v - m) ** 2 for v in values) / len(values))

    batch_mean, batch_std = mean_std(finite) if finite else (0.0, 0.0)
    advantages = [0.0] * len(rewards)
    for prompt in dict.fromkeys(prompts):
        idx = [i for i, p in enumerate(prompts) if p == prompt and math.isfinite(rewards[i])]
        if not idx:
            continue
        buf = history.setdefault(prompt, deque(maxlen=buffer_size))
        buf.extend(rewards[i] for i in idx)
        m, s = (batch_mean, batch_std) if len(buf) < min_count else mean_std(list(buf))
        for i in idx:
            advantages[i] = (rewards[i] - m) / (s + eps)
    return advantages


def test_tracker_matches_python_reference_over_many_steps():
    rng = np.random.default_rng(2)
    tracker = PerPromptStatTracker(buffer_size=6, min_count=4, eps=1e-6)
    reference_history: dict = {}
    for _ in range(12):
        prompts = [f"prompt {k}" for k in rng.integers(0, 5, size=10)]
        rewards = rng.normal(loc=2.0, scale=3.0, size=10)
        rewards[rng.random(10) < 0.1] = np.nan
        rewards_list = [float(r) for r in rewards]
        expected = _reference_tracker_step(reference_history, prompts, rewards_list, 6, 4, 1e-6)
        actual = tracker.update(prompts, torch.tensor(rewards_list, dtype=torch.float64))
        np.testing.assert_allclose(actual.numpy(), expected, rtol=1e-5, atol=1e-5)
    assert tracker.state_dict()["history"] == {p: list(h) for p, h in reference_history.items()}


def test_tracker_state_dict_round_trip():
    tracker = PerPromptStatTracker(buffer_size=4, min_count=2, eps=1e-6)
    tracker.update(["a", "b", "a", "b"], torch.tensor([1.0, 2.0, 5.0, 0.5], dtype=torch.float64))
    state = json.loads(json.dumps(tracker.state_dict()))  # plain python: survives a JSON round trip
    restored = PerPromptStatTracker()  # different config: the checkpoint's config wins
    restored.load_state_dict(state)
    assert restored.state_dict() == tracker.state_dict()
    assert len(restored) == 2
    next_rewards = torch.tensor([3.0, 4.0, 7.0], dtype=torch.float64)
    torch.testing.assert_close(
        restored.update(["a", "b", "a"], next_rewards), tracker.update(["a", "b", "a"], next_rewards)
    )


def test_tracker_errors():
    with pytest.raises(ValueError, match="min_count \\(16\\) > buffer_size \\(8\\)"):
        PerPromptStatTracker(buffer_size=8, min_count=16)
    tracker = PerPromptStatTracker()
    with pytest.raises(ValueError, match="mismatched batch/group sizes"):
        tracker.update(["a", "b"], _t([1.0]))
    with pytest.raises(ValueError, match="missing keys"):
        tracker.load_state_dict({"history": {}})


# ----------------------------------------------------------------------------------------------------
# combine_rewards
# ----------------------------------------------------------------------------------------------------


def test_combine_sum_then_normalize_hand_worked():
    # total = 1*a + 0.5*b = [1+2, 2+0, 3+0, 4+0] = [3, 2, 3, 4]; groups [0,0,1,1], eps=0:
    # group 0 [3,2]: mean 2.5 std 0.5 -> [1, -1]; group 1 [3,4] -> [-1, 1]
    out = combine_rewards(
        {"a": _t([1, 2, 3, 4]), "b": _t([4, 0, 0, 0])}, {"a": 1.0, "b": 0.5}, _ids([0, 0, 1, 1]), eps=0.0
    )
    _close(out.advantages, [1.0, -1.0, -1.0, 1.0])
    assert (out.num_groups, out.num_zero_std_groups, out.num_invalid) == (2, 0, 0)


def test_combine_normalize_then_sum_hand_worked():
    # eps=0. A_a: [1,2 | 3,4] -> [-1, 1, -1, 1]; A_b: [4,0 | 0,0] -> group 0 mean 2 std 2 -> [1, -1],
    # group 1 zero-std -> [0, 0]. 1*A_a + 0.5*A_b = [-0.5, 0.5, -1, 1]. Group 1 is zero-std only for b -> 0.
    out = combine_rewards(
        {"a": _t([1, 2, 3, 4]), "b": _t([4, 0, 0, 0])},
        {"a": 1.0, "b": 0.5},
        _ids([0, 0, 1, 1]),
        mode="normalize_then_sum",
        eps=0.0,
    )
    _close(out.advantages, [-0.5, 0.5, -1.0, 1.0])
    assert (out.num_groups, out.num_zero_std_groups, out.num_invalid) == (2, 0, 0)


def test_combine_normalize_then_sum_zero_std_needs_all_rewards():
    # group 0: a=[1,1], b=[5,5] -> zero-std for both -> counted; group 1: a=[2,3] varies -> not counted
    out = combine_rewards(
        {"a": _t([1, 1, 2, 3]), "b": _t([5, 5, 0, 0])},
        {"a": 1.0, "b": 1.0},
        _ids([0, 0, 1, 1]),
        mode="normalize_then_sum",
        eps=0.0,
    )
    _close(out.advantages, [0.0, 0.0, -1.0, 1.0])
    assert out.num_zero_std_groups == 1


@pytest.mark.parametrize("mode", ["sum_then_normalize", "normalize_then_sum"])
def test_combine_invalid_in_any_reward(mode):
    # samples 1 (a is NaN) and 4 (b is NaN) are invalid in both modes and excluded from every statistic.
    # normalize_then_sum, eps=0: group 0 valid {0,2}: a [1,3] -> [-1, 1], b [2,2] -> 0
    #                            group 1 valid {3,5}: a [10,30] -> [-1, 1], b [5,5] -> 0
    # (had sample 4's a=20 been kept, group 1's a-advantages would be -+1.2247).
    # sum_then_normalize: totals [3, NaN, 5 | 15, NaN, 35] -> [-1, 0, 1 | -1, 0, 1]
    nan = float("nan")
    out = combine_rewards(
        {"a": _t([1, nan, 3, 10, 20, 30]), "b": _t([2, 2, 2, 5, nan, 5])},
        {"a": 1.0, "b": 1.0},
        _ids([0, 0, 0, 1, 1, 1]),
        mode=mode,
        eps=0.0,
    )
    _close(out.advantages, [-1.0, 0.0, 1.0, -1.0, 0.0, 1.0])
    assert (out.num_groups, out.num_zero_std_groups, out.num_invalid) == (2, 0, 2)


def test_combine_clip_applies_to_final_advantage():
    # eps=0: each reward gives [-1, 1, -1, 1]; the sum is [-2, 2, -2, 2]; clip=1.5 -> [-1.5, 1.5, -1.5, 1.5]
    rewards = {"a": _t([1, 2, 3, 4]), "b": _t([10, 20, 30, 40])}
    out = combine_rewards(
        rewards, {"a": 1.0, "b": 1.0}, _ids([0, 0, 1, 1]), mode="normalize_then_sum", eps=0.0, clip=1.5
    )
    _close(out.advantages, [-1.5, 1.5, -1.5, 1.5])


def test_combine_single_reward_equals_group_advantages():
    rng = np.random.default_rng(3)
    rewards = torch.from_numpy(rng.normal(size=32))
    groups = torch.arange(32) % 4
    expected = group_advantages(2.0 * rewards, groups, std_mode="none").advantages
    for mode in ("sum_then_normalize", "normalize_then_sum"):
        out = combine_rewards({"r": rewards}, {"r": 2.0}, groups, mode=mode, std_mode="none")
        torch.testing.assert_close(out.advantages, expected)


def test_combine_errors():
    rewards = {"aesthetic": _t([1, 2]), "clip": _t([0, 1])}
    groups = _ids([0, 0])
    with pytest.raises(ValueError, match="reward 'clip' has no weight"):
        combine_rewards(rewards, {"aesthetic": 1.0}, groups)
    with pytest.raises(ValueError, match="unknown reward 'ocr'"):
        combine_rewards(rewards, {"aesthetic": 1.0, "clip": 1.0, "ocr": 1.0}, groups)
    with pytest.raises(ValueError, match="unknown combine mode"):
        combine_rewards(rewards, {"aesthetic": 1.0, "clip": 1.0}, groups, mode="mean")
    with pytest.raises(ValueError, match="unexpected advantage kwargs"):
        combine_rewards(rewards, {"aesthetic": 1.0, "clip": 1.0}, groups, std="group")
    with pytest.raises(ValueError, match="mismatched batch/group sizes"):
        combine_rewards({"a": _t([1, 2, 3])}, {"a": 1.0}, groups)


def test_sample_std_option_matches_torch_std_and_single_member_groups_get_zero():
    rewards = torch.tensor([1.0, 2.0, 4.0, 7.0, 3.0])
    group_ids = torch.tensor([0, 0, 0, 0, 1])
    out = group_advantages(rewards, group_ids, std_mode="group", eps=1e-8, ddof=1)
    first = rewards[:4]
    want = (first - first.mean()) / (first.std() + 1e-8)  # torch.std: unbiased, as DanceGRPO
    torch.testing.assert_close(out.advantages[:4], want)
    assert out.advantages[4] == 0 and out.num_zero_std_groups == 1  # one member: no sample std
    population = group_advantages(rewards, group_ids, std_mode="group", eps=1e-8, ddof=0)
    ratio = out.advantages[:4] / population.advantages[:4]
    torch.testing.assert_close(ratio, torch.full((4,), math.sqrt(3 / 4)))
    global_std = group_advantages(rewards, group_ids, std_mode="global", eps=0.0, ddof=1)
    torch.testing.assert_close(global_std.advantages[:4], (first - first.mean()) / rewards.std())
