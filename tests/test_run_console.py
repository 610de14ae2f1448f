"""What a person sees of a run: the start-up summary, "resumed from checkpoint-N", progress-bar names equal to the
metrics' names, the reward curve refreshed at each evaluation, eval pictures in the tracker, the closing words."""

from __future__ import annotations

import pytest
from trainer_helpers import ROOT, small_config

from gen_rl.loop import PROGRESS_KEYS, closing_text, progress_fields, startup_text


def test_progress_fields_use_the_metrics_names_and_values():
    record = {"step": 3, "reward/mean": 0.51234, "policy/approx_kl": 2.5e-5, "loss/total": -0.1, "other": 1.0}
    fields = progress_fields(record)
    assert set(fields) == {"reward/mean", "policy/approx_kl", "loss/total"} <= set(PROGRESS_KEYS)
    assert float(fields["policy/approx_kl"]) == pytest.approx(2.5e-5)  # the same quantity as in metrics.jsonl
    assert float(fields["reward/mean"]) == pytest.approx(0.51234, rel=1e-3)


def test_startup_and_closing_text():
    lines = [("model", "flux tiny:flux"), ("output", "outputs/x")]
    fresh = startup_text(lines, 0, 10, None)
    assert "model   flux tiny:flux" in fresh and "starting at step 0 of 10" in fresh
    resumed = startup_text(lines, 4, 10, "outputs/x/checkpoint-000004")
    assert "resumed from outputs/x/checkpoint-000004 (step 4 of 10)" in resumed
    records = [
        {"step": 0, "eval/reward/mean": 0.4, "reward/mean": 0.41, "eval/gold/jpeg": 0.2},
        {"step": 1, "reward/mean": 0.45},
        {"step": 2, "eval/reward/mean": 0.6, "eval/gold/jpeg": 0.1},
    ]
    text = closing_text(records, 0, 2, 125.0, "outputs/x")
    assert "finished steps 0..2 in 2 min 5 s" in text
    assert "held-out reward: 0.4000 at step 0 -> 0.6000 at step 2" in text
    assert "training reward: 0.4100 at step 0 -> 0.4500 at step 1" in text
    assert "gold jpeg (not optimised): 0.2000 -> 0.1000" in text


def test_a_run_prints_its_summary_refreshes_the_curve_and_logs_eval_images(tmp_path, capsys):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from gen_rl.trainer import GenerationTrainer

    overrides = ("log.tracker=tensorboard", "eval.every_steps=1", "train.num_steps=2", "train.cpu_threads=1")
    trainer = GenerationTrainer(small_config(tmp_path / "run", *overrides))
    curve = tmp_path / "run" / "reward_curve.png"
    trainer.run_step(0)
    assert curve.is_file()  # drawn at the first evaluation, not only when the run ends
    trainer.run_step(1)
    trainer.finish(2)
    out = capsys.readouterr().out
    text = startup_text(trainer.describe_run(), 0, 2, None)
    assert "processes  1 on cpu, 1 CPU threads" in text
    assert "batch      2 prompts x 4 samples per step; 2 updates of 4 per process" in text
    trainer.accelerator.end_training()
    runs = list((tmp_path / "run").rglob("events.out.tfevents.*"))
    assert runs, out
    accumulator = EventAccumulator(str(runs[0].parent), size_guidance={"images": 0}).Reload()
    assert "eval/samples" in accumulator.Tags()["images"], accumulator.Tags()
    assert {event.step for event in accumulator.Images("eval/samples")} >= {0, 1}


def test_resume_prints_the_checkpoint_it_continues_from(tmp_path, capsys):
    from gen_rl.trainer import GenerationTrainer

    config = small_config(
        tmp_path / "run", "train.num_steps=2", "checkpoint.every_steps=1", "eval.every_steps=0"
    )
    GenerationTrainer(config).train()
    first = capsys.readouterr().out
    assert "starting at step 0 of 2" in first and "[gen-rl] finished steps 0..2" in first
    longer = small_config(
        tmp_path / "run", "train.num_steps=3", "checkpoint.every_steps=1", "eval.every_steps=0"
    )
    GenerationTrainer(longer, resume=True).train()
    second = capsys.readouterr().out
    assert "resumed from" in second and "checkpoint-000002 (step 2 of 3)" in second


def test_a_video_evaluation_writes_one_playable_mp4_per_prompt(tmp_path):
    """The tiny Wan: each eval prompt gets an MP4 with its samples side by side, readable with the expected frame
    count and size, plus the labelled frame-strip grid."""
    from gen_rl.core.video_io import read_video
    from gen_rl.trainer import GenerationTrainer

    config = small_config(
        tmp_path / "run", "eval.samples_per_prompt=2", "log.monitors=false",
        base_config=ROOT / "configs" / "demo" / "tiny_wan_cpu.yaml",
    )  # fmt: skip
    trainer = GenerationTrainer(config)
    record = trainer.evaluate(0)
    assert "eval/reward/mean" in record
    folder = tmp_path / "run" / "eval" / "step-000000"
    videos = sorted(folder.glob("prompt-*.mp4"))
    assert [path.name for path in videos] == ["prompt-00.mp4", "prompt-01.mp4"]
    frames = read_video(videos[0])
    assert frames.shape == (config.sample.num_frames, 32, 2 * 32, 3)  # two samples side by side
    assert (tmp_path / "run" / "eval" / "step-000000.png").stat().st_size > 1000
