"""The evaluation harness reproduces the trainer's own evaluation: the base model's scores equal the step-0 eval
record and a checkpoint's equal the record of the step it was saved at (same prompts, same seeds)."""

from __future__ import annotations

import csv
import json

import pytest
from trainer_helpers import small_config

from gen_rl.core.config import ConfigError
from gen_rl.evaluation import evaluate_models, summary_table, targets_of


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    from gen_rl.trainer import GenerationTrainer

    root = tmp_path_factory.mktemp("eval_run")
    config = small_config(
        root / "run", "train.num_steps=3", "train.lr=0.05", "eval.every_steps=3", "checkpoint.every_steps=3",
        "eval.max_prompts=3", "eval.samples_per_prompt=2",
    )  # fmt: skip
    GenerationTrainer(config).train()
    records = [json.loads(line) for line in (root / "run" / "metrics.jsonl").read_text().splitlines()]
    return root / "run", {r["step"]: r for r in records if "eval/reward/mean" in r}


def test_the_harness_reproduces_the_trainers_eval_records(trained_run, tmp_path):
    run, evals = trained_run
    config, targets = targets_of([str(run / "checkpoints" / "checkpoint-000003")])
    assert [target.name for target in targets] == ["base", "run/checkpoint-000003"]
    report = evaluate_models(config, targets, tmp_path / "compare", device="cpu")
    assert report.means["base"]["reward"] == pytest.approx(evals[0]["eval/reward/mean"], abs=1e-5)
    trained = report.means["run/checkpoint-000003"]
    assert trained["reward"] == pytest.approx(evals[3]["eval/reward/mean"], abs=1e-5)
    assert trained["gold/jpeg_compressibility"] == pytest.approx(
        evals[3]["eval/gold/jpeg_compressibility"], abs=1e-5
    )
    assert abs(trained["reward"] - report.means["base"]["reward"]) > 1e-4  # the two models differ

    rows = list(csv.DictReader(report.files["csv"].open()))
    assert len(rows) == 2 * 3 * 2  # models x prompts x samples
    assert {row["model"] for row in rows} == {"base", "run/checkpoint-000003"}
    assert report.files["grid"].stat().st_size > 1000
    table = report.files["markdown"].read_text()
    assert table.splitlines()[0] == "| model | reward | colour | gold/jpeg_compressibility |"


def test_a_run_folder_means_its_latest_checkpoint_and_errors_name_the_fix(trained_run, tmp_path):
    run, _ = trained_run
    _, targets = targets_of([str(run)], include_base=False)
    assert targets[0].lora == run / "checkpoints" / "checkpoint-000003" / "lora"
    with pytest.raises(ConfigError, match="neither a checkpoint folder"):
        targets_of([str(tmp_path)])
    with pytest.raises(ConfigError, match="at least one checkpoint"):
        targets_of([])


def test_summary_table_by_hand():
    table = summary_table({"base": {"reward": 0.5, "colour": 0.25}, "ckpt": {"reward": 0.75, "colour": 0.5}})
    assert table.splitlines() == [
        "| model | reward | colour |",
        "|---|---|---|",
        "| base | 0.5000 | 0.2500 |",
        "| ckpt | 0.7500 | 0.5000 |",
    ]
