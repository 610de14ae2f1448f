"""Verifiable rewards for completions and their combination into group-relative advantages.

Reward functions come from ``rewards.verifiable`` (``fn(completion, solution, metadata) -> float`` in [0, 1]),
by registered name or ``package.module:function``. A reward restricted to some tasks gives 0 to records of
other tasks in the combined reward and is left out (NaN) of its own logged mean.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from gen_rl.advantages import AdvantageOutput, combine_rewards

__all__ = [
    "RewardFunction",
    "build_reward_functions",
    "reward_metadata",
    "score_completions",
    "advantages_of",
]


@dataclass
class RewardFunction:
    """A resolved reward: its config name, weight, task filter and callable."""

    name: str
    weight: float
    tasks: tuple[str, ...]
    function: Callable[[str, Any, Mapping[str, Any] | None], float]

    def applies_to(self, task: str) -> bool:
        """Whether records of ``task`` are scored by this reward."""
        return not self.tasks or task in self.tasks


def build_reward_functions(specs: Sequence[Any]) -> list[RewardFunction]:
    """Resolve ``reward.functions`` entries (objects with name / weight / tasks) to callables."""
    from rewards.verifiable import get_verifiable_reward

    return [
        RewardFunction(spec.name, float(spec.weight), tuple(spec.tasks), get_verifiable_reward(spec.name))
        for spec in specs
    ]


def reward_metadata(
    record: Any, original_sizes: Sequence[tuple[int, int]], processed_sizes: Sequence
) -> dict:
    """The record's metadata plus ``task`` and, for the first image, ``original_size`` / ``processed_size``
    ``(height, width)`` where the record does not give them (box rewards convert coordinates with them)."""
    metadata = dict(record.metadata)
    metadata.setdefault("task", record.task)
    if original_sizes:
        metadata.setdefault("original_size", tuple(original_sizes[0]))
    if processed_sizes:
        metadata.setdefault("processed_size", tuple(processed_sizes[0]))
    return metadata


def score_completions(
    functions: Sequence[RewardFunction],
    texts: Sequence[str],
    records: Sequence[Any],
    metadatas: Sequence[Mapping[str, Any]],
) -> dict[str, Tensor]:
    """``{reward name: [N] float64}``; NaN where the reward does not apply to the record's task."""
    scores = {}
    for reward in functions:
        values = []
        for text, record, metadata in zip(texts, records, metadatas, strict=True):
            if reward.applies_to(record.task):
                values.append(float(reward.function(text, record.solution, metadata)))
            else:
                values.append(float("nan"))
        scores[reward.name] = torch.tensor(values, dtype=torch.float64)
    return scores


def advantages_of(
    scores: Mapping[str, Tensor],
    functions: Sequence[RewardFunction],
    group_ids: Tensor,
    *,
    combine: str,
    std_mode: str,
    eps: float,
    clip: float | None,
) -> tuple[Tensor, AdvantageOutput]:
    """``(combined reward [N], advantages)``: not-applicable rewards count 0, then ``combine_rewards``."""
    filled = {name: torch.nan_to_num(values, nan=0.0) for name, values in scores.items()}
    weights = {reward.name: reward.weight for reward in functions}
    total = sum(weights[name] * values for name, values in filled.items())
    output = combine_rewards(filled, weights, group_ids, mode=combine, std_mode=std_mode, eps=eps, clip=clip)
    return total, output
