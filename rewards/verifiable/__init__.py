"""Verifiable (rule-checkable) rewards for R1-style VLM training.

Every reward is a plain function ``reward(completion, solution, metadata) -> float`` in [0, 1]:

* ``completion``: the model's generated text;
* ``solution``: the ground truth (a string, possibly wrapped in ``<answer>...</answer>`` as in VLM-R1
  data, or a number / list / box list where the reward says so);
* ``metadata``: the sample's extra fields (may be ``None``). Keys read here:

  - ``require_answer_tags`` (bool, default False): without a complete ``<answer>`` block the answer is
    empty (score 0); by default the completion without its ``<think>`` part is used (see
    :mod:`rewards.verifiable.format`);
  - ``original_sizes`` / ``processed_sizes``: ``(height, width)`` of every image file and of every image
    as the model saw it (one per image, filled in by the VLM trainer); ``box_image``: which image the boxes
    are on (default 0); ``original_size`` / ``processed_size``: that image's sizes, set by a record to
    override; ``box_format``: the convention the MODEL answers boxes in, ``"original" | "resized" |
    "norm1000"``, default ``"resized"`` (see :mod:`rewards.verifiable.boxes`); ``iou_threshold``
    (detection matching, default 0.5; given to "iou" it makes that reward binary);
  - ``choices``: option texts (multiple choice) or candidate labels (preference);
  - ``rel_tol`` / ``abs_tol`` (numeric), ``precision_weight`` / ``recall_weight`` / ``iou_weighted``
    (DIP-R1), ``anls_threshold`` / ``ignore_case`` (OCR), ``partial_credit`` (jigsaw).

An unreadable completion scores 0; an unreadable ground truth or missing metadata a reward needs raises
``ValueError`` (a data or configuration bug), which the trainer routes to ``reward.nan_policy`` like a NaN.
Look rewards up with :func:`get_verifiable_reward`.

Rewards that cannot be gamed: every answer reward follows the commitment rule of
:mod:`rewards.verifiable.commitment` (listing, negating or hedging earns no more than the worst candidate);
every box reward states its floor (:mod:`rewards.verifiable.boxes`); ``detection_map`` is evaluation-only.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from gen_rl.core.registry import resolve
from rewards.verifiable.answers import choice_reward, exact_reward, math_reward, numeric_reward, yes_no_reward
from rewards.verifiable.boxes import (
    detection_f1_reward,
    detection_map_reward,
    detection_weighted_reward,
    giou_reward,
    iou_reward,
)
from rewards.verifiable.counting import counting_reward
from rewards.verifiable.format import answer_text, extract_answer, extract_solution, format_reward
from rewards.verifiable.ocr import ocr_reward
from rewards.verifiable.preference import preference_reward
from rewards.verifiable.ssl_tasks import jigsaw_reward, rotation_reward
from rewards.verifiable.temporal import temporal_iou_reward

__all__ = [
    "VerifiableReward",
    "VERIFIABLE_REWARDS",
    "get_verifiable_reward",
    "extract_answer",
    "answer_text",
    "extract_solution",
]

VerifiableReward = Callable[[str, Any, Mapping[str, Any] | None], float]

VERIFIABLE_REWARDS: dict[str, VerifiableReward] = {
    "format": format_reward,
    "exact": exact_reward,
    "choice": choice_reward,
    "yes_no": yes_no_reward,
    "numeric": numeric_reward,
    "math": math_reward,
    "iou": iou_reward,
    "giou": giou_reward,
    "detection_f1": detection_f1_reward,
    "detection_weighted": detection_weighted_reward,
    "detection_map": detection_map_reward,
    "counting": counting_reward,
    "ocr": ocr_reward,
    "rotation": rotation_reward,
    "jigsaw": jigsaw_reward,
    "preference": preference_reward,
    "temporal_iou": temporal_iou_reward,
}


def get_verifiable_reward(name: str) -> VerifiableReward:
    """The reward registered as ``name``, or the function at ``package.module:function`` (user code).

    Unknown names raise ``ValueError`` with a "Did you mean" hint and the list of known names.
    """
    return resolve(VERIFIABLE_REWARDS, name, "verifiable reward")
