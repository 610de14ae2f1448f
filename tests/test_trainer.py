"""The generation trainer end to end on a tiny FLUX built in code: outputs, resume, NaN policy, LoRA export."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from trainer_helpers import SometimesNaN, lora_weights, small_config, without_timing

from gen_rl.checkpoint import CheckpointManager
from gen_rl.trainer import GenerationTrainer, RewardError

__all__ = ["SometimesNaN"]  # reached by the config through the dotted path trainer_helpers:SometimesNaN


def test_run_leaves_metrics_grids_curve_and_a_lora_diffusers_loads(tmp_path):
    config = small_config(tmp_path / "run", "train.samples_per_update=8")  # one update per step
    summary = GenerationTrainer(config).train()
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [0, 1, 2]  # two training steps + the final eval
    first = records[0]
    for key in (
        "reward/mean",
        "reward/std",
        "reward/colour/mean",
        "advantage/std",
        "loss/total",
        "policy/clip_fraction",
        "policy/approx_kl",
        "loss/kl",
        "policy/ratio_mean",
        "advantage/zero_std_group_fraction",
        "perf/samples_per_s",
        "perf/peak_memory_mb",
    ):
        assert key in first, key
    # one update per step, taken after every backward pass: the training path sees ratio == 1 throughout
    assert all(r["policy/ratio_dev_max"] < 1e-5 and r["policy/clip_fraction"] == 0 for r in records[:2])
    assert summary["first_eval_reward"] == records[0]["eval/reward/mean"]
    assert summary["last_eval_reward"] == records[-1]["eval/reward/mean"]
    grid = np.asarray(Image.open(tmp_path / "run" / "eval" / "step-000000.png"))
    assert grid.ndim == 3 and grid.shape[2] == 3
    assert (tmp_path / "run" / "reward_curve.png").stat().st_size > 1000
    latest = CheckpointManager(tmp_path / "run", keep_last=2).latest()
    assert latest.name == "checkpoint-000002"
    lora_file = latest / "lora" / "pytorch_lora_weights.safetensors"
    assert lora_file.is_file()

    from pipelines.tiny import tiny_flux_pipeline

    pipeline = tiny_flux_pipeline(seed=0, pixel_decoder=True)

    def final_latents():
        generator = torch.Generator().manual_seed(0)
        call = {"num_inference_steps": 2, "height": 16, "width": 16, "output_type": "latent"}
        return pipeline("a red hat", generator=generator, **call).images

    base = final_latents()
    pipeline.load_lora_weights(str(latest / "lora"))
    assert (final_latents() - base).abs().max() > 1e-4  # the trained adapter loads into diffusers and acts


def test_resume_after_a_stop_matches_an_uninterrupted_run(tmp_path):
    overrides = (
        "train.num_steps=4",
        "checkpoint.every_steps=2",
        "train.lr_schedule=cosine",
        "train.ema=true",
        "eval.every_steps=3",
    )
    straight = GenerationTrainer(small_config(tmp_path / "straight", *overrides))
    straight.train()

    stopped = GenerationTrainer(small_config(tmp_path / "stopped", *overrides))
    for step in range(3):  # the checkpoint after step 2 is written; step 3 is lost in the "crash"
        stopped.run_step(step)
    assert CheckpointManager(tmp_path / "stopped", 2).latest().name == "checkpoint-000002"
    del stopped
    resumed = GenerationTrainer(small_config(tmp_path / "stopped", *overrides), resume=True)
    assert resumed.start_step == 2
    resumed.train()

    expected = [without_timing(json.loads(line)) for line in (tmp_path / "straight" / "metrics.jsonl").open()]
    got = [without_timing(json.loads(line)) for line in (tmp_path / "stopped" / "metrics.jsonl").open()]
    assert [r["step"] for r in got] == [r["step"] for r in expected] == [0, 1, 2, 3, 4]
    for want, have in zip(expected, got, strict=True):
        assert have.keys() == want.keys()
        for key in want:
            assert have[key] == pytest.approx(want[key], rel=1e-5, abs=1e-7), (want["step"], key)
    for name, value in lora_weights(straight).items():
        torch.testing.assert_close(lora_weights(resumed)[name], value, rtol=0, atol=1e-6)


def test_nan_reward_is_dropped_and_counted(tmp_path, capsys):
    config = small_config(
        tmp_path / "run",
        "eval.every_steps=0",
        "train.num_steps=1",
        "data.eval_prompts=",
        "checkpoint.every_steps=0",
    )
    config.reward.terms[0].name = "trainer_helpers:SometimesNaN"
    config.reward.terms[0].kwargs = {"bad_word": "red"}
    trainer = GenerationTrainer(config)
    record = trainer.run_step(0)
    prompts = trainer.sample(0).rollout.prompts
    expected = sum(1 for index, p in enumerate(prompts) if "red" in p.split() and prompts.index(p) == index)
    assert expected > 0 and record["reward/dropped_samples"] == expected
    assert record["reward/SometimesNaN/nan"] == expected
    assert np.isfinite(record["loss/total"])
    first_bad = next(i for i, p in enumerate(prompts) if "red" in p.split())
    assert f"reward 'SometimesNaN' returned nan for sample(s) {first_bad}" in capsys.readouterr().out


def test_nan_reward_aborts_when_asked_and_keeps_the_last_checkpoint(tmp_path):
    config = small_config(
        tmp_path / "run",
        "eval.every_steps=0",
        "train.num_steps=3",
        "checkpoint.every_steps=1",
        "reward.nan_policy=abort",
        "data.eval_prompts=",
    )
    trainer = GenerationTrainer(config)
    trainer.run_step(0)
    trainer.reward_models = {"colour": SometimesNaN("red")}
    step = next(s for s in range(1, 50) if _has_red(trainer, s))
    with pytest.raises(RewardError, match=r"returned nan for sample 0 .*reward.nan_policy: drop"):
        trainer.run_step(step)
    latest = CheckpointManager(tmp_path / "run", 2).latest()
    assert latest.name == "checkpoint-000001" and (latest / "trainer_state.pt").is_file()


def _has_red(trainer, step):
    from gen_rl.data import prompt_indices_for_step

    indices = prompt_indices_for_step(len(trainer.train_set), step, 2, trainer.config.train.seed)
    return any("red" in trainer.train_set.prompts[i].split() for i in indices)
