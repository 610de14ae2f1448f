"""Boxes: conversions, parsing, IoU / GIoU, grounding and detection rewards, against hand-worked numbers."""

from __future__ import annotations

import sys

import numpy as np
import pytest

from rewards.verifiable.boxes import (
    box_giou,
    box_iou,
    box_to_original,
    coco_map,
    convert_box,
    detection_counts,
    detection_f1_reward,
    detection_map_reward,
    detection_weighted_reward,
    f1_score,
    giou_reward,
    greedy_match,
    iou_matrix,
    iou_reward,
    parse_boxes,
    parse_labeled_boxes,
    weighted_precision_recall,
)

# An 800 x 600 (W x H) image that the processor squeezed to 640 x 300: x scales by 0.8, y by 0.5.
ORIGINAL = (600, 800)  # (height, width)
PROCESSED = (300, 640)
GT = [100.0, 150.0, 400.0, 450.0]  # original pixels
GT_RESIZED = [80.0, 75.0, 320.0, 225.0]  # x * 0.8, y * 0.5
GT_NORM = [125.0, 250.0, 500.0, 750.0]  # x * 1000 / 800, y * 1000 / 600
META = {"original_size": ORIGINAL, "processed_size": PROCESSED}


def tagged(answer: str) -> str:
    return f"<think>reasoning</think><answer>{answer}</answer>"


def boxes_text(boxes) -> str:
    return "[" + ", ".join("[" + ", ".join(f"{v:g}" for v in box) + "]" for box in boxes) + "]"


# ----------------------------------------------------------------------------------------------------
# coordinate conventions
# ----------------------------------------------------------------------------------------------------


def test_conversion_hand_values():
    np.testing.assert_allclose(convert_box(GT, "original", "resized", ORIGINAL, PROCESSED), GT_RESIZED)
    np.testing.assert_allclose(convert_box(GT, "original", "norm1000", ORIGINAL), GT_NORM)
    np.testing.assert_allclose(convert_box(GT_NORM, "norm1000", "resized", ORIGINAL, PROCESSED), GT_RESIZED)


def test_conversion_round_trip_original_resized_norm1000_original():
    box = [13.0, 27.5, 791.0, 590.25]
    resized = convert_box(box, "original", "resized", ORIGINAL, PROCESSED)
    normed = convert_box(resized, "resized", "norm1000", ORIGINAL, PROCESSED)
    back = convert_box(normed, "norm1000", "original", ORIGINAL, PROCESSED)
    np.testing.assert_allclose(back, box, rtol=1e-12)
    assert not np.allclose(resized, box) and not np.allclose(normed, box)


def test_box_to_original_reads_metadata_and_defaults_to_resized():
    np.testing.assert_allclose(box_to_original(GT_RESIZED, META), GT)
    np.testing.assert_allclose(box_to_original(GT_NORM, {**META, "box_format": "norm1000"}), GT)
    assert box_to_original(GT, {"box_format": "original"}) == GT  # needs no size


def test_missing_sizes_name_the_key():
    with pytest.raises(ValueError, match="processed_size"):
        box_to_original(GT, {"original_size": ORIGINAL})  # default "resized"
    with pytest.raises(ValueError, match="original_size"):
        box_to_original(GT, {"box_format": "norm1000", "processed_size": PROCESSED})
    with pytest.raises(ValueError, match="original_size"):
        iou_reward(tagged("[1, 2, 3, 4]"), GT, {"box_format": "resized", "processed_size": PROCESSED})
    with pytest.raises(ValueError, match="unknown box_format"):
        box_to_original(GT, {"box_format": "pixels"})
    with pytest.raises(ValueError, match="height, width"):
        box_to_original(GT, {"box_format": "norm1000", "original_size": 600})


# ----------------------------------------------------------------------------------------------------
# parsing
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "boxes"),
    [
        ("[10, 20, 30, 40]", [[10, 20, 30, 40]]),
        ("The cat is at [10.5, 20, 30, 40].", [[10.5, 20, 30, 40]]),
        ("(10,20),(30,40)", [[10, 20, 30, 40]]),
        ("<|box_start|>(10,20),(30,40)<|box_end|>", [[10, 20, 30, 40]]),
        ("10, 20, 30, 40", [[10, 20, 30, 40]]),
        ("[[1, 2, 3, 4], [5, 6, 7, 8]]", [[1, 2, 3, 4], [5, 6, 7, 8]]),
        ('```json\n[{"bbox_2d": [1, 2, 3, 4], "label": "cat"}]\n```', [[1, 2, 3, 4]]),
        ('{"bbox_2d": [1, 2, 3, 4], "label": "cat"} and then [5, 6, 7, 8]', [[1, 2, 3, 4], [5, 6, 7, 8]]),
        ('[{"bbox_2d": [1, 2, 3, 4]}, {"bbox_2d": [5, 6, 7', [[1, 2, 3, 4]]),  # truncated JSON
        ("[1, 2, 3]", []),
        ("no box here", []),
        ("", []),
        ("[" * 5000 + "]" * 5000, []),  # deep nesting: no crash
    ],
)
def test_parse_boxes(text, boxes):
    assert parse_boxes(text) == boxes


def test_parse_labeled_boxes():
    text = '[{"bbox_2d": [1, 2, 3, 4], "label": "cat"}, {"bbox": [5, 6, 7, 8]}]'
    assert parse_labeled_boxes(text) == [("cat", [1, 2, 3, 4]), (None, [5, 6, 7, 8])]


# ----------------------------------------------------------------------------------------------------
# IoU / GIoU by hand
# ----------------------------------------------------------------------------------------------------


def test_iou_hand_worked():
    # [0,0,4,4] and [2,2,6,6]: intersection 2x2 = 4, union 16 + 16 - 4 = 28
    assert box_iou([0, 0, 4, 4], [2, 2, 6, 6]) == pytest.approx(4 / 28)
    # [0,0,10,10] and [0,0,10,6]: the second inside the first, 60 / 100
    assert box_iou([0, 0, 10, 10], [0, 0, 10, 6]) == pytest.approx(0.6)
    assert box_iou([0, 0, 2, 2], [3, 0, 5, 2]) == 0.0
    assert box_iou([0, 0, 2, 2], [2, 0, 4, 2]) == 0.0  # touching edges
    assert box_iou(GT, GT) == 1.0


def test_giou_hand_worked():
    # disjoint: A=[0,0,2,2], B=[3,0,5,2]; IoU 0, union 8, enclosing [0,0,5,2] area 10: 0 - 2/10
    assert box_giou([0, 0, 2, 2], [3, 0, 5, 2]) == pytest.approx(-0.2)
    # overlapping: 4/28 - (36 - 28)/36 with enclosing [0,0,6,6]
    assert box_giou([0, 0, 4, 4], [2, 2, 6, 6]) == pytest.approx(4 / 28 - 8 / 36)
    assert box_giou(GT, GT) == 1.0
    # far apart approaches -1: A=[0,0,1,1], B=[99,99,100,100]: 0 - (10000 - 2)/10000
    assert box_giou([0, 0, 1, 1], [99, 99, 100, 100]) == pytest.approx(-0.9998)


def test_invalid_boxes_score_nothing():
    reversed_box = [400, 450, 100, 150]  # corners swapped
    assert box_iou(reversed_box, GT) == 0.0
    assert box_giou(reversed_box, GT) == -1.0
    assert box_iou([0, 0, float("nan"), 4], [0, 0, 4, 4]) == 0.0


def test_iou_matrix_agrees_with_box_iou():
    rng = np.random.default_rng(0)
    corners = rng.uniform(0, 100, size=(12, 2, 2))
    boxes = np.concatenate([corners.min(1), corners.max(1)], axis=1).tolist()
    boxes.append([5, 5, 1, 1])  # an invalid one
    matrix = iou_matrix(boxes[:7], boxes[7:])
    expected = [[box_iou(a, b) for b in boxes[7:]] for a in boxes[:7]]
    np.testing.assert_allclose(matrix, expected, atol=1e-12)
    assert iou_matrix([], boxes).shape == (0, 13)


# ----------------------------------------------------------------------------------------------------
# grounding rewards
# ----------------------------------------------------------------------------------------------------


def test_iou_reward_in_each_convention():
    assert iou_reward(tagged(boxes_text([GT_RESIZED])[1:-1]), GT, META) == pytest.approx(1.0)
    assert iou_reward(tagged(str(GT_NORM)), GT, {**META, "box_format": "norm1000"}) == pytest.approx(1.0)
    assert iou_reward(tagged(str(GT)), GT, {**META, "box_format": "original"}) == 1.0
    assert iou_reward(tagged(str(GT)), f"<answer>{GT}</answer>", {"box_format": "original"}) == 1.0


def test_box_in_the_wrong_convention_scores_low():
    # told norm1000, answers resized pixels: [80,75,320,225] read as norm1000 is [64,45,256,135] original,
    # entirely above the target (y 135 < 150)
    wrong = {**META, "box_format": "norm1000"}
    assert iou_reward(tagged(str(GT_RESIZED)), GT, wrong) == 0.0
    assert giou_reward(tagged(str(GT_RESIZED)), GT, wrong) < 0.5
    # told resized, answers original pixels: read back as [125, 300, 500, 900]; intersection 275 x 150,
    # union 300*300 + 375*600 - 41250
    told_resized = iou_reward(tagged(str(GT)), GT, META)
    assert told_resized == pytest.approx(41250 / (90000 + 225000 - 41250))
    assert told_resized < 0.2


def test_giou_reward_hand_worked():
    target = [0, 0, 2, 2]
    meta = {"box_format": "original"}
    assert giou_reward(tagged("[0, 0, 2, 2]"), target, meta) == 1.0
    # disjoint: GIoU -0.2 (test_giou_hand_worked) floors at 0, as does any disjoint box
    assert giou_reward(tagged("[3, 0, 5, 2]"), target, meta) == 0.0
    # [0,0,10,10] vs [1,1,11,11]: intersection 81, union 119, enclosing [0,0,11,11] area 121
    shifted = giou_reward(tagged("[0, 0, 10, 10]"), [1, 1, 11, 11], meta)
    assert shifted == pytest.approx(81 / 119 - (121 - 119) / 121)
    assert shifted < iou_reward(tagged("[0, 0, 10, 10]"), [1, 1, 11, 11], meta)  # GIoU <= IoU
    # [0,0,4,4] vs [2,2,6,6]: GIoU 4/28 - 8/36 < 0 although they overlap: 0
    assert giou_reward(tagged("[0, 0, 4, 4]"), [2, 2, 6, 6], meta) == 0.0


def test_iou_reward_threshold():
    meta = {"box_format": "original"}
    assert iou_reward(tagged("[0, 0, 10, 6]"), [0, 0, 10, 10], meta) == pytest.approx(0.6)
    assert iou_reward(tagged("[0, 0, 10, 6]"), [0, 0, 10, 10], meta, threshold=0.5) == 1.0
    assert iou_reward(tagged("[0, 0, 10, 6]"), [0, 0, 10, 10], {**meta, "iou_threshold": 0.7}) == 0.0


def test_grounding_hacks():
    meta = {"box_format": "original"}
    target = [10, 10, 20, 20]
    for reward in (iou_reward, giou_reward):
        assert reward(tagged(""), target, meta) == 0.0
        assert reward(tagged("somewhere on the left"), target, meta) == 0.0
        assert reward(tagged("[20, 20, 10, 10]"), target, meta) == 0.0  # corners swapped
        # listing many boxes: only the first counts, so a spray cannot find the target
        spray = boxes_text([[x, y, x + 10, y + 10] for x in range(0, 100, 10) for y in range(0, 100, 10)])
        first_only = reward(tagged("[0, 0, 10, 10]"), target, meta)
        assert reward(tagged(spray), target, meta) == first_only
    # the whole image as the box earns only its honest IoU (target area / image area)
    assert iou_reward(tagged("[0, 0, 100, 100]"), target, meta) == pytest.approx(100 / 10000)


def test_iou_reward_best_of_several_targets():
    meta = {"box_format": "original"}
    assert iou_reward(tagged("[50, 50, 60, 60]"), [[0, 0, 10, 10], [50, 50, 60, 60]], meta) == 1.0


def test_bad_solution_raises():
    with pytest.raises(ValueError, match="no"):
        iou_reward(tagged("[1, 2, 3, 4]"), "a cat", {"box_format": "original"})


# ----------------------------------------------------------------------------------------------------
# detection: matching, F1, DIP-R1 weighted precision / recall
# ----------------------------------------------------------------------------------------------------

TARGETS = [[0, 0, 10, 10], [20, 0, 30, 10], [40, 0, 50, 10]]


def test_f1_two_tp_one_fp_one_fn_is_two_thirds():
    predictions = [[0, 0, 10, 10], [20, 0, 30, 10], [70, 70, 80, 80]]  # third target missed, one junk box
    counts = detection_counts(predictions, TARGETS)
    assert (counts["tp"], counts["fp"], counts["fn"]) == (2, 1, 1)
    assert f1_score(2, 1, 1) == pytest.approx(2 / 3)
    reward = detection_f1_reward(tagged(boxes_text(predictions)), TARGETS, {"box_format": "original"})
    assert reward == pytest.approx(2 / 3)


def test_f1_edge_cases():
    meta = {"box_format": "original"}
    assert f1_score(0, 0, 0) == 1.0
    assert detection_f1_reward(tagged("none"), [], meta) == 1.0  # nothing there, nothing claimed
    assert detection_f1_reward(tagged("[]"), [], meta) == 1.0
    assert detection_f1_reward(tagged("[1, 1, 2, 2]"), [], meta) == 0.0
    assert detection_f1_reward(tagged("none"), TARGETS, meta) == 0.0
    assert detection_f1_reward(tagged(""), [], meta) == 0.0  # an empty answer never pays
    assert detection_f1_reward(tagged("I cannot tell"), [], meta) == 0.0  # nor a non-answer


def test_greedy_matching_is_one_to_one_and_takes_the_best_pair_first():
    # p0 overlaps t0 with IoU 0.6 and only touches t1 (IoU 0); p1 is exactly t0, so the pair (p1, t0) goes
    # first and p0 is left with nothing it may match
    targets = [[0, 0, 10, 10], [10, 0, 20, 10]]
    predictions = [[0, 0, 10, 6], [0, 0, 10, 10]]
    assert greedy_match(predictions, targets) == [(1, 0, 1.0)]  # p0 would need t0, already taken
    assert greedy_match(predictions, targets, iou_threshold=0.0) == [(1, 0, 1.0)]  # IoU 0 never matches


def test_duplicate_box_flood_does_not_beat_the_single_correct_box():
    target = [[10, 10, 50, 50]]
    meta = {"box_format": "original"}
    single = tagged("[[10, 10, 50, 50]]")
    flood = tagged(boxes_text([[10, 10, 50, 50]] * 50))
    assert detection_f1_reward(single, target, meta) == 1.0
    assert detection_f1_reward(flood, target, meta) == pytest.approx(2 / (2 + 49))  # 1 TP, 49 FP
    assert detection_weighted_reward(single, target, meta) == 1.0
    # harmonic: (w_p + w_r) / (w_p / P + w_r / R) with P = 1/50, R = 1
    assert detection_weighted_reward(flood, target, meta) == pytest.approx(1 / (0.5 * 50 + 0.5 * 1))
    assert detection_map_reward(flood, target, meta) <= detection_map_reward(single, target, meta)


def weighted_harmonic(precision, recall, w_p=0.5, w_r=0.5):
    return (w_p + w_r) / (w_p / precision + w_r / recall)


def test_weighted_precision_recall_hand_worked():
    targets = [[0, 0, 10, 10], [20, 0, 30, 10], [40, 0, 50, 10], [60, 0, 70, 10]]
    predictions = [[0, 0, 10, 6], [20, 0, 30, 10]]  # IoUs 0.6 and 1.0; P = 2/2, R = 2/4
    counts = detection_counts(predictions, targets)
    assert weighted_precision_recall(counts) == pytest.approx(1 / (0.5 / 1 + 0.5 / 0.5))  # = F1 = 2/3
    assert weighted_precision_recall(counts) == pytest.approx(f1_score(2, 0, 2))
    assert weighted_precision_recall(counts, 0.2, 0.8) == pytest.approx(1 / (0.2 / 1 + 0.8 / 0.5))
    assert weighted_precision_recall(counts, 2, 8) == pytest.approx(1 / (0.2 / 1 + 0.8 / 0.5))  # normalised
    # recall-heavy weights pay recall more: 1 / 1.8 < 2/3 here because R < P
    assert weighted_precision_recall(counts, 0.2, 0.8) < weighted_precision_recall(counts, 0.8, 0.2)
    # IoU-weighted: hits = 0.6 + 1.0 = 1.6, P = 1.6 / 2, R = 1.6 / 4
    assert weighted_precision_recall(counts, iou_weighted=True) == pytest.approx(weighted_harmonic(0.8, 0.4))
    meta = {"box_format": "original", "precision_weight": 0.2, "recall_weight": 0.8}
    reward = detection_weighted_reward(tagged(boxes_text(predictions)), targets, meta)
    assert reward == pytest.approx(weighted_harmonic(1.0, 0.5, 0.2, 0.8))
    for weights in ((0, 0), (0, 1), (1, -1)):
        with pytest.raises(ValueError, match="precision_weight must be > 0"):
            weighted_precision_recall(counts, *weights)


def test_detection_uses_the_coordinate_convention():
    predictions_resized = [convert_box(box, "original", "resized", ORIGINAL, PROCESSED) for box in TARGETS]
    answer = tagged(boxes_text(predictions_resized))
    assert detection_f1_reward(answer, TARGETS, META) == pytest.approx(1.0)
    assert detection_f1_reward(answer, TARGETS, {**META, "box_format": "original"}) == 0.0


def test_detection_labels_must_match_when_the_targets_have_them():
    targets = [{"bbox_2d": [0, 0, 10, 10], "label": "cat"}, {"bbox_2d": [20, 0, 30, 10], "label": "dog"}]
    meta = {"box_format": "original"}
    right = '[{"bbox_2d": [0, 0, 10, 10], "label": "Cat"}, {"bbox_2d": [20, 0, 30, 10], "label": "dog"}]'
    swapped = '[{"bbox_2d": [0, 0, 10, 10], "label": "dog"}, {"bbox_2d": [20, 0, 30, 10], "label": "cat"}]'
    unlabeled = "[[0, 0, 10, 10], [20, 0, 30, 10]]"
    assert detection_f1_reward(tagged(right), targets, meta) == 1.0
    assert detection_f1_reward(tagged(swapped), targets, meta) == 0.0
    assert detection_f1_reward(tagged(unlabeled), targets, meta) == 0.0


def test_detection_iou_threshold_from_metadata():
    meta = {"box_format": "original"}
    answer = tagged("[[0, 0, 10, 6]]")  # IoU 0.6
    assert detection_f1_reward(answer, [[0, 0, 10, 10]], meta) == 1.0
    assert detection_f1_reward(answer, [[0, 0, 10, 10]], {**meta, "iou_threshold": 0.75}) == 0.0


# ----------------------------------------------------------------------------------------------------
# COCO mAP (pycocotools)
# ----------------------------------------------------------------------------------------------------


def test_coco_map_hand_worked():
    pytest.importorskip("pycocotools")
    assert coco_map([[0, 0, 10, 10]], [[0, 0, 10, 10]]) == 1.0
    # IoU 0.72 clears the thresholds 0.50 .. 0.70 (5 of 10) with precision 1: mAP 0.5
    assert coco_map([[0, 0, 10, 7.2]], [[0, 0, 10, 10]]) == pytest.approx(0.5)
    # two targets, one found: AP 0.5 at every threshold (recall 0.5 with precision 1, then nothing)
    assert coco_map([[0, 0, 10, 10]], [[0, 0, 10, 10], [20, 20, 30, 30]]) == pytest.approx(
        51 / 101, abs=1e-9
    )  # 101-point interpolation: recall points 0.00 .. 0.50 have precision 1
    assert coco_map([], [[0, 0, 10, 10]]) == 0.0
    assert coco_map([], []) == 1.0
    assert coco_map([[0, 0, 1, 1]], []) == 0.0


def test_coco_map_names_the_install_when_pycocotools_is_missing(monkeypatch):
    monkeypatch.setitem(sys.modules, "pycocotools", None)
    monkeypatch.setitem(sys.modules, "pycocotools.coco", None)
    with pytest.raises(ImportError, match="pip install pycocotools"):
        coco_map([[0, 0, 1, 1]], [[0, 0, 1, 1]])
