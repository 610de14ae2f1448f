"""Pref-GRPO's pairwise in-group win rate (Wang et al. 2025); registered ``pairwise_win_rate``.

A pairwise judge compares every pair ``(i, j)`` of samples of one group (all pairs of all groups in one
batched call) and gives ``p_ij = P(i is better than j)``. The pair's outcome for ``i`` is

    w_ij = 1 if p_ij > 1/2 + tie_margin,   0 if p_ij < 1/2 - tie_margin,   1/2 otherwise (a tie)

(``outcome="soft"``: ``w_ij = p_ij``), ``w_ji = 1 - w_ij``, and a sample's reward is its win rate

    r_i = 1 / (G - 1) * sum_{j != i} w_ij,

``G`` its group's size (a group of one gets 1/2: nothing to compare). Judges:

- ``judge="vlm"``: a transformers image-text-to-text model shown both images, asked which matches the prompt
  better; ``p_ij = P(first) / (P(first) + P(second))`` from the answer logits; ``both_orders`` (default) asks
  again with the images swapped and averages ``p_ij`` with ``1 - p_ji`` (cancels the judge's position bias).
- ``judge="reward"``: a pointwise reward (any registered name): ``p_ij = 1, 1/2, 0`` as ``r_i - r_j`` is above
  ``reward_margin``, within it, or below ``-reward_margin``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

import torch
from torch import Tensor

from rewards.base import Reward, RewardOutput, build_inner_reward, register_reward
from rewards.vlm_judge import JudgeModel, format_question

DEFAULT_PAIR_QUESTION = (
    "Which image better matches {prompt}, the first or the second? Answer first or second."
)
JUDGES = ("vlm", "reward")
OUTCOMES = ("hard", "soft")


def group_pairs(group_ids: Tensor) -> tuple[Tensor, Tensor]:
    """Row indices ``(i, j)`` of every pair ``i < j`` within a group, ``[P]`` each, in row order."""
    same = group_ids[:, None] == group_ids[None, :]
    upper = torch.triu(torch.ones_like(same, dtype=torch.bool), diagonal=1)
    first, second = torch.nonzero(same & upper, as_tuple=True)
    return first, second


def pair_outcomes(preference: Tensor, tie_margin: float, outcome: str) -> Tensor:
    """``w_ij`` ``[P]`` from ``p_ij`` ``[P]``: 1 / 0 / 1/2 around 1/2 +- ``tie_margin``, or ``p_ij`` (soft)."""
    if outcome == "soft":
        return preference.float()
    wins = (preference > 0.5 + tie_margin).float()
    losses = (preference < 0.5 - tie_margin).float()
    return wins + 0.5 * (1.0 - wins - losses)


def win_rates(first: Tensor, second: Tensor, outcomes: Tensor, group_ids: Tensor) -> Tensor:
    """``r_i = sum_{j != i} w_ij / (G_i - 1)`` ``[B]`` (1/2 for a group of one)."""
    batch = group_ids.shape[0]
    wins = torch.zeros(batch, dtype=torch.float64)
    wins.index_add_(0, first.cpu(), outcomes.double().cpu())
    wins.index_add_(0, second.cpu(), 1.0 - outcomes.double().cpu())
    sizes = (group_ids[:, None] == group_ids[None, :]).sum(dim=1).cpu().double()
    rates = wins / (sizes - 1).clamp_min(1)
    return torch.where(sizes > 1, rates, torch.full_like(rates, 0.5)).float()


class VLMPairwiseJudge:
    """``P(first better)`` from a VLM shown two images: ``P(first) / (P(first) + P(second))`` of its answer."""

    def __init__(
        self,
        judge: JudgeModel,
        question: str = DEFAULT_PAIR_QUESTION,
        first_words: Sequence[str] = ("first", "First"),
        second_words: Sequence[str] = ("second", "Second"),
        both_orders: bool = True,
    ) -> None:
        self.judge, self.question, self.both_orders = judge, question, both_orders
        self.first_ids = [judge.token_id(word) for word in first_words]
        self.second_ids = [judge.token_id(word) for word in second_words]

    def first_probability(self, left: list[Tensor], right: list[Tensor], questions: list[str]) -> Tensor:
        """``P(first)`` ``[P]`` renormalised over the first / second answer words (one batched pass)."""
        logits = self.judge.next_token_logits([[a, b] for a, b in zip(left, right, strict=True)], questions)
        answers = logits[:, [*self.first_ids, *self.second_ids]].softmax(dim=-1)
        return answers[:, : len(self.first_ids)].sum(dim=-1)

    def prefer(
        self, pixels: Tensor, first: Tensor, second: Tensor, prompts: list[str], metadata: list[dict]
    ) -> Tensor:
        """``p_ij`` ``[P]`` for the pairs ``(first[k], second[k])`` of rows of ``pixels``."""
        questions = [format_question(self.question, prompts[int(i)], metadata[int(i)]) for i in first]
        left, right = [pixels[int(i)] for i in first], [pixels[int(j)] for j in second]
        if not self.both_orders:
            return self.first_probability(left, right, questions)
        both = self.first_probability(left + right, right + left, questions + questions)
        count = len(questions)
        return 0.5 * (both[:count] + 1.0 - both[count:])


class RewardPairwiseJudge:
    """``p_ij = 1, 1/2, 0`` as a pointwise reward's ``r_i - r_j`` is above, within, below +-``margin``."""

    def __init__(self, reward: Reward, margin: float = 0.0) -> None:
        self.reward, self.margin = reward, float(margin)

    def prefer(
        self, pixels: Tensor, first: Tensor, second: Tensor, prompts: list[str], metadata: list[dict]
    ) -> Tensor:
        scores = self.reward(pixels, prompts, metadata).scores.double()
        difference = scores[first.cpu()] - scores[second.cpu()]
        return (
            (difference > self.margin).double() + 0.5 * (difference.abs() <= self.margin).double()
        ).float()


@register_reward("pairwise_win_rate", "pref_grpo")
class PairwiseWinRate(Reward):
    """Pref-GRPO: each sample's win rate against the other samples of its group, ties counting half."""

    weight_sources: ClassVar[dict[str, str]] = {"model": "config.json"}

    def __init__(
        self,
        judge: str = "vlm",
        model: str | None = None,
        processor: str | None = None,
        question: str = DEFAULT_PAIR_QUESTION,
        first_words: Sequence[str] = ("first", "First"),
        second_words: Sequence[str] = ("second", "Second"),
        both_orders: bool = True,
        reward: str | Reward | None = None,
        reward_kwargs: dict[str, Any] | None = None,
        reward_margin: float = 0.0,
        tie_margin: float = 0.0,
        outcome: str = "hard",
        device: str | None = None,
        dtype: str = "float32",
        batch_size: int = 8,
    ) -> None:
        if judge not in JUDGES:
            raise ValueError(f"pairwise_win_rate: judge must be one of {JUDGES}; got {judge!r}")
        if outcome not in OUTCOMES:
            raise ValueError(f"pairwise_win_rate: outcome must be one of {OUTCOMES}; got {outcome!r}")
        if not 0.0 <= float(tie_margin) < 0.5:
            raise ValueError(f"pairwise_win_rate: tie_margin must be in [0, 0.5); got {tie_margin!r}")
        self.tie_margin, self.outcome = float(tie_margin), outcome
        self.judge: VLMPairwiseJudge | RewardPairwiseJudge
        if judge == "vlm":
            if not model:
                raise ValueError("pairwise_win_rate with judge='vlm' needs model: a VLM folder or hub id")
            judge_model = JudgeModel(model, processor, device, dtype, batch_size)
            self.judge = VLMPairwiseJudge(judge_model, question, first_words, second_words, both_orders)
        else:
            if not reward:
                raise ValueError(
                    "pairwise_win_rate with judge='reward' needs reward: a pointwise reward name"
                )
            inner = build_inner_reward(reward, reward_kwargs, "pairwise_win_rate")
            self.judge = RewardPairwiseJudge(inner, reward_margin)

    def score(
        self, pixels: Tensor, prompts: list[str], metadata: list[dict], group_ids: Tensor
    ) -> RewardOutput:
        """``r_i``: the mean outcome of sample ``i`` over its ``G - 1`` in-group comparisons."""
        first, second = group_pairs(group_ids)
        if first.numel():
            preference = self.judge.prefer(pixels, first, second, prompts, metadata)
            outcomes = pair_outcomes(preference.cpu(), self.tie_margin, self.outcome)
        else:
            outcomes = torch.zeros(0)
        return RewardOutput(scores=win_rates(first, second, outcomes, group_ids))
