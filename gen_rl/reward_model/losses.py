"""Preference losses on reward scores: Bradley-Terry pairs with ties, Plackett-Luce rankings.

Ties use the **0.5-target convention** (as PickScore's training on Pick-a-Pic does): a pair's label is the
probability that image ``a`` is preferred, 1 (a wins), 0 (b wins) or 0.5 (tie), and the loss is the binary
cross-entropy of the Bradley-Terry probability ``sigmoid(s_a - s_b)`` against it. A tie's loss,
``softplus(d) / 2 + softplus(-d) / 2`` with ``d = s_a - s_b``, is smallest at ``s_a = s_b`` (value ``log 2``), so
ties pull the two scores together without a separate tie parameter (Rao-Kupper's ``theta`` is not used).

Everything is differentiable in the scores and works on any device; no model is imported here.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def preference_probability(score_a: Tensor, score_b: Tensor) -> Tensor:
    """Bradley-Terry ``P(a > b) = sigmoid(s_a - s_b)`` (Bradley & Terry 1952, eq. 1 in logistic form)."""
    return torch.sigmoid(score_a - score_b)


def bradley_terry_loss(score_a: Tensor, score_b: Tensor, label: Tensor) -> Tensor:
    """Mean Bradley-Terry negative log-likelihood with 0.5-target ties.

    ``label`` ``[N]`` is P(a preferred): 1, 0 or 0.5 (a tie). Per pair the loss is
    ``-y log sigmoid(d) - (1 - y) log sigmoid(-d)`` with ``d = s_a - s_b``, written with softplus for stability.
    """
    difference = score_a - score_b
    label = label.to(difference.dtype)
    per_pair = label * F.softplus(-difference) + (1.0 - label) * F.softplus(difference)
    return per_pair.mean()


def plackett_luce_loss(scores: Tensor, mask: Tensor | None = None) -> Tensor:
    """Mean Plackett-Luce negative log-likelihood of ranked lists (Plackett 1975; Luce 1959; ListMLE).

    ``scores`` ``[L, N]`` hold each list's scores in ranked order, best first; ``mask`` ``[L, N]`` (bool) marks
    the real entries of lists shorter than ``N`` (a prefix of each row). Per list
    ``-log P(ranking) = -sum_i [s_i - log sum_{j >= i} exp s_j]`` over its real entries; the mean over lists.
    For two items this is the Bradley-Terry loss of the pair.
    """
    if mask is None:
        mask = torch.ones_like(scores, dtype=torch.bool)
    masked = scores.masked_fill(~mask, float("-inf"))
    # log sum_{j >= i} exp s_j: a cumulative log-sum-exp from the end of each row
    tail_logsumexp = torch.flip(torch.logcumsumexp(torch.flip(masked, dims=[1]), dim=1), dims=[1])
    terms = torch.where(mask, scores - tail_logsumexp, torch.zeros_like(scores))
    return -terms.sum(dim=1).mean()


def pairwise_accuracy(score_a: Tensor, score_b: Tensor, label: Tensor) -> Tensor:
    """Fraction of non-tied pairs whose higher-scored image is the preferred one (a score tie counts half).

    Ties (label 0.5) are left out; NaN when every pair is a tie.
    """
    decided = label != 0.5
    if not bool(decided.any()):
        return torch.tensor(float("nan"))
    difference = (score_a - score_b)[decided]
    a_wins = label[decided] > 0.5
    correct = torch.where(a_wins, difference > 0, difference < 0).float()
    correct = torch.where(difference == 0, torch.full_like(correct, 0.5), correct)
    return correct.mean()
