"""Evaluation during training: the pass@k estimator, the eval metrics against scalar loops, eval records in
metrics.jsonl and eval_completions.jsonl during a tiny run, a training run left untouched by evaluating, the
tracker receiving the completions as text, and config errors."""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path

import pytest

from gen_rl.core.config import ConfigError, load_config
from gen_rl.vlm.config import VLMConfig
from gen_rl.vlm.evaluation import EvalSample, drop_completions_after, eval_metrics, pass_at_k
from gen_rl.vlm.trainer import train

TINY = Path(__file__).resolve().parent.parent / "configs" / "vlm" / "tiny_colour_cpu.yaml"
EVAL = ["eval.every_steps=2", "eval.synthetic=colour", "eval.synthetic_records=6", "eval.num_samples=3"]


def _config(tmp_path, *overrides: str) -> VLMConfig:
    return load_config(VLMConfig, TINY, [f"log.output_dir={tmp_path}", "log.progress=false", *overrides])


def _lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


# ---------------------------------------------------------------------------------------------------------
# maths
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n", [1, 3, 5, 6])
def test_pass_at_k_is_the_chance_that_k_of_n_samples_hold_a_pass(n):
    """Against enumeration: the fraction of the C(n, k) subsets of k samples that contain a passing one."""
    for passed in range(n + 1):
        outcomes = [True] * passed + [False] * (n - passed)
        for k in range(1, n + 1):
            subsets = list(itertools.combinations(outcomes, k))
            expected = sum(any(subset) for subset in subsets) / len(subsets)
            assert pass_at_k(n, passed, k) == pytest.approx(expected, abs=1e-12), (n, passed, k)
    assert pass_at_k(n, 1, 1) == pytest.approx(1 / n)


def test_pass_at_k_rejects_impossible_counts():
    with pytest.raises(ValueError, match="0 < k <= n"):
        pass_at_k(3, 1, 4)
    with pytest.raises(ValueError, match="0 <= c <= n"):
        pass_at_k(3, 4, 1)


def _sample(record, mode, sample, scores, weights):
    total = sum(weights[name] * (0.0 if math.isnan(value) else value) for name, value in scores.items())
    return EvalSample(record, f"r{record}", mode, sample, "text", 2 + sample, scores, total)


def test_eval_metrics_match_scalar_loops():
    """Two rewards, one of which ("iou") applies to record 1 only (NaN elsewhere), k = 3 samples per record."""
    weights = {"exact": 1.0, "iou": 0.5}
    nan = float("nan")

    def scores(exact, iou=nan):
        return {"exact": exact, "iou": iou}

    table = {  # record -> (greedy scores, [sample scores])
        0: (scores(1.0), [scores(0.0), scores(1.0), scores(0.0)]),
        1: (scores(0.0, 0.4), [scores(0.0, 1.0), scores(0.0, 0.7), scores(0.0, 1.0)]),
        2: (scores(0.0), [scores(0.0), scores(0.0), scores(0.0)]),
    }
    samples = []
    for record, (greedy, sampled) in table.items():
        samples.append(_sample(record, "greedy", 0, greedy, weights))
        samples += [_sample(record, "sample", index, scores, weights) for index, scores in enumerate(sampled)]
    metrics = eval_metrics(samples, ["exact", "iou"], num_samples=3, pass_threshold=1.0)

    assert metrics["eval/records"] == 3
    assert metrics["eval/reward/exact/greedy"] == pytest.approx(1 / 3)
    assert metrics["eval/reward/iou/greedy"] == pytest.approx(0.4)  # only record 1 has an iou score
    assert metrics["eval/reward/exact/mean@3"] == pytest.approx((1 / 3 + 0 + 0) / 3)
    assert metrics["eval/reward/iou/mean@3"] == pytest.approx((1.0 + 0.7 + 1.0) / 3)
    # pass@3: any of the 3 samples passes; pass@1: the pass rate per record
    assert metrics["eval/reward/exact/pass@3"] == pytest.approx((1 + 0 + 0) / 3)
    assert metrics["eval/reward/iou/pass@3"] == pytest.approx(1.0)
    assert metrics["eval/reward/exact/pass@1"] == pytest.approx((1 / 3 + 0 + 0) / 3)
    assert metrics["eval/reward/iou/pass@1"] == pytest.approx(2 / 3)
    # the generation trainer's name for a reward's eval mean: the sampled completions' (not the greedy ones')
    assert metrics["eval/reward/exact"] == metrics["eval/reward/exact/mean@3"]
    assert metrics["eval/reward/iou"] == metrics["eval/reward/iou/mean@3"]
    greedy_totals = [1.0, 0.5 * 0.4, 0.0]
    assert metrics["eval/reward/greedy"] == pytest.approx(sum(greedy_totals) / 3)
    sample_totals = [(0 + 1 + 0) / 3, 0.5 * (1.0 + 0.7 + 1.0) / 3, 0.0]
    assert metrics["eval/reward/mean"] == pytest.approx(sum(sample_totals) / 3)
    lengths = [2] * 3 + [2, 3, 4] * 3
    assert metrics["eval/completion/length_mean"] == pytest.approx(sum(lengths) / len(lengths))


def test_dropped_samples_are_left_out_not_scored_zero():
    """A sample a failing reward left unscored (reward.nan_policy: drop) is out of every mean and counted."""
    nan = float("nan")
    samples = [
        EvalSample(0, "r0", "greedy", 0, "a", 1, {"exact": 1.0}, 1.0),
        EvalSample(1, "r1", "greedy", 0, "b", 1, {"exact": nan}, nan),
        EvalSample(0, "r0", "sample", 0, "a", 1, {"exact": 1.0}, 1.0),
        EvalSample(0, "r0", "sample", 1, "c", 1, {"exact": nan}, nan),
        EvalSample(1, "r1", "sample", 0, "d", 1, {"exact": 0.0}, 0.0),
        EvalSample(1, "r1", "sample", 1, "e", 1, {"exact": 0.0}, 0.0),
    ]
    metrics = eval_metrics(samples, ["exact"], num_samples=2, pass_threshold=1.0)
    assert metrics["eval/reward/greedy"] == metrics["eval/reward/exact/greedy"] == 1.0  # not (1 + 0) / 2
    # per record first (record 0: its one scored sample, 1.0; record 1: 0.0), then over records: not 1 / 3
    assert metrics["eval/reward/exact/mean@2"] == metrics["eval/reward/mean"] == 0.5
    # record 0 passes with its one scored sample (k capped at 1)
    assert metrics["eval/reward/exact/pass@2"] == 0.5
    assert metrics["eval/reward/dropped_samples"] == 2


def test_the_evaluator_drops_failed_rewards_instead_of_scoring_zero(tmp_path):
    """Through the real Evaluator (tiny Qwen2-VL, real processor): a reward that returns NaN for one record is
    dropped under nan_policy drop (out of the means, counted) and stops evaluation under abort."""
    from gen_rl.vlm.data import load_images, read_records
    from gen_rl.vlm.evaluation import Evaluator
    from gen_rl.vlm.policy import eos_token_ids
    from gen_rl.vlm.rollout import SamplingSettings, encode_prompt, vision_token_ids
    from gen_rl.vlm.scoring import RewardError, RewardFunction, reward_metadata
    from gen_rl.vlm.synthetic import write_colour_dataset
    from gen_rl.vlm.tiny import tiny_qwen2_vl

    model, processor = tiny_qwen2_vl()
    records = read_records(write_colour_dataset(tmp_path, 4), tmp_path)  # red, green, blue, yellow

    def encode(record):
        images = load_images(record)
        prompt = encode_prompt(processor, record.problem, images)
        return prompt, reward_metadata(record, [(i.height, i.width) for i in images], prompt.processed_sizes)

    def half(text, solution, metadata):  # fails on the red record, 0.5 elsewhere
        return float("nan") if solution == "red" else 0.5

    settings = SamplingSettings(
        3, 1.0, eos_token_ids(model, processor), 0, vision_token_ids(model.config, processor)
    )
    rewards = [RewardFunction("half", 1.0, (), half)]
    kwargs = {"greedy": True, "num_samples": 2, "pass_threshold": 0.5}
    evaluator = Evaluator(
        records, rewards, settings, encode, nan_policy="drop", report=lambda line: None, **kwargs
    )
    samples = evaluator.local_samples(model, processor, step=1, rank=0, world=1)
    from gen_rl.vlm.evaluation import eval_metrics

    metrics = eval_metrics(samples, ["half"], 2, 0.5)
    assert metrics["eval/reward/dropped_samples"] == 3  # the red record's greedy + 2 samples
    assert metrics["eval/reward/greedy"] == metrics["eval/reward/mean"] == 0.5
    assert metrics["eval/reward/half/mean@2"] == metrics["eval/reward/half"] == 0.5
    strict = Evaluator(records, rewards, settings, encode, nan_policy="abort", **kwargs)
    with pytest.raises(RewardError):
        strict.local_samples(model, processor, step=1, rank=0, world=1)


def test_eval_metrics_without_samples_use_the_greedy_completions():
    samples = [
        _sample(0, "greedy", 0, {"exact": 1.0}, {"exact": 1.0}),
        _sample(1, "greedy", 0, {"exact": 0.0}, {"exact": 1.0}),
    ]
    metrics = eval_metrics(samples, ["exact"], num_samples=0, pass_threshold=1.0)
    assert metrics["eval/reward/mean"] == metrics["eval/reward/greedy"] == 0.5
    assert metrics["eval/reward/exact"] == metrics["eval/reward/exact/greedy"]
    assert not any("@" in key for key in metrics)


# ---------------------------------------------------------------------------------------------------------
# during training
# ---------------------------------------------------------------------------------------------------------


def test_eval_metrics_and_completions_are_written_during_a_tiny_run(tmp_path):
    train(_config(tmp_path, "train.num_steps=5", *EVAL))
    records = _lines(tmp_path / "metrics.jsonl")
    assert [record["step"] for record in records] == [1, 2, 3, 4, 5]
    evaluated = [record["step"] for record in records if "eval/reward/mean" in record]
    assert evaluated == [2, 4, 5]  # every 2 steps and after the last
    for record in records:
        if record["step"] in evaluated:
            assert record["eval/records"] == 6
            for key in (
                "eval/reward/greedy",
                "eval/reward/exact/greedy",
                "eval/reward/exact/mean@3",
                "eval/reward/exact/pass@3",
                "eval/reward/exact/pass@1",
            ):
                assert 0.0 <= record[key] <= 1.0, key
            pass_1, mean_3 = record["eval/reward/exact/pass@1"], record["eval/reward/exact/mean@3"]
            assert pass_1 == pytest.approx(mean_3)  # a 0/1 reward
            assert record["eval/reward/exact/pass@3"] >= record["eval/reward/exact/pass@1"]
    completions = _lines(tmp_path / "eval_completions.jsonl")
    assert len(completions) == 3 * 6 * (1 + 3)  # 3 evals x 6 records x (greedy + 3 samples)
    at_step_4 = [entry for entry in completions if entry["step"] == 4]
    assert sorted({entry["mode"] for entry in at_step_4}) == ["greedy", "sample"]
    assert {"id", "problem", "solution", "completion", "reward", "rewards"} <= set(at_step_4[0])
    # the logged metrics are the JSONL completions' rewards, recomputed here
    step4 = next(record for record in records if record["step"] == 4)
    greedy = [entry["rewards"]["exact"] for entry in at_step_4 if entry["mode"] == "greedy"]
    sampled = [entry["rewards"]["exact"] for entry in at_step_4 if entry["mode"] == "sample"]
    assert step4["eval/reward/exact/greedy"] == pytest.approx(sum(greedy) / 6)
    assert step4["eval/reward/exact/mean@3"] == pytest.approx(sum(sampled) / 18)
    by_record = {}
    for entry in at_step_4:
        if entry["mode"] == "sample":
            by_record.setdefault(entry["id"], []).append(entry["rewards"]["exact"] == 1.0)
    assert step4["eval/reward/exact/pass@3"] == pytest.approx(sum(any(v) for v in by_record.values()) / 6)


def test_evaluating_leaves_the_training_run_unchanged(tmp_path):
    """Eval draws from a forked RNG and never touches the optimizer: training metrics are identical."""
    train(_config(tmp_path / "plain", "train.num_steps=4"))
    train(_config(tmp_path / "evaluated", "train.num_steps=4", *EVAL))
    plain, evaluated = (
        _lines(tmp_path / "plain" / "metrics.jsonl"),
        _lines(tmp_path / "evaluated" / "metrics.jsonl"),
    )
    for before, after in zip(plain, evaluated, strict=True):
        for key in (
            "reward/mean",
            "loss/total",
            "optim/grad_norm",
            "advantage/std",
            "completion/length_mean",
        ):
            assert after[key] == before[key], key
    assert not any(key.startswith("eval/") for record in plain for key in record)
    assert not (tmp_path / "plain" / "eval_completions.jsonl").exists()


def test_held_out_greedy_reward_rises_with_training(tmp_path):
    """Eval after every step: the held-out greedy reward (a separate seed's records) starts at chance or
    below and ends above 0.5, the training task's level."""
    overrides = [
        "eval.every_steps=1",
        "eval.synthetic_records=8",
        "eval.num_samples=0",
        "log.log_completions=0",
    ]
    train(_config(tmp_path, "train.num_steps=40", "eval.synthetic=colour", *overrides))
    records = _lines(tmp_path / "metrics.jsonl")
    greedy = [record["eval/reward/exact/greedy"] for record in records]
    assert max(greedy[-5:]) > 0.5 and greedy[0] <= 0.25
    completions = _lines(tmp_path / "eval_completions.jsonl")
    assert {entry["mode"] for entry in completions} == {"greedy"}


def test_eval_completions_reach_the_tracker_as_text(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    train(
        _config(
            tmp_path,
            "train.num_steps=2",
            "log.tracker=tensorboard",
            "log.run_name=tb",
            *EVAL,
            "eval.tracker_completions=5",
        )
    )
    events = [path for path in tmp_path.rglob("events.out.tfevents.*")]
    assert events
    accumulator = EventAccumulator(str(events[0].parent), size_guidance={"tensors": 0, "scalars": 0})
    accumulator.Reload()
    tags = accumulator.Tags()
    assert "eval/reward/exact/pass@3" in tags["scalars"] and "reward/mean" in tags["scalars"]
    text_tags = [tag for tag in tags["tensors"] if tag.startswith("eval/completions")]
    assert text_tags
    text = accumulator.Tensors(text_tags[0])[0].tensor_proto.string_val[0].decode()
    assert text.count("\n") == 1 + 5 and "| id | mode | completion | reward |" in text
    # the training completions too (log.log_completions of them per step)
    train_tags = [tag for tag in tags["tensors"] if tag.startswith("train/completions")]
    assert train_tags and len(accumulator.Tensors(train_tags[0])) == 2  # one table per step


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["eval.every_steps=2"], "needs held-out records"),
        (["eval.every_steps=2", "eval.synthetic=shapes"], "eval.synthetic must be"),
        (
            ["eval.every_steps=2", "eval.synthetic=colour", "eval.greedy=false", "eval.num_samples=0"],
            "nothing would",
        ),
        (["eval.every_steps=-1"], "must be >= 0"),
        (["log.tracker=mlflow"], "log.tracker must be"),
        (["data.video.num_frames=0", "data.video.fps=0"], "num_frames > 0"),
        (["data.video.min_pixels=5000", "data.video.max_pixels=3000"], "exceeds data.video.max_pixels"),
    ],
)
def test_eval_and_video_config_errors_name_the_key(tmp_path, overrides, message):
    with pytest.raises(ConfigError, match=message):
        _config(tmp_path, *overrides).validate()


def test_two_processes_evaluate_the_whole_set_once(tmp_path):
    """Records are split over processes (7 records: 4 + 3) and gathered: the greedy metrics and completions
    equal one process's; every record is evaluated exactly once per mode and sample."""
    import os
    import socket
    import subprocess
    import sys

    from vlm_eval_worker import evaluate

    worker = Path(__file__).resolve().parent / "vlm_eval_worker.py"
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    environment = {
        **os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", "HF_HUB_OFFLINE": "1",
        "PYTHONPATH": os.pathsep.join([str(worker.parent), os.environ.get("PYTHONPATH", "")]),
    }  # fmt: skip
    command = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
        "--main_process_port", str(port), str(worker), str(tmp_path / "two"),
    ]  # fmt: skip
    finished = subprocess.run(command, env=environment, capture_output=True, text=True, timeout=600)
    assert finished.returncode == 0, finished.stderr[-3000:]
    two = json.loads((tmp_path / "two" / "metrics.json").read_text())
    one = evaluate(tmp_path / "one")
    assert two["eval/records"] == one["eval/records"] == 7
    for key in ("eval/reward/greedy", "eval/reward/exact/greedy"):
        assert two[key] == pytest.approx(one[key]), key
    two_lines, one_lines = (
        _lines(tmp_path / "two" / "eval_completions.jsonl"),
        _lines(tmp_path / "one" / "eval_completions.jsonl"),
    )
    assert sorted((e["id"], e["mode"], e["sample"]) for e in two_lines) == sorted(
        (e["id"], e["mode"], e["sample"]) for e in one_lines
    )
    assert len(two_lines) == 7 * (1 + 2)
    greedy = {e["id"]: e["completion"] for e in one_lines if e["mode"] == "greedy"}
    assert {e["id"]: e["completion"] for e in two_lines if e["mode"] == "greedy"} == greedy


def test_a_resumed_run_drops_the_evaluations_after_its_checkpoint(tmp_path):
    path = tmp_path / "eval_completions.jsonl"
    path.write_text(
        "".join(json.dumps({"step": step, "completion": str(step)}) + "\n" for step in (2, 2, 4, 6, 6))
    )
    drop_completions_after(path, 4)
    assert [entry["step"] for entry in _lines(path)] == [2, 2, 4]
    drop_completions_after(tmp_path / "missing.jsonl", 4)  # nothing to do
    assert not (tmp_path / "missing.jsonl").exists()


def test_eval_data_files_are_read_and_checked_at_start_up(tmp_path):
    """eval.data: JSONL records resolved against data.image_root, checked before training like the training
    data (a missing image stops the run at start-up, naming the file and line)."""
    from gen_rl.data import DataError
    from gen_rl.vlm.synthetic import write_colour_dataset

    held_out = write_colour_dataset(tmp_path / "held_out", 5, seed=7)
    overrides = [
        "train.num_steps=2", "eval.every_steps=2", f"eval.data=[{held_out}]",
        f"data.image_root={tmp_path / 'held_out'}", "eval.num_samples=2",
    ]  # fmt: skip
    train(_config(tmp_path / "run", *overrides))
    evaluated = [record for record in _lines(tmp_path / "run" / "metrics.jsonl") if "eval/records" in record]
    assert [record["step"] for record in evaluated] == [2] and evaluated[0]["eval/records"] == 5
    ids = {entry["id"] for entry in _lines(tmp_path / "run" / "eval_completions.jsonl")}
    assert ids == {f"colour-{index}" for index in range(5)}

    with held_out.open("a") as handle:
        handle.write(json.dumps({"image": "images/missing.png", "problem": "q", "solution": "red"}) + "\n")
    with pytest.raises(DataError, match="colour.jsonl:6.*missing.png does not exist"):
        train(_config(tmp_path / "bad", *overrides))
    assert not (tmp_path / "bad" / "metrics.jsonl").exists()
