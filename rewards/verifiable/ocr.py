"""OCR reward: normalised edit similarity (ANLS) between the answer and the ground-truth text."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from rewards.verifiable.format import answer_text, extract_solution

__all__ = ["edit_distance", "normalized_edit_similarity", "ocr_reward", "DEFAULT_ANLS_THRESHOLD"]

DEFAULT_ANLS_THRESHOLD = 0.5


def edit_distance(a: Sequence[Any], b: Sequence[Any]) -> int:
    """Levenshtein distance: fewest single-element insertions, deletions and substitutions turning a into b.

    Works on strings (characters) or any sequences (e.g. word lists). One numpy row per element of ``a``:
    ``row[j] = min(prev[j] + 1, prev[j-1] + cost, row[j-1] + 1)``, the last term resolved by a running
    minimum of ``t[k] - k`` (an insertion chain from k to j costs j - k).
    """
    if len(a) < len(b):
        a, b = b, a
    if len(b) == 0:
        return len(a)
    b_items = list(b)
    offsets = np.arange(len(b) + 1)
    previous = offsets.copy()
    for i, item in enumerate(a, start=1):
        cost = np.fromiter((item != other for other in b_items), dtype=np.int64, count=len(b_items))
        candidate = np.empty_like(previous)
        candidate[0] = i
        candidate[1:] = np.minimum(previous[1:] + 1, previous[:-1] + cost)
        previous = np.minimum.accumulate(candidate - offsets) + offsets
    return int(previous[-1])


def normalized_edit_similarity(a: Sequence[Any], b: Sequence[Any]) -> float:
    """``1 - edit_distance(a, b) / max(|a|, |b|)``; 1.0 for two empty sequences."""
    longest = max(len(a), len(b))
    return 1.0 if longest == 0 else 1.0 - edit_distance(a, b) / longest


def _clean(text: Any, ignore_case: bool) -> str:
    text = " ".join(str(text).split())
    return text.casefold() if ignore_case else text


def ocr_reward(
    completion: str,
    solution: Any,
    metadata: Mapping[str, Any] | None = None,
    *,
    threshold: float | None = None,
    ignore_case: bool | None = None,
) -> float:
    """ANLS (Biten et al., 2019) of the answer: ``s = 1 - NL`` if ``NL < threshold`` else 0, where
    ``NL = edit_distance(answer, gold) / max(|answer|, |gold|)`` over characters.

    Whitespace runs collapse to one space and the ends are stripped; case counts unless ``ignore_case``.
    ``threshold`` defaults to 0.5 (ANLS's tau; 1.0 keeps the plain similarity); both options may also come
    from ``metadata["anls_threshold"]`` / ``metadata["ignore_case"]``. ``solution`` may be a list of
    acceptable transcriptions (the best counts). An empty answer scores 0; an empty gold raises ValueError.
    """
    metadata = metadata or {}
    threshold = float(
        threshold if threshold is not None else metadata.get("anls_threshold", DEFAULT_ANLS_THRESHOLD)
    )
    ignore_case = bool(ignore_case if ignore_case is not None else metadata.get("ignore_case", False))
    golds = solution if isinstance(solution, list | tuple) else [solution]
    golds = [_clean(extract_solution(gold), ignore_case) for gold in golds]
    if not golds or not all(golds):
        raise ValueError(f"OCR solution must be non-empty text, got {solution!r}")
    answer = _clean(answer_text(completion, metadata), ignore_case)
    if not answer:
        return 0.0
    best = 0.0
    for gold in golds:
        similarity = normalized_edit_similarity(answer, gold)
        if 1.0 - similarity < threshold:
            best = max(best, similarity)
    return float(best)
