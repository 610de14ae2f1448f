"""Preference-judgment accuracy, for training a VLM as a reward model (UnifiedReward-Think style).

The policy sees two (or more) candidates -- images, or answers to one question -- reasons in ``<think>``, and
names the better one in ``<answer>`` ("Image 1 is better"). The reward is 1 when the named candidate is the
human-preferred one. Candidates are named by labels: ``metadata["choices"]`` (e.g. ``["A", "B"]``,
``["Image 1", "Image 2"]``), default ``["1", "2"]``; a label matches as a whole token anywhere in the
answer, so "Image 2", "Answer 2" and "2" all name candidate "2".
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

from rewards.verifiable.answers import mentioned_labels
from rewards.verifiable.commitment import uncommitted
from rewards.verifiable.format import answer_text, extract_solution

__all__ = ["preferred_label", "preference_reward", "DEFAULT_PREFERENCE_LABELS"]

DEFAULT_PREFERENCE_LABELS = ("1", "2")
_NOUN = (
    r"(?:the\s+)?(?:first\s+|second\s+)?(?:image|picture|answer|response|video|candidate|option|output)?\s*"
)
_NEGATIVE = re.compile(r"\b(?:worse|worst|inferior|not|isn't|neither)\b", re.IGNORECASE)


def preferred_label(text: str, labels: Sequence[str] = DEFAULT_PREFERENCE_LABELS) -> str | None:
    """The single label ``text`` prefers, or ``None``.

    "than <label>" clauses are dropped first ("Image 1 is better than Image 2" names 1). Answers phrased
    negatively ("2 is worse", "not 1", "neither") are not interpreted -- they read ``None`` -- so a judgment
    cannot be misread as its opposite. Naming no label or several ("1 or 2", "both 1 and 2") reads ``None``.
    """
    for label in labels:
        text = re.sub(rf"\bthan\s+{_NOUN}{re.escape(label)}(?![A-Za-z0-9_])", " ", text, flags=re.IGNORECASE)
    if _NEGATIVE.search(text):
        return None
    found = mentioned_labels(text, labels)
    return found[0] if len(found) == 1 else None


def preference_reward(completion: str, solution: Any, metadata: Mapping[str, Any] | None = None) -> float:
    """1.0 if the answer prefers exactly the ground-truth candidate (:func:`preferred_label`), else 0.

    ``solution``: a label (``"1"``, ``1``, ``"B"``) or a text naming one (``"Image 1 is better"``).
    A negation or hedge ("Image 1 is not better", "probably 2") scores 0 (:mod:`rewards.verifiable.commitment`).
    """
    metadata = metadata or {}
    labels = [str(label) for label in metadata.get("choices") or DEFAULT_PREFERENCE_LABELS]
    gold_text = str(extract_solution(solution)).strip()
    gold = gold_text if gold_text in labels else preferred_label(gold_text, labels)
    if gold is None:
        raise ValueError(f"preference solution names none of the labels {labels}: {solution!r}")
    answer = answer_text(completion, metadata)
    if not answer or uncommitted(answer, labels):  # "not 1", "maybe 2": the commitment rule
        return 0.0
    return 1.0 if preferred_label(answer, labels) == gold else 0.0
