"""Temporal grounding reward: IoU of the answered ``[start, end]`` (seconds) with the ground-truth segment.

The answer (:func:`rewards.verifiable.format.answer_text`) must commit to exactly one interval: two times,
start before end, written as ``[12.5, 17]``, ``12.5 - 17``, ``from 12.5 to 17 seconds``, ``12.5s-17s`` or
with ``m:ss`` times (``1:05 - 1:10``). Anything else scores 0 -- the commitment rule of
:mod:`rewards.verifiable.commitment`: an answer with fewer or more than two numbers (several intervals, a
list of guesses, digits in other scripts read as extra numbers), a negation ("not 3 - 5") or a hedge
("3 - 5 or 7 - 9", "maybe 3 - 5") earns nothing, which is no more than its worst candidate.

Floor. Only the IoU above a bar pays: the bar is the higher of ``metadata["iou_floor"]`` (default 0.5, the
usual R@0.5 criterion) and, where the video's duration ``D`` is known (``metadata["video_duration"]``, set by the
VLM trainer for every record with a video, or ``metadata["duration"]``), the IoU of answering the whole clip,
``|gt| / D``; the answer is first clipped to ``[0, D]``::

    bar = max(iou_floor, |gt| / D)
    reward = max(0, (IoU - bar) / (1 - bar))         (IoU itself when the segment is the whole clip)

So the spraying answer (the whole clip, or any interval covering it) earns exactly 0, a perfect answer 1, and
an answer of IoU 0.8 earns 0.6. Stated floors (asserted in ``tests/test_verifiable_temporal.py``): the whole
clip earns 0; the best constant (blind) interval earns on average about 0.13 for segments with uniformly drawn
ends and 0.09 for short segments (10-30 % of the clip, uniformly placed), against 0.45 / 0.25 with plain IoU
(the floor of a blind answer depends on the data's segment distribution; these two are the measured cases).

The ground truth is ``[start, end]`` (numbers, or a string in any answer format above, possibly inside
``<answer>`` tags); a ground truth that cannot be read or has ``end <= start`` raises ``ValueError``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

from rewards.verifiable.commitment import ascii_numerals, uncommitted
from rewards.verifiable.format import answer_text, extract_solution

__all__ = ["DEFAULT_IOU_FLOOR", "above_bar", "parse_interval", "interval_iou", "temporal_iou_reward"]

DEFAULT_IOU_FLOOR = 0.5

_CLOCK = re.compile(r"(?<![\d.:])(\d+):([0-5]\d(?:\.\d+)?)(?![\d:])")  # m:ss(.f) -> seconds
_NUMBER = re.compile(r"\d+(?:\.\d+)?|\.\d+")
# characters an interval may contain besides numbers (brackets, separators, unit letters are removed first)
_UNITS = re.compile(
    r"\b(?:seconds?|secs?|s|from|between|to|and|start|end|the|segment|interval|at)\b", re.IGNORECASE
)


def _clock_to_seconds(text: str) -> str:
    return _CLOCK.sub(lambda match: str(int(match.group(1)) * 60 + float(match.group(2))), text)


def parse_interval(text: Any) -> tuple[float, float] | None:
    """The one ``(start, end)`` interval ``text`` commits to, or ``None`` (not exactly two times, start not
    before end, a negation or a hedge). Digits of any script are read, each as its own number."""
    if isinstance(text, Sequence) and not isinstance(text, str):
        values = list(text)
        if len(values) != 2 or not all(
            isinstance(v, int | float) and not isinstance(v, bool) for v in values
        ):
            return None
        start, end = float(values[0]), float(values[1])
        return (start, end) if start < end else None
    answer = ascii_numerals(str(text))
    if uncommitted(_UNITS.sub(" ", answer)):
        return None
    numbers = [float(token) for token in _NUMBER.findall(_clock_to_seconds(answer))]
    if len(numbers) != 2 or not numbers[0] < numbers[1]:
        return None
    return numbers[0], numbers[1]


def interval_iou(first: tuple[float, float], second: tuple[float, float]) -> float:
    """Intersection over union of two intervals ``(start, end)`` with ``start < end``."""
    overlap = max(0.0, min(first[1], second[1]) - max(first[0], second[0]))
    union = (first[1] - first[0]) + (second[1] - second[0]) - overlap
    return overlap / union if union > 0 else 0.0


def _duration(metadata: Mapping[str, Any] | None) -> float | None:
    for key in ("video_duration", "duration"):
        value = (metadata or {}).get(key)
        if isinstance(value, int | float) and not isinstance(value, bool) and value > 0:
            return float(value)
    return None


def _clip(interval: tuple[float, float], duration: float) -> tuple[float, float] | None:
    start, end = max(interval[0], 0.0), min(interval[1], duration)
    return (start, end) if start < end else None


def temporal_iou_reward(completion: str, solution: Any, metadata: Mapping[str, Any] | None = None) -> float:
    """Temporal IoU above the bar, in [0, 1], of the answered interval with ``solution`` (see the module)."""
    gold = parse_interval(extract_solution(solution))
    if gold is None:
        raise ValueError(
            f"temporal grounding solution {solution!r} is not one [start, end] interval with end > start"
        )
    predicted = parse_interval(answer_text(completion, metadata))
    if predicted is None:
        return 0.0
    bar = float((metadata or {}).get("iou_floor", DEFAULT_IOU_FLOOR))
    duration = _duration(metadata)
    if duration is not None:
        gold = _clip(gold, duration)
        if gold is None:
            raise ValueError(
                f"temporal grounding solution {solution!r} lies outside the video (duration {duration} s)"
            )
        predicted = _clip(predicted, duration)
        if predicted is None:
            return 0.0
        whole_clip = (gold[1] - gold[0]) / duration  # the IoU of answering the whole clip
        if whole_clip >= 1.0:
            return interval_iou(predicted, gold)
        bar = max(bar, whole_clip)
    return above_bar(interval_iou(predicted, gold), bar)


def above_bar(iou: float, bar: float) -> float:
    """``max(0, (iou - bar) / (1 - bar))``: the part of the IoU above ``bar``, rescaled to [0, 1]."""
    return max(0.0, (iou - bar) / (1.0 - bar))
