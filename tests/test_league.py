"""The league harness (gen_rl/league.py): its compute meters count what they claim, and its table and plot hold
exactly the numbers of the runs' own metrics.jsonl, recomputed here from those files."""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path

import pytest
import yaml
from PIL import Image

from gen_rl.core.config import load_config
from gen_rl.league import (
    AT_KEY,
    EVALS_KEY,
    TIME_KEY,
    Budget,
    DenoiserCounter,
    RunResult,
    league_config_data,
    mean_spread,
    reference_evals_budget,
    run_league,
    write_report,
)
from gen_rl.trainer import GenerationTrainer
from gen_rl.trainer_config import GenerationConfig

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "configs" / "demo" / "tiny_flux_cpu.yaml"


def _small_task(tmp_path: Path) -> Path:
    """The colour demo shrunk: 2 groups of 4 per step, 2 eval prompts x 1 sample."""
    data = yaml.safe_load(DEMO.read_text())
    data["sample"].update(group_size=4, groups_per_step=2, groups_per_rollout=2)
    data["train"].update(samples_per_update=8, microbatch_size=8)
    data["eval"].update(max_prompts=2, samples_per_prompt=1)
    for key in ("train_prompts", "eval_prompts"):
        data["data"][key] = str(ROOT / data["data"][key])
    path = tmp_path / "small_colour.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.mark.parametrize("cfg_scale, rows_per_sample", [(1.0, 1), (3.0, 2)])
def test_counter_counts_every_denoiser_call_of_a_rollout(
    tmp_path, fresh_accelerator, cfg_scale, rows_per_sample
):
    """S steps x chunks calls; S x samples evaluations, doubled by CFG's batched negative branch; none while
    paused (evaluation)."""
    steps, groups, group_size, per_chunk = 3, 2, 2, 1
    config = load_config(
        GenerationConfig,
        DEMO,
        [
            f"sample.num_steps={steps}",
            f"sample.cfg_scale={cfg_scale}",
            f"sample.group_size={group_size}",
            f"sample.groups_per_step={groups}",
            f"sample.groups_per_rollout={per_chunk}",
            "train.samples_per_update=4",
            "train.microbatch_size=4",
            "train.check_log_probs=false",
            "eval.max_prompts=2",
            "eval.samples_per_prompt=1",
            f"log.output_dir={tmp_path}",
            "log.tracker=none",
            "log.progress=false",
        ],
    )
    trainer = GenerationTrainer(config)
    counter = DenoiserCounter(trainer.policy.denoiser)
    trainer.sample(0)
    chunks = groups // per_chunk
    assert counter.calls == steps * chunks
    assert counter.evaluations == steps * groups * group_size * rows_per_sample
    with counter.paused():
        trainer.evaluate(0)
    assert (counter.calls, counter.evaluations) == (
        steps * chunks,
        steps * groups * group_size * rows_per_sample,
    )
    counter.close()
    trainer.sample(1)
    assert counter.calls == steps * chunks  # the hook is gone


def test_mean_spread_is_the_sample_mean_and_std():
    values = [0.25, 0.5, 1.0]
    assert mean_spread(values) == pytest.approx((statistics.mean(values), statistics.stdev(values)))
    assert mean_spread([0.3]) == (0.3, 0.0)


def test_recipe_keys_replace_the_task_settings_and_the_rest_stays(tmp_path):
    """awm's recipe brings its algorithm section, ODE sampling and lr; the task keeps its reward and prompts."""
    task = ROOT / "configs" / "demo" / "league_jpeg.yaml"
    data = league_config_data(task, "awm", 2, tmp_path, ROOT / "configs" / "demo" / "algorithms")
    assert data["algorithm"]["name"] == "awm" and data["algorithm"]["clip_low"] == 0.2
    assert (
        data["sample"]["noise_level"] == 0.0 and data["train"]["lr"] == 3.0e-2 and data["train"]["seed"] == 2
    )
    assert data["reward"]["terms"][0]["name"] == "jpeg_compressibility"
    plain = league_config_data(task, "grpo_guard", 0, tmp_path, None)  # no recipe: the task's options it has
    assert plain["algorithm"] == {"name": "grpo_guard", "step_selection": "all", "clip_low": 1.0e-3}


def _run(task: str, algorithm: str, seed: int, evals_at_budget: int | None) -> RunResult:
    records = [{AT_KEY: "start", EVALS_KEY: 0}]
    if evals_at_budget is not None:
        records.append({AT_KEY: "time_point+time_budget", EVALS_KEY: evals_at_budget})
    return RunResult(task, algorithm, seed, Path("."), records=records)


def test_the_evaluations_budget_is_the_fewest_the_reference_seeds_reached():
    results = [
        _run("colour", "flow_grpo", 0, 640),
        _run("colour", "flow_grpo", 1, 576),
        _run("colour", "flow_grpo", 2, None),  # still training: no time-budget record
        _run("colour", "awm", 0, 100),
        _run("jpeg", "flow_grpo", 0, 10),
    ]
    assert reference_evals_budget(results, "colour", "flow_grpo") == 576
    assert reference_evals_budget(results, "colour", "dgpo") is None


def _cell(value: float) -> str:
    return f"{value:.4f} ± 0.0000"


def test_league_table_holds_the_runs_own_numbers(tmp_path, fresh_accelerator):
    """Two algorithms x one seed x a tiny budget through the real trainer: each table cell equals the value read
    back from that run's metrics.jsonl (the time budget's record is the first step boundary past the budget;
    the evaluations budget's record is the first at or past it), the PNG is drawn."""
    task = _small_task(tmp_path)
    budget = Budget(seconds=0.8, evals=1, points=2, max_time_factor=50.0, clock="cpu")
    out = tmp_path / "league"
    results = run_league(
        [task], ["flow_grpo", "awm"], 1, budget, out, GenerationTrainer, cpu_threads=1, log=lambda _: None
    )
    table, plot = write_report(results, budget, out)
    text = table.read_text()

    def records(algorithm: str) -> list[dict]:
        path = out / "small_colour" / algorithm / "seed0" / "metrics.jsonl"
        return [json.loads(line) for line in path.read_text().splitlines()]

    reference = records("flow_grpo")
    at_time = [r for r in reference if "time_budget" in r.get(AT_KEY, "")]
    assert len(at_time) == 1
    trained = [r for r in reference if AT_KEY not in r and "loss/total" in r]
    before = [r[TIME_KEY] for r in trained if r["step"] < at_time[0]["step"] - 1]
    assert at_time[0][TIME_KEY] >= budget.seconds and all(spent < budget.seconds for spent in before)
    evals_budget = 1  # reached after the first step: its evaluation, not the time budget's, is the cell
    assert at_time[0]["step"] >= 2
    for algorithm in ("flow_grpo", "awm"):
        runs = records(algorithm)
        evaluations = [r for r in runs if AT_KEY in r]
        start = evaluations[0]
        at_budget = next(r for r in evaluations if "time_budget" in r[AT_KEY])
        at_evals = next(r for r in evaluations if r[EVALS_KEY] >= evals_budget)
        row = next(line for line in text.splitlines() if line.startswith(f"| {algorithm} |"))
        cells = [cell.strip() for cell in row.strip("|").split("|")]
        assert cells[2] == _cell(start["eval/reward/mean"])
        assert cells[3] == _cell(at_budget["eval/reward/mean"])
        assert float(cells[5]) == at_budget[EVALS_KEY]
        assert cells[6] == _cell(at_evals["eval/reward/mean"])
        gold = at_budget["eval/gold/jpeg_compressibility"]
        assert f"{start['eval/gold/jpeg_compressibility']:.4f} -> {_cell(gold)}" in cells[8]
        assert math.isfinite(at_budget["eval/reward/mean"]) and at_budget["step"] >= 1
    with Image.open(plot) as image:
        assert image.size[0] > 500 and image.size[1] > 300


def test_an_algorithm_the_task_refuses_is_left_out_with_the_reason(tmp_path, fresh_accelerator):
    """DRaFT on the JPEG task (a non-differentiable reward): no run, a footnote quoting the trainer's refusal."""
    data = yaml.safe_load((ROOT / "configs" / "demo" / "league_jpeg.yaml").read_text())
    for key in ("train_prompts", "eval_prompts"):
        data["data"][key] = str(ROOT / data["data"][key])
    task = tmp_path / "jpeg.yaml"
    task.write_text(yaml.safe_dump(data))
    budget = Budget(seconds=0.1, clock="cpu")
    results = run_league(
        [task], ["draft"], 2, budget, tmp_path / "league", GenerationTrainer, log=lambda _: None
    )
    assert len(results) == 1 and "not differentiable" in results[0].refused
    table, _ = write_report(results, budget, tmp_path / "league")
    assert f"[^draft-jpeg]: draft: {results[0].refused}" in table.read_text()
