"""Boxes: parsing from text, coordinate conventions, IoU / GIoU, grounding and detection rewards.

Conventions
-----------
* A box is ``[x1, y1, x2, y2]``: top-left and bottom-right corners, continuous coordinates, area
  ``(x2 - x1) * (y2 - y1)`` (no "+1" pixel convention). A box with ``x2 < x1`` or ``y2 < y1`` is invalid:
  IoU 0 and GIoU -1 with anything (corners are not silently swapped).
* Sizes in metadata are ``(height, width)``: ``original_size`` of the image file, ``processed_size`` of the
  image the model saw after the processor resized it (Qwen2.5-VL's ``smart_resize`` output, say).

Image sizes (the interface between the rollout and these rewards, model-agnostic)
---------------------------------------------------------------------------------
* ``original_sizes`` / ``processed_sizes``: one ``(height, width)`` per image of the prompt, in prompt
  order (the VLM trainer fills them for every image: ``gen_rl.vlm.scoring.reward_metadata``).
  ``processed_size`` is the frame the model's pixels live in, for a processor that maps the WHOLE image onto
  it by scaling each axis (Qwen's grid, LLaVA / PaliGemma / Gemma 3 resizing). A processor that tiles, crops
  or pads has no such frame: it reports none, and records must then state ``box_format`` "original" or
  "norm1000" (a "resized" answer raises, naming that fix).
* ``box_image`` (default 0): which image the boxes are on; ``original_size`` / ``processed_size`` given by
  the record itself override the lists. See :func:`image_sizes`.

Floors (what a blind answer earns; each reward's docstring states its own)
--------------------------------------------------------------------------
* ``iou`` / ``giou``: first box only, so a spray or grid earns its first box; the whole image earns
  ``|T| / |image|``; a zero-area box 0. ``giou`` is ``max(0, GIoU)`` (``(GIoU + 1) / 2`` paid ~0.5 for
  any box).
* ``detection_f1``: N boxes hitting k of G targets earn ``2k / (N + G)``; a zero-area box 0.
* ``detection_weighted``: a weighted harmonic mean, ``<= (w_p + w_r) / (w_p N / k + w_r)`` (DIP-R1's
  arithmetic mean paid a blind grid ``w_r / (w_p + w_r)``).
* ``detection_map``: no floor (appended guesses are free): evaluation-only, refused as a training reward.
* A box attempt that cannot be read (``[1, 2, 3]``, ``{"bbox_2d": "left"}``, cut off) is a false positive.

* ``box_format`` (metadata) names the convention the MODEL answers in:

  - ``"original"``: pixels of the original image;
  - ``"resized"``: pixels of the processor-resized image (Qwen2.5-VL's absolute coordinates) -- the
    default, since that is the image the model actually sees;
  - ``"norm1000"``: each axis scaled to 0..1000 of the image (Qwen2-VL, and many grounding datasets).

* Ground-truth boxes are always in ORIGINAL pixels; predictions are converted to original pixels before any
  overlap is computed. A conversion that needs a size the metadata lacks raises ``ValueError`` naming the key.
"""

from __future__ import annotations

import contextlib
import io
import json
import re
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from rewards.verifiable.answers import normalize_text
from rewards.verifiable.format import answer_text, extract_solution

__all__ = [
    "BOX_FORMATS",
    "DEFAULT_BOX_FORMAT",
    "DEFAULT_IOU_THRESHOLD",
    "convert_box",
    "box_to_original",
    "image_sizes",
    "parse_boxes",
    "parse_labeled_boxes",
    "box_iou",
    "box_giou",
    "iou_matrix",
    "greedy_match",
    "detection_counts",
    "f1_score",
    "weighted_precision_recall",
    "coco_map",
    "iou_reward",
    "giou_reward",
    "detection_f1_reward",
    "detection_weighted_reward",
    "detection_map_reward",
    "MAP_EVALUATION_ONLY",
]

BOX_FORMATS = ("original", "resized", "norm1000")
DEFAULT_BOX_FORMAT = "resized"
DEFAULT_IOU_THRESHOLD = 0.5

Box = list[float]
LabeledBox = tuple[str | None, Box]

# ---------------------------------------------------------------------------------------------------------
# coordinate conventions
# ---------------------------------------------------------------------------------------------------------


def _size(value: Any, key: str) -> tuple[float, float]:
    if value is None:
        raise ValueError(f"box conversion needs metadata[{key!r}] = (height, width); it is missing")
    try:
        height, width = (float(item) for item in value)
    except (TypeError, ValueError) as error:
        raise ValueError(f"metadata[{key!r}] must be (height, width), got {value!r}") from error
    if not (height > 0 and width > 0):
        raise ValueError(f"metadata[{key!r}] must be positive (height, width), got {value!r}")
    return height, width


def _check_format(box_format: str) -> str:
    if box_format not in BOX_FORMATS:
        raise ValueError(f"unknown box_format {box_format!r}; expected one of {', '.join(BOX_FORMATS)}")
    return box_format


def _scale_to_original(box_format: str, original_size: Any, processed_size: Any) -> tuple[float, float]:
    """(sx, sy) with original = box * (sx, sy)."""
    if box_format == "original":
        return 1.0, 1.0
    height, width = _size(original_size, "original_size")
    if box_format == "norm1000":
        return width / 1000.0, height / 1000.0
    processed_height, processed_width = _size(processed_size, "processed_size")
    return width / processed_width, height / processed_height


def convert_box(
    box: Sequence[float],
    source: str,
    target: str,
    original_size: Sequence[float] | None = None,
    processed_size: Sequence[float] | None = None,
) -> Box:
    """Convert ``[x1, y1, x2, y2]`` from convention ``source`` to ``target`` (see the module docstring).

    original -> resized multiplies x by ``W_p / W_o`` and y by ``H_p / H_o``; original -> norm1000 multiplies
    x by ``1000 / W_o`` and y by ``1000 / H_o``; the other directions invert these (through original pixels).
    Sizes are ``(height, width)``; ``original_size`` is needed unless both conventions are "original",
    ``processed_size`` only when one of them is "resized".
    """
    _check_format(source)
    _check_format(target)
    if source == target:
        return [float(value) for value in box]
    sx, sy = _scale_to_original(source, original_size, processed_size)
    tx, ty = _scale_to_original(target, original_size, processed_size)
    x1, y1, x2, y2 = (float(value) for value in box)
    return [x1 * sx / tx, y1 * sy / ty, x2 * sx / tx, y2 * sy / ty]


def image_sizes(metadata: Mapping[str, Any] | None) -> tuple[Any, Any]:
    """``(original_size, processed_size)`` of the image the boxes refer to (module docstring, "Image sizes").

    The record's own ``original_size`` / ``processed_size`` win; otherwise entry ``box_image`` (default 0)
    of the per-image lists ``original_sizes`` / ``processed_sizes``. ``None`` where unknown.
    """
    metadata = metadata or {}
    index = metadata.get("box_image", 0)
    sizes = []
    for single, plural in (("original_size", "original_sizes"), ("processed_size", "processed_sizes")):
        value = metadata.get(single)
        listed = metadata.get(plural)
        if value is None and listed:
            if not (isinstance(index, int) and 0 <= index < len(listed)):
                raise ValueError(
                    f"metadata['box_image'] = {index!r} but the prompt has {len(listed)} image(s); "
                    "set box_image to the index of the image the boxes are on"
                )
            value = listed[index]
        sizes.append(value)
    return sizes[0], sizes[1]


def box_to_original(box: Sequence[float], metadata: Mapping[str, Any] | None = None) -> Box:
    """Convert a predicted box from ``metadata["box_format"]`` (default "resized") to original pixels, with
    the sizes of :func:`image_sizes`."""
    metadata = metadata or {}
    box_format = _check_format(metadata.get("box_format", DEFAULT_BOX_FORMAT))
    original_size, processed_size = image_sizes(metadata)
    if box_format == "resized" and processed_size is None and original_size is not None:
        raise ValueError(
            "box_format 'resized' needs the processed image size (metadata['processed_size'] or "
            "['processed_sizes']) and this processor reports none (it tiles or crops the image): set the "
            "record's box_format to 'original' or 'norm1000'"
        )
    return convert_box(box, box_format, "original", original_size, processed_size)


# ---------------------------------------------------------------------------------------------------------
# parsing
# ---------------------------------------------------------------------------------------------------------

_N = r"[-+]?\d+(?:\.\d+)?(?:[eE][-+]?\d+)?"
_BRACKET_BOX = re.compile(rf"\[\s*({_N})\s*,\s*({_N})\s*,\s*({_N})\s*,\s*({_N})\s*\]")
_POINT_PAIR_BOX = re.compile(rf"\(\s*({_N})\s*,\s*({_N})\s*\)\s*,?\s*(?:to\s*)?\(\s*({_N})\s*,\s*({_N})\s*\)")
_BARE_BOX = re.compile(rf"\A\s*({_N})\s*[,\s]\s*({_N})\s*[,\s]\s*({_N})\s*[,\s]\s*({_N})\s*\Z")
_FLAT_OBJECT = re.compile(r"\{[^{}]*\}")
_FENCE = re.compile(r"```(?:json)?", re.IGNORECASE)
_BOX_KEYS = ("bbox_2d", "bbox", "box", "bounding_box", "box_2d")
_LABEL_KEYS = ("label", "category", "class", "name")


def _is_box(value: Any) -> bool:
    return (
        isinstance(value, list | tuple)
        and len(value) == 4
        and all(isinstance(item, int | float) and not isinstance(item, bool) for item in value)
    )


_UNREADABLE: Box = [float("nan")] * 4  # stands for a box the answer attempted but that cannot be read


def _from_json(value: Any) -> list[LabeledBox]:
    """Boxes inside parsed JSON: a 4-number list, a dict with a box key (and maybe a label), or lists of them.

    A box attempt that cannot be read -- a number list of another length, a dict whose box key holds no
    4-number list, a dict with keys but no box key -- yields ``(None, _UNREADABLE)``; strings are labels or
    prose and are skipped; an empty dict or list is no attempt.
    """
    if _is_box(value):
        return [(None, [float(item) for item in value])]
    if isinstance(value, dict):
        for key in _BOX_KEYS:
            if _is_box(value.get(key)):
                label = next((value[k] for k in _LABEL_KEYS if isinstance(value.get(k), str)), None)
                return [(label, [float(item) for item in value[key]])]
        return [(None, _UNREADABLE)] if value else []
    if isinstance(value, list | tuple):
        numbers = [isinstance(item, int | float) and not isinstance(item, bool) for item in value]
        if value and all(numbers):
            return [(None, _UNREADABLE)]  # [1, 2, 3] or [1, 2, 3, 4, 5]
        return [item for element in value for item in _from_json(element)]
    return []


_INNER_BRACKETS = re.compile(r"\[([^\[\]]*)\]")
_BOX_KEY = re.compile(r"[\"']?(?:" + "|".join(_BOX_KEYS) + r")[\"']?\s*:")


def _scan_boxes(text: str) -> list[LabeledBox]:
    """Every box attempt in ``text`` in order of appearance, unreadable ones as ``_UNREADABLE``."""
    text = _FENCE.sub(" ", text).strip()
    if not text:
        return []
    with contextlib.suppress(ValueError, RecursionError):
        return _from_json(json.loads(text))
    found: list[tuple[int, LabeledBox]] = []
    covered: list[tuple[int, int]] = []
    objects = 0
    for match in _FLAT_OBJECT.finditer(text):
        try:
            parsed = _from_json(json.loads(match.group(0)))
        except (ValueError, RecursionError):
            parsed = [(None, _UNREADABLE)] if _BOX_KEY.search(match.group(0)) else []
        if parsed:
            objects += 1
            found.extend((match.start(), item) for item in parsed)
            covered.append(match.span())
    for pattern in (_BRACKET_BOX, _POINT_PAIR_BOX):
        for match in pattern.finditer(text):
            if any(start <= match.start() < end for start, end in covered):
                continue
            found.append((match.start(), (None, [float(group) for group in match.groups()])))
            covered.append(match.span())
    for match in _INNER_BRACKETS.finditer(text):  # "[1, 2, 3]", "[10, 20, 30, 40, 50]": attempts, unreadable
        attempt = len(re.findall(_N, match.group(1))) >= 2
        if attempt and not any(start <= match.start() < end for start, end in covered):
            found.append((match.start(), (None, _UNREADABLE)))
    truncated = len(_BOX_KEY.findall(text)) - len(
        [1 for start, end in covered for _ in _BOX_KEY.finditer(text, start, end)]
    )
    found.extend((len(text), (None, _UNREADABLE)) for _ in range(max(0, truncated)))
    if not found:
        bare = _BARE_BOX.match(text)
        if bare:
            found.append((0, (None, [float(group) for group in bare.groups()])))
    return [item for _, item in sorted(found, key=lambda pair: pair[0])]


def _readable(box: Sequence[float]) -> bool:
    return not all(value != value for value in box)  # the all-NaN marker


def parse_labeled_boxes(text: Any, keep_unreadable: bool = False) -> list[LabeledBox]:
    """All ``(label or None, [x1, y1, x2, y2])`` in ``text``, in order of appearance.

    Reads, in this order of preference: the whole text as JSON (a box, a list of boxes, or objects such as
    Qwen2.5-VL's ``{"bbox_2d": [...], "label": "cat"}``; a ```json fence is ignored); failing that, every
    flat ``{...}`` object that parses as such JSON, plus every ``[x1, y1, x2, y2]`` and ``(x1,y1),(x2,y2)``
    elsewhere in the text; failing all, a text that is exactly four numbers. No coordinate conversion here.

    A box the text attempts but that cannot be read -- ``[1, 2, 3]``, five numbers, ``{"bbox_2d": "left"}``,
    an object cut off mid-box by the length limit -- is left out, or with ``keep_unreadable`` kept in place
    as ``[nan, nan, nan, nan]``, which overlaps nothing: the rewards count it as a false positive.
    """
    boxes = _from_json(text) if isinstance(text, list | tuple | dict) else _scan_boxes(str(text))
    return boxes if keep_unreadable else [(label, box) for label, box in boxes if _readable(box)]


def parse_boxes(text: Any) -> list[Box]:
    """The boxes of :func:`parse_labeled_boxes` without their labels."""
    return [box for _, box in parse_labeled_boxes(text)]


# ---------------------------------------------------------------------------------------------------------
# overlap
# ---------------------------------------------------------------------------------------------------------


def _valid(box: Sequence[float]) -> bool:
    return len(box) == 4 and bool(np.all(np.isfinite(box))) and box[2] >= box[0] and box[3] >= box[1]


def _area(box: Sequence[float]) -> float:
    return max(0.0, box[2] - box[0]) * max(0.0, box[3] - box[1])


def box_iou(a: Sequence[float], b: Sequence[float]) -> float:
    """Intersection over union ``|A ∩ B| / |A ∪ B|`` of two boxes; 0 for invalid or zero-area pairs."""
    if not (_valid(a) and _valid(b)):
        return 0.0
    width = min(a[2], b[2]) - max(a[0], b[0])
    height = min(a[3], b[3]) - max(a[1], b[1])
    intersection = max(0.0, width) * max(0.0, height)
    union = _area(a) + _area(b) - intersection
    return float(intersection / union) if union > 0 else 0.0


def box_giou(a: Sequence[float], b: Sequence[float]) -> float:
    """Generalised IoU (Rezatofighi et al., 2019): ``GIoU = IoU - |C \\ (A ∪ B)| / |C|``, C the smallest
    enclosing box. In [-1, 1]; -1 for an invalid box or when C has no area."""
    if not (_valid(a) and _valid(b)):
        return -1.0
    enclosing = (max(a[2], b[2]) - min(a[0], b[0])) * (max(a[3], b[3]) - min(a[1], b[1]))
    if enclosing <= 0:
        return -1.0
    width = min(a[2], b[2]) - max(a[0], b[0])
    height = min(a[3], b[3]) - max(a[1], b[1])
    intersection = max(0.0, width) * max(0.0, height)
    union = _area(a) + _area(b) - intersection
    iou = intersection / union if union > 0 else 0.0
    return float(iou - (enclosing - union) / enclosing)


def iou_matrix(predictions: Sequence[Sequence[float]], targets: Sequence[Sequence[float]]) -> np.ndarray:
    """``[P, G]`` IoU of every prediction with every target (vectorised :func:`box_iou`)."""
    if len(predictions) == 0 or len(targets) == 0:
        return np.zeros((len(predictions), len(targets)))
    p = np.asarray(predictions, dtype=np.float64).reshape(-1, 4)
    g = np.asarray(targets, dtype=np.float64).reshape(-1, 4)
    p_ok = np.isfinite(p).all(1) & (p[:, 2] >= p[:, 0]) & (p[:, 3] >= p[:, 1])
    g_ok = np.isfinite(g).all(1) & (g[:, 2] >= g[:, 0]) & (g[:, 3] >= g[:, 1])
    p, g = np.nan_to_num(p), np.nan_to_num(g)
    width = np.minimum(p[:, None, 2], g[None, :, 2]) - np.maximum(p[:, None, 0], g[None, :, 0])
    height = np.minimum(p[:, None, 3], g[None, :, 3]) - np.maximum(p[:, None, 1], g[None, :, 1])
    intersection = np.clip(width, 0, None) * np.clip(height, 0, None)
    area_p = np.clip(p[:, 2] - p[:, 0], 0, None) * np.clip(p[:, 3] - p[:, 1], 0, None)
    area_g = np.clip(g[:, 2] - g[:, 0], 0, None) * np.clip(g[:, 3] - g[:, 1], 0, None)
    union = area_p[:, None] + area_g[None, :] - intersection
    with np.errstate(divide="ignore", invalid="ignore"):
        ious = np.where(union > 0, intersection / np.where(union > 0, union, 1), 0.0)
    return np.where(p_ok[:, None] & g_ok[None, :], ious, 0.0)


# ---------------------------------------------------------------------------------------------------------
# detection matching
# ---------------------------------------------------------------------------------------------------------


def greedy_match(
    predictions: Sequence[Sequence[float]],
    targets: Sequence[Sequence[float]],
    iou_threshold: float = DEFAULT_IOU_THRESHOLD,
    prediction_labels: Sequence[str | None] | None = None,
    target_labels: Sequence[str | None] | None = None,
) -> list[tuple[int, int, float]]:
    """One-to-one greedy matching: repeatedly take the highest-IoU unmatched (prediction, target) pair with
    IoU >= ``iou_threshold``. Returns ``(prediction index, target index, IoU)`` triples.

    Each target matches at most one prediction, so a repeated box is a false positive after its first copy.
    With ``target_labels`` given, a pair matches only if the normalised labels are equal (a prediction
    without a label matches nothing). Ties are broken by prediction order, then target order.
    """
    ious = iou_matrix(predictions, targets)
    if target_labels is not None:
        predicted = list(prediction_labels) if prediction_labels is not None else [None] * len(predictions)
        wanted = [normalize_text(label) if label is not None else None for label in target_labels]
        same = np.array(
            [[p is not None and normalize_text(p) == t for t in wanted] for p in predicted], dtype=bool
        ).reshape(ious.shape)
        ious = np.where(same, ious, 0.0)
    pairs = [(ious[i, j], i, j) for i, j in zip(*np.nonzero(ious >= iou_threshold), strict=True)]
    pairs.sort(key=lambda item: (-item[0], item[1], item[2]))
    used_p: set[int] = set()
    used_g: set[int] = set()
    matches = []
    for iou, i, j in pairs:
        if iou <= 0 or i in used_p or j in used_g:
            continue
        used_p.add(int(i))
        used_g.add(int(j))
        matches.append((int(i), int(j), float(iou)))
    return matches


def detection_counts(
    predictions: Sequence[Sequence[float]],
    targets: Sequence[Sequence[float]],
    iou_threshold: float = DEFAULT_IOU_THRESHOLD,
    prediction_labels: Sequence[str | None] | None = None,
    target_labels: Sequence[str | None] | None = None,
) -> dict[str, Any]:
    """``{"tp", "fp", "fn", "matched_ious"}`` of :func:`greedy_match`: TP = matches, FP = P - TP, FN = G - TP."""
    matches = greedy_match(predictions, targets, iou_threshold, prediction_labels, target_labels)
    tp = len(matches)
    return {
        "tp": tp,
        "fp": len(predictions) - tp,
        "fn": len(targets) - tp,
        "matched_ious": [iou for _, _, iou in matches],
    }


def f1_score(tp: float, fp: float, fn: float) -> float:
    """``F1 = 2 TP / (2 TP + FP + FN)`` (harmonic mean of precision and recall); 1.0 when all three are 0."""
    denominator = 2 * tp + fp + fn
    return 1.0 if denominator == 0 else float(2 * tp / denominator)


def weighted_precision_recall(
    counts: Mapping[str, Any],
    precision_weight: float = 0.5,
    recall_weight: float = 0.5,
    iou_weighted: bool = False,
) -> float:
    """DIP-R1's weighted precision / recall (Park et al., 2025), combined by the weighted HARMONIC mean
    ``(w_p + w_r) / (w_p / P + w_r / R)`` (0 when P or R is 0) instead of DIP-R1's arithmetic mean.

    ``P = TP / #predictions`` and ``R = TP / #targets`` over the greedy one-to-one matches. With
    ``iou_weighted`` each true positive counts its IoU instead of 1 (``P = sum IoU / #predictions``), which
    also rewards tighter boxes. No prediction and no target gives 1; one side empty gives 0.
    Why harmonic: the arithmetic mean ``(w_p P + w_r R) / (w_p + w_r)`` pays ``w_r / (w_p + w_r)`` to a blind
    grid of boxes that covers every target (0.51 measured), whatever the image. The harmonic mean of a
    spray of N boxes hitting k of G targets is at most ``(w_p + w_r) / (w_p N / k + w_r)`` -> 0 as N grows.
    With ``w_p = w_r`` and no IoU weighting it equals F1. ``precision_weight`` must be > 0 (without it a
    spray earns full recall).
    """
    if precision_weight <= 0 or recall_weight < 0:
        raise ValueError(
            f"precision_weight must be > 0 and recall_weight >= 0, got {precision_weight}, {recall_weight}: "
            "without a precision term a spray of boxes earns full recall"
        )
    tp, fp, fn = counts["tp"], counts["fp"], counts["fn"]
    hits = float(sum(counts["matched_ious"])) if iou_weighted else float(tp)
    n_pred, n_true = tp + fp, tp + fn
    if n_pred == 0 and n_true == 0:
        return 1.0
    precision = hits / n_pred if n_pred else 0.0
    recall = hits / n_true if n_true else 0.0
    if precision <= 0 or (recall <= 0 and recall_weight > 0):
        return 0.0
    inverse = precision_weight / precision + (recall_weight / recall if recall_weight > 0 else 0.0)
    return (precision_weight + recall_weight) / inverse


def coco_map(
    predictions: Sequence[Sequence[float]],
    targets: Sequence[Sequence[float]],
    scores: Sequence[float] | None = None,
) -> float:
    """COCO box AP averaged over IoU 0.50:0.05:0.95 (pycocotools ``COCOeval`` ``stats[0]``) for one image.

    Boxes are ``[x1, y1, x2, y2]`` in one convention; ``scores`` default to the order of ``predictions``
    (earlier = more confident). Single class; at most 100 predictions count (COCO's maxDets). No targets:
    1.0 if there is no prediction either, else 0. Needs pycocotools (``pip install pycocotools`` or the
    ``vlm`` extra); it is imported here only. An evaluation metric, not a reward: AP ranks, so guesses
    appended after the true positives cost nothing and a wrong box before the right one still earns 0.5.
    """
    try:
        from pycocotools.coco import COCO
        from pycocotools.cocoeval import COCOeval
    except ImportError as error:
        raise ImportError(
            "COCO mAP needs pycocotools: pip install pycocotools (or pip install 'gen-rl[vlm]')"
        ) from error
    valid = [i for i, box in enumerate(predictions) if _valid(box)]
    if len(targets) == 0:
        return 1.0 if len(predictions) == 0 else 0.0
    if not valid:
        return 0.0
    if scores is None:
        scores = [1.0 - i / len(predictions) for i in range(len(predictions))]

    def xywh(box: Sequence[float]) -> list[float]:
        return [float(box[0]), float(box[1]), float(box[2] - box[0]), float(box[3] - box[1])]

    truth = COCO()
    truth.dataset = {
        "images": [{"id": 1}],
        "categories": [{"id": 1, "name": "object"}],
        "annotations": [
            {
                "id": k + 1,
                "image_id": 1,
                "category_id": 1,
                "bbox": xywh(box),
                "area": _area(box),
                "iscrowd": 0,
            }
            for k, box in enumerate(targets)
        ],
    }
    with contextlib.redirect_stdout(io.StringIO()):
        truth.createIndex()
        detections = truth.loadRes(
            [
                {"image_id": 1, "category_id": 1, "bbox": xywh(predictions[i]), "score": float(scores[i])}
                for i in valid
            ]
        )
        evaluator = COCOeval(truth, detections, "bbox")
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    # COCOeval's mean over 101 recall points leaves float noise (0.9999999999999998 for a perfect box)
    return float(min(1.0, max(0.0, round(float(evaluator.stats[0]), 10))))


# ---------------------------------------------------------------------------------------------------------
# rewards
# ---------------------------------------------------------------------------------------------------------


def _targets(solution: Any) -> list[LabeledBox]:
    solution = extract_solution(solution)
    boxes = parse_labeled_boxes(solution, keep_unreadable=True)
    if not all(_readable(box) for _, box in boxes):
        raise ValueError(
            f"box solution holds a box that is not [x1, y1, x2, y2]: {solution!r}; fix the record"
        )
    if not boxes and not (isinstance(solution, list | tuple) and len(solution) == 0) and solution != "[]":
        raise ValueError(f"box solution holds no [x1, y1, x2, y2] box: {solution!r}")
    return boxes


def _predictions(completion: str, metadata: Mapping[str, Any] | None) -> tuple[str, list[LabeledBox]]:
    """The answer text and its boxes in original pixels, unreadable attempts kept as NaN boxes."""
    answer = answer_text(completion, metadata)
    boxes = parse_labeled_boxes(answer, keep_unreadable=True)
    return answer, [
        (label, box_to_original(box, metadata) if _readable(box) else box) for label, box in boxes
    ]


def iou_reward(
    completion: str,
    solution: Any,
    metadata: Mapping[str, Any] | None = None,
    *,
    threshold: float | None = None,
) -> float:
    """Grounding: IoU of the answer's FIRST box (converted to original pixels) with the ground-truth box.

    Only the first box counts, as in VLM-R1, so listing several boxes cannot raise the score. With several
    ground-truth boxes the best-overlapping one is used. ``threshold`` (or ``metadata["iou_threshold"]``)
    turns it binary: 1.0 if IoU >= threshold else 0. No box in the answer, or an unreadable first box: 0.

    Floor: the whole image earns ``|T| / |image|`` (its honest IoU), a zero-area box 0, a spray or grid of
    boxes its first box only.
    """
    metadata = metadata or {}
    targets = _targets(solution)
    _, predicted = _predictions(completion, metadata)
    if not predicted or not targets:
        return 0.0
    best = max(box_iou(predicted[0][1], box) for _, box in targets)
    threshold = threshold if threshold is not None else metadata.get("iou_threshold")
    if threshold is not None:
        return 1.0 if best >= float(threshold) else 0.0
    return float(min(1.0, max(0.0, best)))


def giou_reward(completion: str, solution: Any, metadata: Mapping[str, Any] | None = None) -> float:
    """Grounding with GIoU floored at 0: ``max(0, GIoU)`` of the answer's first box and the best target.

    Floor (what a blind answer earns): the whole image earns ``|T| / |image|`` (its enclosing box is itself,
    so GIoU = IoU), a zero-area box 0, a box away from the target 0, a spray or grid its first box only.
    The usual ``(GIoU + 1) / 2`` mapping is not offered: it pays about 0.5 for any box (0.58 for the whole
    image, 0.50 for a zero-area box inside the target). The price is GIoU's ordering of disjoint boxes
    (a near miss and a far miss both earn 0); ``max(0, GIoU) <= IoU``, so a loose box earns below its IoU.
    No box: 0.
    """
    targets = _targets(solution)
    _, predicted = _predictions(completion, metadata)
    if not predicted or not targets:
        return 0.0
    best = max(box_giou(predicted[0][1], box) for _, box in targets)
    return float(min(1.0, max(0.0, best)))


_NOTHING = {"[]", "none", "null", "nothing", "no objects", "no object", "{}"}


def _detection_inputs(
    completion: str, solution: Any, metadata: Mapping[str, Any] | None
) -> tuple[list[LabeledBox], list[LabeledBox]] | None:
    """(predictions in original pixels, targets), or None when the answer is empty or a non-empty text
    with no box that does not say "none" (that is no prediction of nothing)."""
    targets = _targets(solution)
    answer, predicted = _predictions(completion, metadata)
    if not answer:
        return None
    if not predicted and normalize_text(answer) not in _NOTHING and answer.strip() != "[]":
        return None
    return predicted, targets


def _detection_counts(
    completion: str, solution: Any, metadata: Mapping[str, Any] | None
) -> dict[str, Any] | None:
    """:func:`detection_counts` of the answer against the solution, or None (see :func:`_detection_inputs`)."""
    inputs = _detection_inputs(completion, solution, metadata)
    if inputs is None:
        return None
    predicted, targets = inputs
    target_labels = [label for label, _ in targets]
    use_labels = any(label is not None for label in target_labels)
    return detection_counts(
        [box for _, box in predicted],
        [box for _, box in targets],
        float((metadata or {}).get("iou_threshold", DEFAULT_IOU_THRESHOLD)),
        [label for label, _ in predicted] if use_labels else None,
        target_labels if use_labels else None,
    )


def detection_f1_reward(completion: str, solution: Any, metadata: Mapping[str, Any] | None = None) -> float:
    """Detection F1 ``2 TP / (2 TP + FP + FN)`` at IoU >= ``metadata["iou_threshold"]`` (default 0.5).

    Predictions (all boxes of the answer, converted to original pixels; unreadable box attempts count as
    false positives) are greedily matched one-to-one to the targets (:func:`greedy_match`); if the targets
    carry labels, labels must match too. An empty answer, or a non-empty one without boxes that is not an
    explicit "none" / "[]", scores 0; "none" for an image with no targets scores 1.

    Floor: a spray or grid of N boxes that hits k of G targets earns ``2k / (N + G) <= 2G / (N + G)``; the
    whole image as one box earns ``2 / (1 + G)`` only if it overlaps a target with IoU >= the threshold
    (a target covering half the image or more), else 0; a zero-area box 0.
    """
    counts = _detection_counts(completion, solution, metadata)
    return 0.0 if counts is None else f1_score(counts["tp"], counts["fp"], counts["fn"])


def detection_weighted_reward(
    completion: str,
    solution: Any,
    metadata: Mapping[str, Any] | None = None,
    *,
    precision_weight: float | None = None,
    recall_weight: float | None = None,
    iou_weighted: bool | None = None,
) -> float:
    """DIP-R1 weighted precision-recall reward over the same matching as :func:`detection_f1_reward`.

    See :func:`weighted_precision_recall` (a weighted harmonic mean); weights come from the keywords, else
    ``metadata`` (``precision_weight``, ``recall_weight``, ``iou_weighted``), else 0.5 / 0.5 / False.
    Floor: a spray or grid of N boxes hitting k targets earns at most ``(w_p + w_r) / (w_p N / k + w_r)``;
    the whole image and a zero-area box as for :func:`detection_f1_reward`.
    """
    metadata = metadata or {}
    counts = _detection_counts(completion, solution, metadata)
    if counts is None:
        return 0.0
    return weighted_precision_recall(
        counts,
        float(precision_weight if precision_weight is not None else metadata.get("precision_weight", 0.5)),
        float(recall_weight if recall_weight is not None else metadata.get("recall_weight", 0.5)),
        bool(iou_weighted if iou_weighted is not None else metadata.get("iou_weighted", False)),
    )


MAP_EVALUATION_ONLY = (
    "detection_map (COCO mAP) is evaluation-only: appending guesses never lowers average precision (a wrong "
    "box then the right one scores 0.5, duplicates after a true positive are free), so as a training reward "
    "it teaches 'emit every guess'; train with detection_f1 or detection_weighted and keep detection_map for "
    "evaluation"
)


def detection_map_reward(completion: str, solution: Any, metadata: Mapping[str, Any] | None = None) -> float:
    """COCO mAP@[.5:.95] (:func:`coco_map`) of the answer's boxes, ranked by order of appearance.

    EVALUATION ONLY (``evaluation_only`` attribute; the VLM trainer refuses it as a training reward): its
    floor is no floor, since guesses appended after the right box are free. Labels are ignored (single
    class). Empty or unreadable answers score 0 as in :func:`detection_f1_reward`. Needs pycocotools.
    """
    inputs = _detection_inputs(completion, solution, metadata)
    if inputs is None:
        return 0.0
    predicted, targets = inputs
    return coco_map([box for _, box in predicted], [box for _, box in targets])


detection_map_reward.evaluation_only = MAP_EVALUATION_ONLY  # type: ignore[attr-defined]
