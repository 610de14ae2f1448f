"""Temporal grounding reward: answer formats, IoU and the bar it must clear against independent computations,
the commitment rule (lists, negations, hedges earn nothing), and the stated floors of blind answers."""

from __future__ import annotations

import numpy as np
import pytest

from rewards.verifiable import get_verifiable_reward
from rewards.verifiable.temporal import interval_iou, parse_interval, temporal_iou_reward

DURATION = {"video_duration": 20.0}


def _grid_iou(first, second, step=1e-3) -> float:
    """IoU by counting grid points (independent of the closed form)."""
    points = np.arange(0.0, 200.0, step)
    a = (points >= first[0]) & (points < first[1])
    b = (points >= second[0]) & (points < second[1])
    return float((a & b).sum() / (a | b).sum())


def test_it_is_registered():
    assert get_verifiable_reward("temporal_iou") is temporal_iou_reward


@pytest.mark.parametrize(
    "answer",
    [
        "[3, 8]", "[3.0, 8.0]", "<think>the ball drops</think><answer>3 - 8</answer>", "from 3 to 8 seconds",
        "between 3 and 8", "3s-8s", "0:03 - 0:08", "The segment is 3 to 8 s.", "(3, 8)",
    ],
)  # fmt: skip
def test_committed_intervals_in_any_usual_format_score_one(answer):
    assert temporal_iou_reward(answer, [3, 8], DURATION) == 1.0
    assert temporal_iou_reward(answer, "<answer>[3, 8]</answer>", DURATION) == 1.0


def test_clock_times_are_minutes_and_seconds():
    assert parse_interval("1:05 - 1:10.5") == (65.0, 70.5)


@pytest.mark.parametrize("seed", range(5))
def test_reward_is_the_iou_above_the_bar(seed):
    """bar = max(0.5, IoU of the whole clip) with a duration, 0.5 without; answers clipped to the clip."""
    rng = np.random.default_rng(seed)
    for _ in range(20):
        gold = tuple(sorted(rng.uniform(0, 20, 2).round(2)))
        guess = tuple(sorted(rng.uniform(0, 23, 2).round(2)))
        if gold[1] - gold[0] < 0.1 or guess[1] - guess[0] < 0.1:
            continue
        answer = f"[{guess[0]}, {guess[1]}]"
        clipped = (max(guess[0], 0.0), min(guess[1], 20.0))
        iou = _grid_iou(clipped, gold) if clipped[1] > clipped[0] else 0.0
        bar = max(0.5, (gold[1] - gold[0]) / 20.0)
        expected = max(0.0, (iou - bar) / (1 - bar))
        assert temporal_iou_reward(answer, list(gold), DURATION) == pytest.approx(expected, abs=4e-3)
        # without a duration: the unclipped answer's IoU above 0.5
        plain = _grid_iou(guess, gold)
        assert temporal_iou_reward(answer, list(gold)) == pytest.approx(max(0.0, 2 * plain - 1), abs=4e-3)
        assert interval_iou(guess, gold) == pytest.approx(plain, abs=2e-3)
        # a lower bar set by the record
        low = {**DURATION, "iou_floor": 0.0}
        expected_low = max(0.0, (iou - (gold[1] - gold[0]) / 20.0) / (1 - (gold[1] - gold[0]) / 20.0))
        assert temporal_iou_reward(answer, list(gold), low) == pytest.approx(expected_low, abs=4e-3)


def test_a_close_answer_earns_partial_credit():
    # [4, 9] vs [3, 8]: IoU 4 / 6, bar 0.5 -> (2/3 - 1/2) / (1/2) = 1/3
    assert temporal_iou_reward("[4, 9]", [3, 8], DURATION) == pytest.approx(1 / 3)


@pytest.mark.parametrize(
    ("answer", "why"),
    [
        ("[0, 20]", "the whole clip"),
        ("[-100, 1000]", "an interval covering the clip"),
        ("[3, 8] or [10, 12]", "two intervals"),
        ("[3, 8] [3, 8]", "the same interval twice"),
        ("3, 8, 12", "three times"),
        ("8", "one time"),
        ("[8, 3]", "end before start"),
        ("[5, 5]", "empty interval"),
        ("not [3, 8]", "a negation"),
        ("It is not between 3 and 8", "a negation in words"),
        ("maybe 3 - 8", "a hedge"),
        ("3 - 8 | 9 - 12", "a symbol hedge"),
        ("3 - 8 или 9 - 12", "a hedge in another language"),
        ("3-8 ④", "an extra number in another script"),
        ("[3, 8]?", "a question"),
        ("", "empty"),
        ("[25, 30]", "outside the clip"),
    ],
)
def test_uncommitted_or_spraying_answers_earn_nothing(answer, why):
    assert temporal_iou_reward(answer, [3, 8], DURATION) == 0.0, why


def test_hedging_never_beats_the_worst_candidate():
    """Listing a correct and a wrong interval earns no more than the wrong one alone."""
    good, bad = "[3, 8]", "[12, 15]"
    worst = min(temporal_iou_reward(good, [3, 8], DURATION), temporal_iou_reward(bad, [3, 8], DURATION))
    for joined in (f"{good} or {bad}", f"{good}, {bad}", f"{bad} then {good}"):
        assert temporal_iou_reward(joined, [3, 8], DURATION) <= worst


def _segments(rng, count, short: bool):
    if short:  # 10-30 % of the clip, uniformly placed
        lengths = rng.uniform(0.1, 0.3, count)
        starts = rng.uniform(0.0, 1.0 - lengths)
        return np.stack([starts, starts + lengths], axis=1)
    ends = np.sort(rng.uniform(0.0, 1.0, (count, 2)), axis=1)
    return ends[ends[:, 1] - ends[:, 0] > 0.05]


@pytest.mark.parametrize(("short", "floor", "plain_floor"), [(False, 0.14, 0.44), (True, 0.10, 0.24)])
def test_floor_of_the_best_blind_answer(short, floor, plain_floor):
    """The stated floors: over a grid of constant answers (the same interval whatever the video), the best
    one's mean reward is the floor; the whole clip earns exactly 0. Plain IoU pays blind answers far more."""
    rng = np.random.default_rng(0)
    segments = _segments(rng, 150, short)
    grid = np.linspace(0.0, 1.0, 21)
    best = best_plain = 0.0
    for start in grid:
        for end in grid[grid > start]:
            answer = f"[{start * 20:.2f}, {end * 20:.2f}]"
            rewards = [temporal_iou_reward(answer, list(segment * 20), DURATION) for segment in segments]
            plain = [interval_iou((start * 20, end * 20), tuple(segment * 20)) for segment in segments]
            best, best_plain = max(best, float(np.mean(rewards))), max(best_plain, float(np.mean(plain)))
    assert best <= floor
    assert best_plain >= plain_floor - 0.03  # what the correction removes
    whole = [temporal_iou_reward("[0, 20]", list(segment * 20), DURATION) for segment in segments]
    assert max(whole) == pytest.approx(0.0, abs=1e-12)


def test_unreadable_ground_truth_is_a_data_error():
    with pytest.raises(ValueError, match="not one \\[start, end\\] interval"):
        temporal_iou_reward("[3, 8]", "sometime", DURATION)
    with pytest.raises(ValueError, match="not one \\[start, end\\] interval"):
        temporal_iou_reward("[3, 8]", [8, 3], DURATION)
    with pytest.raises(ValueError, match="outside the video"):
        temporal_iou_reward("[3, 8]", [30, 40], DURATION)
