"""Scoring: verifiable rewards with task filters, every image's size for box rewards (any processor), the
NaN / exception policy (drop and count, or stop: never a silent 0), evaluation-only rewards, advantages."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from PIL import Image

from gen_rl.vlm.data import VLMRecord
from gen_rl.vlm.rollout import encode_prompt
from gen_rl.vlm.scoring import (
    RewardError,
    advantages_of,
    build_reward_functions,
    reward_metadata,
    score_completions,
    unscored,
)
from gen_rl.vlm.tiny import tiny_llava, tiny_qwen2_vl
from rewards.verifiable.answers import math_reward


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
    assert not unscored(scores).any()  # each sample has a score from the reward that applies to it


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
    _assert_group_normalised(output.advantages, expected_total, [[0, 1, 2], [3, 4, 5]])


def _assert_group_normalised(advantages, totals, groups, eps=1e-4):
    """GRPO by hand: ``(r - mean) / (population std + eps)`` over each group's rows of ``totals``."""
    for rows in groups:
        values = [totals[row] for row in rows]
        mean = sum(values) / len(values)
        std = math.sqrt(sum((value - mean) ** 2 for value in values) / len(values))
        for row in rows:
            assert float(advantages[row]) == pytest.approx((totals[row] - mean) / (std + eps), rel=1e-5)


# ----------------------------------------------------------------------------------------------------
# failures follow the NaN policy
# ----------------------------------------------------------------------------------------------------


def nan_on_red(completion, solution, metadata):
    """A broken reward: NaN for one completion, 1 / 0 otherwise."""
    return float("nan") if "red" in completion else float(completion == solution)


def raise_on_red(completion, solution, metadata):
    if "red" in completion:
        raise RuntimeError("the reward model crashed")
    return float(completion == solution)


RECORDS = [VLMRecord(images=[], problem="q", solution="blue", task="colour", key=f"r{i}") for i in range(4)]
TEXTS = ["blue", "red", "green", "blue"]


@pytest.mark.parametrize(
    ("broken", "what"), [("nan_on_red", "returned nan"), ("raise_on_red", "RuntimeError")]
)
def test_a_failing_reward_stops_the_run_under_abort(broken, what):
    functions = build_reward_functions([_spec("exact"), _spec(f"tests.test_vlm_scoring:{broken}")])
    with pytest.raises(RewardError, match=rf"{broken}.*{what}.*sample 1 \(record 'r1'.*nan_policy: drop"):
        score_completions(functions, TEXTS, RECORDS, [{}] * 4, nan_policy="abort")


@pytest.mark.parametrize("broken", ["nan_on_red", "raise_on_red"])
def test_a_failing_reward_drops_and_reports_the_sample_under_drop(broken):
    functions = build_reward_functions([_spec("exact"), _spec(f"tests.test_vlm_scoring:{broken}", 0.5)])
    lines = []
    scores = score_completions(functions, TEXTS, RECORDS, [{}] * 4, nan_policy="drop", report=lines.append)
    assert len(lines) == 1 and "sample 1" in lines[0] and "dropped" in lines[0]
    # the whole sample is unscored, the healthy reward's 0 for "red" included: never a silent 0
    assert unscored(scores).tolist() == [False, True, False, False]
    assert math.isnan(scores["exact"][1])
    total, output = advantages_of(
        scores, functions, torch.tensor([0, 0, 0, 0]), combine="sum_then_normalize", std_mode="group",
        eps=1e-4, clip=None,
    )  # fmt: skip
    assert math.isnan(float(total[1])) and float(output.advantages[1]) == 0.0
    # the group statistics use the three scored samples only: totals 1.5, 0, 1.5
    kept_totals = {0: 1.5, 2: 0.0, 3: 1.5}
    mean = sum(kept_totals.values()) / 3
    std = math.sqrt(sum((v - mean) ** 2 for v in kept_totals.values()) / 3)
    for row, value in kept_totals.items():
        assert float(output.advantages[row]) == pytest.approx((value - mean) / (std + 1e-4), rel=1e-5)


def test_a_sample_no_reward_applies_to_is_unscored():
    functions = build_reward_functions([_spec("exact", 1.0, ["colour"])])
    record = VLMRecord(images=[], problem="q", solution="3", task="count")
    scores = score_completions(functions, ["3"], [record], [{}])
    assert unscored(scores).tolist() == [True]


def test_unknown_nan_policy_is_refused():
    with pytest.raises(ValueError, match="nan_policy"):
        score_completions([], [], [], [], nan_policy="zero")


def test_math_reward_lets_an_internal_failure_reach_the_policy(monkeypatch):
    # a math-verify failure outside parsing used to be swallowed into 0
    import math_verify

    def broken_verify(*args, **kwargs):
        raise RuntimeError("sympy blew up")

    monkeypatch.setattr(math_verify, "verify", broken_verify)
    with pytest.raises(RuntimeError, match="sympy blew up"):
        math_reward("<answer>3</answer>", "3", {})


# ----------------------------------------------------------------------------------------------------
# evaluation-only rewards
# ----------------------------------------------------------------------------------------------------


def test_detection_map_is_refused_as_a_training_reward():
    with pytest.raises(ValueError, match="detection_map.*cannot train.*evaluation-only.*detection_f1"):
        build_reward_functions([_spec("detection_map")])
    (evaluator,) = build_reward_functions([_spec("detection_map")], evaluation=True)
    assert evaluator.name == "detection_map"


# ----------------------------------------------------------------------------------------------------
# image sizes reach the box rewards, for every image and any processor
# ----------------------------------------------------------------------------------------------------


def test_box_rewards_get_the_processed_image_size(tmp_path):
    """A 112 x 56 image is resized by the tiny processor to 56 x 28; an answer in the resized image's pixels
    scores IoU 1 against the ground truth in original pixels, through the metadata the trainer fills in."""
    _, processor = tiny_qwen2_vl()
    image = Image.new("RGB", (112, 56), (10, 20, 30))
    prompt = encode_prompt(processor, "where is it ?", [image])
    assert prompt.processed_sizes == [(28, 56)]
    record = VLMRecord(images=[], problem="where", solution="[0, 0, 56, 28]", task="grounding")
    metadata = reward_metadata(record, [(image.height, image.width)], prompt.processed_sizes)
    assert metadata["original_sizes"] == [(56, 112)] and metadata["processed_sizes"] == [(28, 56)]
    (iou,) = build_reward_functions([_spec("iou")])
    assert iou.function("<answer>[0, 0, 28, 14]</answer>", record.solution, metadata) == pytest.approx(1.0)
    assert iou.function("<answer>[0, 0, 56, 28]</answer>", record.solution, metadata) < 0.5
    kept = reward_metadata(
        VLMRecord(images=[], problem="", solution="", metadata={"original_sizes": [(1, 1)]}), [(5, 5)], []
    )
    assert kept["original_sizes"] == [(1, 1)] and "processed_sizes" not in kept  # the record's own values win


def test_every_image_size_reaches_the_reward_and_box_image_picks_one():
    """Two images the processor scales differently (x 0.5, and x 2 / x 1.5): the boxes of a record are on
    image 1. With ``box_image: 1`` the answer in image 1's processed pixels scores 1; read in image 0's frame
    (what reached the reward before: only the first image's size) it scores far less."""
    _, processor = tiny_qwen2_vl()
    images = [Image.new("RGB", (112, 56)), Image.new("RGB", (28, 56))]
    prompt = encode_prompt(processor, "where ?", images)
    assert prompt.processed_sizes == [(28, 56), (84, 56)]
    solution = "[0, 0, 14, 28]"  # image 1 (28 wide, 56 tall): its top-left quarter, original pixels
    answer = "<answer>[0, 0, 28, 42]</answer>"  # the same box in image 1's 56 x 84 frame
    (iou,) = build_reward_functions([_spec("iou")])
    original_sizes = [(image.height, image.width) for image in images]
    on_second = reward_metadata(
        VLMRecord(images=[], problem="", solution=solution, metadata={"box_image": 1}),
        original_sizes,
        prompt.processed_sizes,
    )
    assert iou.function(answer, solution, on_second) == pytest.approx(1.0)
    on_first = {key: value for key, value in on_second.items() if key != "box_image"}
    # read in image 0's frame (x 2, y 2): [0, 0, 56, 84] against [0, 0, 14, 28]
    assert iou.function(answer, solution, on_first) == pytest.approx(14 * 28 / (56 * 84))
    with pytest.raises(ValueError, match="box_image.*2 image"):
        iou.function(answer, solution, {**on_second, "box_image": 2})


def test_box_rewards_with_a_non_qwen_processor():
    """Tiny LLaVA resizes every image to 28 x 28 (no crop): a 112 x 56 image's box [0, 0, 56, 28] (left
    half, top half) is [0, 0, 14, 14] in the model's frame."""
    _, processor = tiny_llava()
    image = Image.new("RGB", (112, 56))
    prompt = encode_prompt(processor, "where ?", [image])
    assert prompt.processed_sizes == [(28, 28)]
    metadata = reward_metadata(
        VLMRecord(images=[], problem="", solution="[0, 0, 56, 28]"), [(56, 112)], prompt.processed_sizes
    )
    (iou,) = build_reward_functions([_spec("iou")])
    assert iou.function("<answer>[0, 0, 14, 14]</answer>", "[0, 0, 56, 28]", metadata) == pytest.approx(1.0)


def test_unknown_processed_size_names_the_box_format_fix():
    """A tiling processor reports no frame: a 'resized' answer cannot be read, a stated convention can."""
    record = VLMRecord(images=[], problem="", solution="[0, 0, 56, 28]")
    metadata = reward_metadata(record, [(56, 112)], [])
    (iou,) = build_reward_functions([_spec("iou")])
    with pytest.raises(ValueError, match="reports none.*box_format to 'original' or 'norm1000'"):
        iou.function("<answer>[0, 0, 14, 14]</answer>", record.solution, metadata)
    normed = {**metadata, "box_format": "norm1000"}
    assert iou.function("<answer>[0, 0, 500, 500]</answer>", record.solution, normed) == pytest.approx(1.0)


def test_a_partial_size_list_is_refused():
    with pytest.raises(ValueError, match="1 processed image sizes for 2 images"):
        reward_metadata(VLMRecord(images=[], problem="", solution=""), [(5, 5), (6, 6)], [(2, 2)])


# ----------------------------------------------------------------------------------------------------
# the trainer routes failures through reward.nan_policy
# ----------------------------------------------------------------------------------------------------


def nan_on_odd_length(completion, solution, metadata):
    """NaN for completions of odd length (a reward that breaks on some samples), else a length score."""
    return float("nan") if len(completion) % 2 else len(completion) % 7 / 7


def _trainer_config(tmp_path, *overrides):
    from pathlib import Path

    from gen_rl.core.config import load_config
    from gen_rl.vlm.config import VLMConfig

    tiny = Path(__file__).resolve().parent.parent / "configs" / "vlm" / "tiny_colour_cpu.yaml"
    functions = (
        "reward.terms=[{name: exact}, {name: 'tests.test_vlm_scoring:nan_on_odd_length', weight: 0.5}]"
    )
    return load_config(
        VLMConfig, tiny, [f"log.output_dir={tmp_path}", "log.progress=false", functions, *overrides]
    )


def test_trainer_drops_failed_samples_from_statistics_and_loss(tmp_path):
    from gen_rl.vlm.trainer import VLMTrainer

    trainer = VLMTrainer(_trainer_config(tmp_path, "reward.nan_policy=drop", "sample.max_new_tokens=3"))
    scored = trainer.dynamic_sample(step=0)
    odd = torch.tensor([len(text) % 2 == 1 for text in scored.rollout.texts])
    assert 0 < int(odd.sum()) < len(odd)  # the test needs both kinds
    assert torch.isnan(scored.total_reward[odd]).all() and torch.isfinite(scored.total_reward[~odd]).all()
    assert (scored.advantages[odd] == 0).all()
    assert not scored.keep[odd].any()  # out of the loss
    # the group statistics ignore the dropped samples: GRPO advantages from the scored members only
    group_size, checked = trainer.config.sample.group_size, 0
    for start in range(0, len(odd), group_size):
        rows = [row for row in range(start, start + group_size) if not odd[row]]
        totals = [float(scored.total_reward[row]) for row in rows]
        if len(set(totals)) > 1:
            _assert_group_normalised(scored.advantages, dict(zip(rows, totals, strict=True)), [rows])
            checked += 1
    assert checked > 0


def test_trainer_counts_dropped_samples_in_its_metrics(tmp_path):
    import json

    from gen_rl.vlm.trainer import train

    config = _trainer_config(
        tmp_path, "reward.nan_policy=drop", "sample.max_new_tokens=3", "train.num_steps=2"
    )
    train(config)
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert sum(record["reward/dropped_samples"] for record in records) > 0
    assert all(math.isfinite(record["reward/mean"]) for record in records)


def test_trainer_aborts_on_a_failed_reward_under_abort(tmp_path):
    from gen_rl.vlm.trainer import VLMTrainer

    trainer = VLMTrainer(_trainer_config(tmp_path, "reward.nan_policy=abort", "sample.max_new_tokens=3"))
    with pytest.raises(RewardError, match="nan_on_odd_length.*returned nan"):
        for step in range(3):  # some completion of odd length turns up at once with a random tiny model
            trainer.dynamic_sample(step)


def test_a_cropping_processor_reports_no_frame_so_boxes_are_not_misread():
    """CLIP's default centre crop maps the image into its frame by a scale AND a shift: the processed size
    alone would mis-convert every box, so no size is reported and the record must state its convention."""
    _, processor = tiny_llava()
    processor.image_processor.do_center_crop = True
    processor.image_processor.crop_size = {"height": 28, "width": 28}
    processor.image_processor.size = {"shortest_edge": 28}
    prompt = encode_prompt(processor, "where ?", [Image.new("RGB", (112, 56))])
    assert prompt.processed_sizes == []
    metadata = reward_metadata(
        VLMRecord(images=[], problem="", solution=""), [(56, 112)], prompt.processed_sizes
    )
    (iou,) = build_reward_functions([_spec("iou")])
    with pytest.raises(ValueError, match="box_format"):
        iou.function("<answer>[0, 0, 14, 14]</answer>", "[0, 0, 56, 28]", metadata)
