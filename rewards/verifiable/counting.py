"""Counting reward: the answer must state exactly one number, equal to the ground-truth count."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from rewards.verifiable.answers import normalize_text, single_number
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

    Numbers are read as :func:`rewards.verifiable.answers.parse_numbers` does (digits, "1,234", number words
    when there are no digits); several distinct numbers ("3 or 4", "1 2 3 4 5") score 0, the same number
    repeated does not. "none" / "no" / "nothing" as the whole answer reads 0. ``solution``: an integer, a
    text stating one, or a list of the counted objects (its length is the count).
    """
    gold = _gold_count(solution)
    answer = answer_text(completion, metadata)
    if not answer:
        return 0.0
    value = single_number(answer)
    if value is None and normalize_text(answer) in _ZERO_WORDS:
        value = 0.0
    return 1.0 if value is not None and value == gold else 0.0
