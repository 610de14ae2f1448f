"""Floors of the grounding and detection rewards, from the attacker's side: what a blind grid of boxes, a
spray of random boxes, the whole image and a zero-area box earn (each reward's docstring states its floor);
unreadable boxes count as false positives; COCO mAP is refused as a training reward."""

from __future__ import annotations

import math

import numpy as np
import pytest

from rewards.verifiable.boxes import (
    box_iou,
    coco_map,
    detection_counts,
    detection_f1_reward,
    detection_map_reward,
    detection_weighted_reward,
    giou_reward,
    iou_reward,
    parse_labeled_boxes,
)

WIDTH, HEIGHT = 640, 480
META = {"box_format": "original", "original_size": (HEIGHT, WIDTH)}
TARGETS = [[50, 60, 150, 140], [300, 200, 400, 280], [480, 330, 580, 410]]  # 100 x 80 each
TARGET_AREA = 100 * 80
WHOLE_IMAGE = [0, 0, WIDTH, HEIGHT]


def tagged(answer: str) -> str:
    return f"<think>reasoning</think><answer>{answer}</answer>"


def boxes_text(boxes) -> str:
    return "[" + ", ".join("[" + ", ".join(f"{v:g}" for v in box) + "]" for box in boxes) + "]"


def blind_grid() -> list[list[float]]:
    """Boxes at three scales tiling the image with half-box strides: blind, yet it covers every target."""
    grid = []
    for width, height in ((50, 40), (100, 80), (200, 160)):
        for y in range(0, HEIGHT - height + 1, height // 2):
            for x in range(0, WIDTH - width + 1, width // 2):
                grid.append([x, y, x + width, y + height])
    return grid


def random_spray(count: int, seed: int = 0) -> list[list[float]]:
    rng = np.random.default_rng(seed)
    corners = rng.uniform(0, 1, size=(count, 2, 2)) * [WIDTH, HEIGHT]
    return np.concatenate([corners.min(1), corners.max(1)], axis=1).round(1).tolist()


DETECTION = {
    "f1": lambda answer, meta: detection_f1_reward(answer, TARGETS, meta),
    "weighted": lambda answer, meta: detection_weighted_reward(answer, TARGETS, meta),
    "weighted_recall_heavy": lambda answer, meta: detection_weighted_reward(
        answer, TARGETS, {**meta, "precision_weight": 0.2, "recall_weight": 0.8}
    ),
    "weighted_iou": lambda answer, meta: detection_weighted_reward(
        answer, TARGETS, {**meta, "iou_weighted": True}
    ),
}


@pytest.mark.parametrize("name", list(DETECTION))
def test_detection_honest_answer_earns_one(name):
    assert DETECTION[name](tagged(boxes_text(TARGETS)), META) == pytest.approx(1.0)


@pytest.mark.parametrize("name", list(DETECTION))
def test_detection_blind_grid_floor(name):
    grid = blind_grid()
    counts = detection_counts(grid, TARGETS)
    assert counts["tp"] == len(TARGETS)  # the attack is real: it finds every target ...
    precision, recall = counts["tp"] / len(grid), counts["tp"] / len(TARGETS)
    assert 0.5 * precision + 0.5 * recall > 0.5  # ... and DIP-R1's arithmetic mean would pay it over 0.5
    reward = DETECTION[name](tagged(boxes_text(grid)), META)
    # stated floor: (w_p + w_r) / (w_p N / k + w_r); with w_p = 0.2, w_r = 0.8, k = 3 that is 1 / (0.2 N / 3 + 0.8)
    assert reward <= 1 / (0.2 * len(grid) / 3 + 0.8) + 1e-12
    assert reward < 0.03


@pytest.mark.parametrize("name", list(DETECTION))
@pytest.mark.parametrize("count", [10, 50, 200])
def test_detection_random_spray_floor(name, count):
    spray = random_spray(count)
    k = detection_counts(spray, TARGETS)["tp"]
    reward = DETECTION[name](tagged(boxes_text(spray)), META)
    assert reward <= 1 / (0.2 * count / max(k, 1) + 0.8) + 1e-12
    assert reward <= 2 * len(TARGETS) / (count + len(TARGETS))  # F1 bound 2G / (N + G) also holds here


@pytest.mark.parametrize("name", list(DETECTION))
@pytest.mark.parametrize("box", [WHOLE_IMAGE, [100, 100, 100, 100], [100, 100, 100, 140], [0, 0, 0, 0]])
def test_detection_whole_image_and_zero_area_earn_nothing(name, box):
    # the whole image overlaps each 100 x 80 target with IoU 8000 / 307200 < 0.5; zero-area boxes overlap nothing
    assert DETECTION[name](tagged(boxes_text([box])), META) == 0.0


def test_detection_whole_image_pays_only_for_a_target_that_fills_it():
    big_target = [[0, 0, 600, 480]]  # IoU with the whole image 600 / 640 >= 0.5: an honest hit
    assert detection_f1_reward(tagged(boxes_text([WHOLE_IMAGE])), big_target, META) == 1.0


GROUNDING = {"iou": iou_reward, "giou": giou_reward}
TARGET = TARGETS[1]


@pytest.mark.parametrize("name", list(GROUNDING))
def test_grounding_whole_image_floor_is_target_over_image_area(name):
    reward = GROUNDING[name](tagged(str(WHOLE_IMAGE)), TARGET, META)
    assert reward == pytest.approx(TARGET_AREA / (WIDTH * HEIGHT))  # 0.026, was 0.51 for (GIoU + 1) / 2
    assert reward < 0.03


@pytest.mark.parametrize("name", list(GROUNDING))
@pytest.mark.parametrize("box", [[350, 240, 350, 240], [300, 200, 300, 280], [0, 0, 0, 0], [600, 0, 600, 0]])
def test_grounding_zero_area_box_earns_nothing(name, box):
    # a point inside the target had GIoU 0, i.e. 0.5 under (GIoU + 1) / 2
    assert GROUNDING[name](tagged(str(box)), TARGET, META) == 0.0


@pytest.mark.parametrize("name", list(GROUNDING))
@pytest.mark.parametrize("boxes", [blind_grid(), random_spray(50), random_spray(200, seed=1)])
def test_grounding_spray_earns_its_first_box_only(name, boxes):
    first = GROUNDING[name](tagged(str(boxes[0])), TARGET, META)
    assert GROUNDING[name](tagged(boxes_text(boxes)), TARGET, META) == first
    assert first <= box_iou(boxes[0], TARGET)  # GIoU floored at 0 never beats IoU


@pytest.mark.parametrize("name", list(GROUNDING))
def test_grounding_far_boxes_earn_nothing(name):
    # any box disjoint from the target earns 0 (under (GIoU + 1) / 2 each earned 0.25 .. 0.5)
    rewards = [GROUNDING[name](tagged(str(box)), TARGET, META) for box in random_spray(200, seed=2)]
    disjoint = [
        r for r, box in zip(rewards, random_spray(200, seed=2), strict=True) if box_iou(box, TARGET) == 0
    ]
    assert disjoint and max(disjoint) == 0.0
    assert float(np.mean(rewards)) < 0.05


# ----------------------------------------------------------------------------------------------------
# unreadable boxes are false positives
# ----------------------------------------------------------------------------------------------------

NAN = [math.nan] * 4


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("[[0, 0, 10, 10], [20, 0, 30]]", [[0, 0, 10, 10], NAN]),
        ("[0, 0, 10, 10] and [1, 2, 3, 4, 5]", [[0, 0, 10, 10], NAN]),
        ('[{"bbox_2d": [0, 0, 10, 10]}, {"bbox_2d": "left"}]', [[0, 0, 10, 10], NAN]),
        ('[{"bbox_2d": [0, 0, 10, 10]}, {"bbox_2d": [5, 6, 7', [[0, 0, 10, 10], NAN]),  # cut off
        ('{"bbox_2d": [0, 0, 10, 10]} {"label": "cat"}', [[0, 0, 10, 10], NAN]),
        ("[0, 0, 10, 10] [see above]", [[0, 0, 10, 10]]),  # no numbers: prose, not a box
        ("[0, 0, 10, 10] ref [3]", [[0, 0, 10, 10]]),  # one number: no box attempt
    ],
)
def test_unreadable_box_attempts_are_kept_as_nan(text, expected):
    boxes = [box for _, box in parse_labeled_boxes(text, keep_unreadable=True)]
    assert len(boxes) == len(expected)
    for box, want in zip(boxes, expected, strict=True):
        np.testing.assert_array_equal(box, want)
    assert [box for _, box in parse_labeled_boxes(text)] == [b for b in expected if b is not NAN]


@pytest.mark.parametrize(
    "junk", ["[20, 0, 30]", "[1, 2, 3, 4, 5]", '{"bbox_2d": "left"}', '{"bbox_2d": [1, 2', '{"box": null}']
)
def test_unreadable_boxes_count_as_false_positives(junk):
    target = [[0, 0, 10, 10]]
    answer = tagged(f"[0, 0, 10, 10] {junk}")
    assert detection_f1_reward(answer, target, META) == pytest.approx(2 / 3)  # 1 TP, 1 FP, 0 FN
    assert detection_weighted_reward(answer, target, META) == pytest.approx(1 / (0.5 / 0.5 + 0.5 / 1))
    only_junk = tagged(junk)
    assert detection_f1_reward(only_junk, [], META) == 0.0  # junk is no "nothing here"


def test_unreadable_first_box_earns_no_grounding_reward():
    for reward in (iou_reward, giou_reward):
        assert reward(tagged("[300, 200, 400] then [300, 200, 400, 280]"), TARGET, META) == 0.0
        assert reward(tagged("[300, 200, 400, 280]"), TARGET, META) == 1.0


def test_unreadable_ground_truth_is_a_data_error():
    with pytest.raises(ValueError, match="fix the record"):
        detection_f1_reward(tagged("[0, 0, 1, 1]"), "[[0, 0, 1, 1], [2, 3]]", META)


# ----------------------------------------------------------------------------------------------------
# COCO mAP: evaluation only
# ----------------------------------------------------------------------------------------------------


def test_coco_map_pays_appended_guesses_which_is_why_it_is_evaluation_only():
    pytest.importorskip("pycocotools")
    right, wrong = TARGETS[0], [500, 0, 600, 80]
    assert coco_map([right], [right]) == 1.0
    assert coco_map([wrong, right], [right]) == pytest.approx(0.5, abs=0.01)  # a guess first: still 0.5
    assert coco_map([right, *random_spray(30)], [right]) == 1.0  # guesses after the hit are free
    assert "evaluation-only" in detection_map_reward.evaluation_only
