"""Counting reward: the answer must commit to exactly one number, equal to the ground-truth count.

It follows the commitment rule of :mod:`rewards.verifiable.commitment`: listing ("3 or 4", "3or4", "3 or ④"),
negating ("not 3") or hedging ("3+", "at least 3") scores 0, no more than the worst candidate.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from rewards.verifiable.answers import committed_number, normalize_text, single_number
from rewards.verifiable.format import answer_text, extract_solution

__all__ = ["counting_reward"]

_ZERO_WORDS = {"none", "no", "nothing", "no objects", "there are none", "there is none"}


def _gold_count(solution: Any) -> int:
    solution = extract_solution(solution)
    if isinstance(solution, list | tuple):
        return len(solution)  # a list of the counted objects (their boxes, say)
    value = single_number(solution)
    if value is None or value < 0 or value != int(value):
        raise ValueError(f"counting solution must be one non-negative integer, got {solution!r}")
    return int(value)


def counting_reward(completion: str, solution: Any, metadata: Mapping[str, Any] | None = None) -> float:
    """1.0 if the answer states exactly one number and it equals the count, else 0.

    Numbers are read as :func:`rewards.verifiable.answers.parse_numbers` does (digits of any script, Unicode
    numerals, number words, "1,234"); several distinct numbers ("3 or 4", "3or4", "1 2 3 4 5"), a negation
    ("not 3") or a hedge ("3+") score 0, the same number repeated does not. "none" / "no" / "nothing" as
    the whole answer reads 0. ``solution``: an integer, a
    text stating one, or a list of the counted objects (its length is the count).
    """
    gold = _gold_count(solution)
    answer = answer_text(completion, metadata)
    if not answer:
        return 0.0
    value = 0.0 if normalize_text(answer) in _ZERO_WORDS else committed_number(answer)
    return 1.0 if value is not None and value == gold else 0.0
