"""Verifiable rewards for completions and their combination into group-relative advantages.

Reward functions come from ``rewards.verifiable`` (``fn(completion, solution, metadata) -> float`` in [0, 1]),
by registered name or ``package.module:function``. A reward restricted to some tasks gives 0 to records of
other tasks in the combined reward and is left out (NaN) of its own logged mean.

Failures are never a silent 0. A reward that returns NaN / inf or raises follows ``reward.nan_policy``:
``"abort"`` stops with :class:`RewardError` naming the reward, the sample and the value or exception;
``"drop"`` reports it in one line and marks the SAMPLE as unscored (NaN in every reward): it then counts in
no group statistic, gets advantage 0, is masked out of the loss and is counted in ``reward/dropped_samples``. A
sample that no reward applies to is unscored the same way (no reward, no signal).

Image sizes reach the box rewards through the metadata, model-agnostically (see
:mod:`rewards.verifiable.boxes`): ``original_sizes`` (every image file's ``(height, width)``) and
``processed_sizes`` (every image's ``(height, width)`` in the frame the model sees, as the rollout's
``processed_image_sizes`` derives it for any processor that resizes without tiling); a record's own
``original_size`` / ``processed_size`` / ``box_format`` / ``box_image`` win.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from gen_rl.core.advantages import AdvantageOutput, combine_rewards

__all__ = [
    "NAN_POLICIES",
    "RewardError",
    "RewardFunction",
    "build_reward_functions",
    "reward_metadata",
    "score_completions",
    "unscored",
    "advantages_of",
]

NAN_POLICIES = ("drop", "abort")


class RewardError(RuntimeError):
    """A reward returned NaN / inf or raised under ``reward.nan_policy: abort``."""


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


def build_reward_functions(specs: Sequence[Any], *, evaluation: bool = False) -> list[RewardFunction]:
    """Resolve ``reward.terms`` entries (objects with name / weight / tasks) to callables.

    A reward marked ``evaluation_only`` (COCO mAP: appending guesses never lowers it) is refused unless
    ``evaluation`` is set, with its reason as the message.
    """
    from rewards.verifiable import get_verifiable_reward

    functions = []
    for spec in specs:
        function = get_verifiable_reward(spec.name)
        reason = getattr(function, "evaluation_only", None)
        if reason and not evaluation:
            raise ValueError(f"reward {spec.name!r} cannot train: {reason}")
        functions.append(RewardFunction(spec.name, float(spec.weight), tuple(spec.tasks), function))
    return functions


def reward_metadata(
    record: Any, original_sizes: Sequence[tuple[int, int]], processed_sizes: Sequence[tuple[int, int]]
) -> dict:
    """The record's metadata plus ``task`` and every image's ``original_sizes`` / ``processed_sizes``
    ``(height, width)`` where the record does not give them (box rewards convert coordinates with them).

    ``processed_sizes`` is one size per image or empty (the processor's frame is unknown, e.g. tiling); a
    partial list would pair sizes with the wrong images and raises.
    """
    metadata = dict(record.metadata)
    metadata.setdefault("task", record.task)
    if processed_sizes and len(processed_sizes) != len(original_sizes):
        raise ValueError(
            f"{len(processed_sizes)} processed image sizes for {len(original_sizes)} images; give one per image "
            "or none"
        )
    if original_sizes:
        metadata.setdefault("original_sizes", [tuple(size) for size in original_sizes])
    if processed_sizes:
        metadata.setdefault("processed_sizes", [tuple(size) for size in processed_sizes])
    return metadata


def _failure(reward: RewardFunction, index: int, record: Any, what: str) -> str:
    key = getattr(record, "key", None)
    where = f"sample {index}" + (
        f" (record {key!r}, task {record.task!r})" if key else f" (task {record.task!r})"
    )
    return f"reward {reward.name!r} {what} for {where}"


def _score_one(
    reward: RewardFunction, text: str, record: Any, metadata: Mapping[str, Any]
) -> tuple[float, str]:
    """``(score, "")`` or ``(nan, what went wrong)``."""
    try:
        value = float(reward.function(text, record.solution, metadata))
    except Exception as error:  # routed to the NaN policy by the caller, never turned into a score
        return math.nan, f"raised {type(error).__name__}: {error}"
    return (value, "") if math.isfinite(value) else (math.nan, f"returned {value}")


def score_completions(
    functions: Sequence[RewardFunction],
    texts: Sequence[str],
    records: Sequence[Any],
    metadatas: Sequence[Mapping[str, Any]],
    *,
    nan_policy: str = "abort",
    report: Callable[[str], None] = print,
) -> dict[str, Tensor]:
    """``{reward name: [N] float64}``; NaN where the reward does not apply to the record's task.

    A reward that returns NaN / inf or raises follows ``nan_policy`` (module docstring): ``"abort"`` raises
    :class:`RewardError` at the first failure; ``"drop"`` calls ``report`` with one line per failure and
    sets the sample's score to NaN in EVERY reward (see :func:`unscored`).
    """
    if nan_policy not in NAN_POLICIES:
        raise ValueError(f"unknown nan_policy {nan_policy!r}; expected one of {', '.join(NAN_POLICIES)}")
    columns = {reward.name: [math.nan] * len(texts) for reward in functions}
    failed: set[int] = set()
    for index, (text, record, metadata) in enumerate(zip(texts, records, metadatas, strict=True)):
        for reward in functions:
            if not reward.applies_to(record.task):
                continue
            value, what = _score_one(reward, text, record, metadata)
            if what and nan_policy == "abort":
                raise RewardError(
                    _failure(reward, index, record, what) + "; fix the reward or the record, or set "
                    "reward.nan_policy: drop to drop such samples (counted in reward/dropped_samples)"
                )
            if what:
                report(
                    f"gen-rl: {_failure(reward, index, record, what)}; sample dropped (reward.nan_policy: drop)"
                )
                failed.add(index)
            columns[reward.name][index] = value
    for index in failed:
        for values in columns.values():
            values[index] = math.nan
    return {name: torch.tensor(values, dtype=torch.float64) for name, values in columns.items()}


def unscored(scores: Mapping[str, Tensor]) -> Tensor:
    """``[N]`` bool: samples with no score at all (a dropped failure, or no reward applies to them)."""
    return torch.stack([~torch.isfinite(values) for values in scores.values()]).all(dim=0)


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
    """``(combined reward [N], advantages)``: not-applicable rewards count 0, then ``combine_rewards``.

    :func:`unscored` samples get a NaN combined reward: they count in no group statistic and get advantage 0.
    """
    dropped = unscored(scores)
    filled = {
        name: torch.where(dropped, values, torch.nan_to_num(values, nan=0.0))
        for name, values in scores.items()
    }
    weights = {reward.name: reward.weight for reward in functions}
    total = sum(weights[name] * values for name, values in filled.items())
    output = combine_rewards(filled, weights, group_ids, mode=combine, std_mode=std_mode, eps=eps, clip=clip)
    return total, output
