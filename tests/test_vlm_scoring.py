"""Scoring: verifiable rewards with task filters, image-size metadata for boxes, combined advantages."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from PIL import Image

from gen_rl.vlm.data import VLMRecord
from gen_rl.vlm.rollout import encode_prompt
from gen_rl.vlm.scoring import advantages_of, build_reward_functions, reward_metadata, score_completions
from gen_rl.vlm.tiny import tiny_qwen2_vl


def _spec(name, weight=1.0, tasks=()):
    return SimpleNamespace(name=name, weight=weight, tasks=list(tasks))


def test_task_filters_leave_other_tasks_unscored():
    functions = build_reward_functions([_spec("exact", 1.0, ["colour"]), _spec("numeric", 0.5, ["count"])])
    records = [
        VLMRecord(images=[], problem="q", solution="red", task="colour"),
        VLMRecord(images=[], problem="q", solution="3", task="count"),
    ]
    texts = ["red", "<answer>3</answer>"]
    scores = score_completions(functions, texts, records, [{}, {}])
    assert scores["exact"][0] == 1.0 and math.isnan(scores["exact"][1])
    assert math.isnan(scores["numeric"][0]) and scores["numeric"][1] == 1.0


def test_dotted_path_rewards_resolve():
    (function,) = build_reward_functions([_spec("rewards.verifiable.answers:exact_reward")])
    assert function.function("blue", "blue", None) == 1.0


def test_advantages_of_weighted_rewards_match_a_by_hand_group_normalisation():
    functions = build_reward_functions([_spec("exact", 1.0), _spec("format", 0.5)])
    scores = {
        "exact": torch.tensor([1.0, 0.0, 0.0, 1.0, 0.0, 0.0], dtype=torch.float64),
        "format": torch.tensor([1.0, 1.0, 0.0, float("nan"), 1.0, 0.0], dtype=torch.float64),
    }
    group_ids = torch.tensor([0, 0, 0, 1, 1, 1])
    total, output = advantages_of(
        scores, functions, group_ids, combine="sum_then_normalize", std_mode="group", eps=1e-4, clip=None
    )
    # not-applicable (NaN) counts 0: totals 1.5, 0.5, 0 | 1.0, 0.5, 0
    expected_total = [1.5, 0.5, 0.0, 1.0, 0.5, 0.0]
    assert total.tolist() == pytest.approx(expected_total)
    for start in (0, 3):
        group = expected_total[start : start + 3]
        mean = sum(group) / 3
        std = math.sqrt(sum((value - mean) ** 2 for value in group) / 3)
        for offset, value in enumerate(group):
            assert float(output.advantages[start + offset]) == pytest.approx(
                (value - mean) / (std + 1e-4), rel=1e-5
            )


def test_box_rewards_get_the_processed_image_size(tmp_path):
    """A 112 x 56 image is resized by the tiny processor to 56 x 28; an answer in the resized image's pixels
    scores IoU 1 against the ground truth in original pixels, through the metadata the trainer fills in."""
    _, processor = tiny_qwen2_vl()
    image = Image.new("RGB", (112, 56), (10, 20, 30))
    prompt = encode_prompt(processor, "where is it ?", [image])
    assert prompt.processed_sizes == [(28, 56)]
    record = VLMRecord(images=[], problem="where", solution="[0, 0, 56, 28]", task="grounding")
    metadata = reward_metadata(record, [(image.height, image.width)], prompt.processed_sizes)
    assert metadata["original_size"] == (56, 112) and metadata["processed_size"] == (28, 56)
    (iou,) = build_reward_functions([_spec("iou")])
    assert iou.function("<answer>[0, 0, 28, 14]</answer>", record.solution, metadata) == pytest.approx(1.0)
    assert iou.function("<answer>[0, 0, 56, 28]</answer>", record.solution, metadata) < 0.5
    kept = reward_metadata(
        VLMRecord(images=[], problem="", solution="", metadata={"original_size": [1, 1]}), [(5, 5)], []
    )
    assert kept["original_size"] == [1, 1] and "processed_size" not in kept  # the record's own values win
