"""The reward-model maths on fixed tensors, each against an independent computation: Bradley-Terry with 0.5-target
ties (torch.distributions and hand-worked numbers), Plackett-Luce (the product of choice probabilities over all
permutations), pairwise accuracy, calibration bins and ECE, and the engagement-to-pairs conversion."""

from __future__ import annotations

import itertools
import math
from pathlib import Path

import pytest
import torch

from gen_rl.reward_model.data import engagement_pairs
from gen_rl.reward_model.evaluation import calibration_bins, expected_calibration_error, pair_metrics
from gen_rl.reward_model.losses import (
    bradley_terry_loss,
    pairwise_accuracy,
    plackett_luce_loss,
    preference_probability,
)
from gen_rl.reward_model.trainer import batch_loss

SCORE_A = torch.tensor([2.0, -1.0, 0.5, 0.3, 1.0])
SCORE_B = torch.tensor([0.0, 1.0, 0.5, -0.7, 3.0])
LABEL = torch.tensor([1.0, 1.0, 0.5, 0.0, 0.5])


def test_bradley_terry_equals_the_bernoulli_likelihood_and_hand_worked_ties():
    decided = LABEL != 0.5
    difference = SCORE_A - SCORE_B
    bernoulli = torch.distributions.Bernoulli(logits=difference[decided])
    expected_decided = -bernoulli.log_prob(LABEL[decided])
    # a tie: half the log-likelihood of each outcome; pair 2 has d = 0 -> log 2, pair 4 has d = -2
    tie_pair_4 = 0.5 * math.log(1 + math.exp(2.0)) + 0.5 * math.log(1 + math.exp(-2.0))
    expected = torch.tensor(
        [expected_decided[0], expected_decided[1], math.log(2.0), expected_decided[2], tie_pair_4]
    )
    assert torch.allclose(bradley_terry_loss(SCORE_A, SCORE_B, LABEL), expected.mean(), atol=1e-6)
    # hand-worked: d = 2, label 1 -> log(1 + e^-2) = 0.126928
    single = bradley_terry_loss(torch.tensor([2.0]), torch.tensor([0.0]), torch.tensor([1.0]))
    assert single.item() == pytest.approx(0.126928, abs=1e-6)
    assert preference_probability(torch.tensor([2.0]), torch.tensor([0.0])).item() == pytest.approx(
        1 / (1 + math.exp(-2)), abs=1e-7
    )


def test_a_tie_pulls_the_two_scores_together():
    """The 0.5-target tie loss is smallest (log 2) when s_a = s_b and grows either way, with zero gradient there."""
    grid = torch.linspace(-3, 3, 61)
    losses = torch.stack([bradley_terry_loss(d[None], torch.zeros(1), torch.tensor([0.5])) for d in grid])
    assert int(losses.argmin()) == 30 and losses.min().item() == pytest.approx(math.log(2), abs=1e-6)
    score = torch.tensor([0.0], requires_grad=True)
    bradley_terry_loss(score, torch.zeros(1), torch.tensor([0.5])).backward()
    assert score.grad.abs().item() < 1e-7


def _plackett_luce_probability(scores: list[float]) -> float:
    """P(ranking) = prod_i exp(s_i) / sum_{j >= i} exp(s_j), written out term by term."""
    probability = 1.0
    for i in range(len(scores)):
        probability *= math.exp(scores[i]) / sum(math.exp(s) for s in scores[i:])
    return probability


def test_plackett_luce_equals_the_product_of_choices_and_sums_to_one_over_rankings():
    items = [0.3, -1.2, 2.0, 0.7]
    total = 0.0
    for order in itertools.permutations(range(4)):
        ranked = torch.tensor([[items[i] for i in order]])
        loss = plackett_luce_loss(ranked)
        expected = _plackett_luce_probability([items[i] for i in order])
        assert math.exp(-loss.item()) == pytest.approx(expected, rel=1e-5)
        total += math.exp(-loss.item())
    assert total == pytest.approx(1.0, abs=1e-5)


def test_plackett_luce_of_two_items_is_bradley_terry_and_padding_is_ignored():
    lists = torch.tensor([[1.5, 0.2, 9.0], [0.1, 0.4, -0.3]])
    mask = torch.tensor([[True, True, False], [True, True, True]])
    first = bradley_terry_loss(torch.tensor([1.5]), torch.tensor([0.2]), torch.tensor([1.0]))
    second = -math.log(_plackett_luce_probability([0.1, 0.4, -0.3]))
    assert plackett_luce_loss(lists, mask).item() == pytest.approx((first.item() + second) / 2, rel=1e-5)


def test_pairwise_accuracy_leaves_ties_out_and_counts_score_ties_half():
    # decided pairs: 0 (a wins, 2 > 0: right), 1 (a wins, -1 < 1: wrong), 3 (b wins, 0.3 > -0.7: wrong)
    assert pairwise_accuracy(SCORE_A, SCORE_B, LABEL).item() == pytest.approx(1 / 3)
    equal = pairwise_accuracy(torch.tensor([1.0, 2.0]), torch.tensor([1.0, 0.0]), torch.tensor([1.0, 0.0]))
    assert equal.item() == pytest.approx(0.25)  # a score tie (half) and a wrong pair
    assert math.isnan(pairwise_accuracy(SCORE_A[:1], SCORE_B[:1], torch.tensor([0.5])).item())


def test_calibration_bins_and_ece_by_hand():
    # predicted P(a > b) = 0.8, 0.8, 0.3 (logits), labels 1, 0, 0; both orientations -> six (p, y):
    # (0.8, 1), (0.8, 0), (0.3, 0), (0.2, 0), (0.2, 1), (0.7, 1); with 2 bins [0, .5) and [.5, 1]:
    # low bin: p 0.3, 0.2, 0.2 (mean 0.2333), y 0, 0, 1 (mean 0.3333); high bin: p 0.8, 0.8, 0.7 (0.7667), y 2/3
    logit = lambda p: math.log(p / (1 - p))  # noqa: E731
    score_a = torch.tensor([logit(0.8), logit(0.8), logit(0.3)])
    label = torch.tensor([1.0, 0.0, 0.0])
    bins = calibration_bins(preference_probability(score_a, torch.zeros(3)), label, 2)
    assert [item.count for item in bins] == [3, 3]
    assert bins[0].mean_predicted == pytest.approx(0.7 / 3, abs=1e-6)
    assert bins[1].mean_observed == pytest.approx(2 / 3)
    expected_ece = 0.5 * abs(0.7 / 3 - 1 / 3) + 0.5 * abs(2.3 / 3 - 2 / 3)
    assert expected_calibration_error(bins) == pytest.approx(expected_ece, abs=1e-6)
    metrics, _ = pair_metrics(score_a, torch.zeros(3), label, ["x", "y", "x"], bins=2)
    assert metrics["eval/accuracy"] == pytest.approx(2 / 3)
    assert metrics["eval/accuracy/x"] == pytest.approx(1.0) and metrics["eval/accuracy/y"] == 0.0


def test_engagement_counts_become_pairs_within_a_context_with_a_clear_gap():
    rows = [
        (1, {"prompt": "p", "image": Path("a"), "engagement": 10.0, "group": "g1"}),
        (2, {"prompt": "p", "image": Path("b"), "engagement": 3.0, "group": "g1"}),  # log1p gap 1.02 vs a
        (3, {"prompt": "p", "image": Path("c"), "engagement": 2.0, "group": "g1"}),  # gap 0.29 vs b: no pair
        (4, {"prompt": "p", "image": Path("d"), "engagement": 100.0, "group": "g2"}),  # alone in g2
    ]
    pairs = engagement_pairs(rows, "f.jsonl", min_log_gap=math.log(2), max_pairs_per_group=0)
    assert [(p.images, p.label, p.line) for p in pairs] == [
        ((Path("a"), Path("c")), 1.0, 1),  # widest gap first: log(11/3) = 1.30
        ((Path("a"), Path("b")), 1.0, 1),  # log(11/4) = 1.01
    ]
    capped = engagement_pairs(rows, "f.jsonl", min_log_gap=math.log(2), max_pairs_per_group=1)
    assert [p.images for p in capped] == [(Path("a"), Path("c"))]


class _FixedScores(torch.nn.Module):
    """A scorer stand-in whose score is the first pixel value (to check how batches become losses)."""

    def forward(self, pixels, prompts):
        return torch.stack([image.flatten()[0] for image in pixels])


def test_a_ranked_batch_is_scored_in_order_and_padded():
    from gen_rl.reward_model.data import Comparison

    values = {Path(f"{i}"): torch.full((3, 2, 2), v) for i, v in enumerate([0.9, 0.1, 0.5, 0.2, 0.7])}
    batch = [
        Comparison("p", (Path("0"), Path("1"), Path("2")), None, None, 1, "f"),
        Comparison("p", (Path("3"), Path("4")), None, None, 2, "f"),
    ]
    loss, accuracy = batch_loss(_FixedScores(), batch, "plackett_luce", lambda path, item=None: values[path])
    first = -math.log(_plackett_luce_probability([0.9, 0.1, 0.5]))
    second = -math.log(_plackett_luce_probability([0.2, 0.7]))
    assert loss.item() == pytest.approx((first + second) / 2, rel=1e-5)
    assert accuracy.item() == pytest.approx(2 / 3)  # 0.9 beats 0.1 and 0.5; 0.2 loses to 0.7
