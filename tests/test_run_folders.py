"""Run folders: crash-safe checkpoint commits, one run per folder, resume with a changed config, the metrics file.

The checkpoint tests "crash" at each named commit stage in-process (``GEN_RL_FAULT=enospc:<stage>`` raises
there, leaving the folder exactly as a kill would) and check what a resume finds; the trainer tests run the real
trainer on the tiny demo config. ``tests/test_fault_injection.py`` does the same with real SIGKILLs.
"""

from __future__ import annotations

import json
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from trainer_helpers import DEMO, lora_weights, small_config

from gen_rl import faults
from gen_rl.checkpoint import (
    MANIFEST,
    CheckpointManager,
    CheckpointWriteError,
    RunError,
    problem_of,
    publish,
    write_manifest,
)
from gen_rl.metrics import MetricsLog, read_metrics
from gen_rl.run_folder import ConfigChangeError, RunFolderError, claim, holdings, read_history
from gen_rl.trainer import GenerationTrainer
from rewards import Reward, RewardOutput

ONE_STEP = ("checkpoint.every_steps=1", "eval.every_steps=0", "train.num_steps=1")


@pytest.fixture(scope="module")
def _trained_once(tmp_path_factory):
    folder = tmp_path_factory.mktemp("trained") / "run"
    GenerationTrainer(small_config(folder, *ONE_STEP)).train()
    return folder


@pytest.fixture
def finished_run(_trained_once, tmp_path):
    """A copy of a finished one-step run (checkpoint-000001; metrics rows: step 0, final eval) for this test."""
    return Path(shutil.copytree(_trained_once, tmp_path / "run"))


@pytest.fixture
def crash_at(monkeypatch):
    """``crash_at("checkpoint.renamed")``: the next arrival at that stage raises OSError, as a kill would stop."""

    def arm(stage: str, count: int = 1) -> None:
        faults._arrivals.clear()
        monkeypatch.setenv(faults.ENV, f"enospc:{stage}@{count}")

    yield arm
    faults._arrivals.clear()


def _save(manager: CheckpointManager, step: int, content: bytes, run_id: str = "run-a") -> None:
    folder = manager.staging_dir(step)
    (folder / "weights.bin").write_bytes(content)
    (folder / "sub").mkdir()
    (folder / "sub" / "state.json").write_text(json.dumps({"step": step}))
    manager.commit(step, run_id)


def _content(path: Path) -> bytes:
    return (path / "weights.bin").read_bytes()


# ----- the commit protocol ---------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("stage", "expected"),
    [
        ("checkpoint.staged", b"old"),  # nothing synced: the new copy is not a checkpoint
        ("checkpoint.synced", b"old"),  # synced but no manifest: still not a checkpoint
        ("checkpoint.manifest", b"old"),  # complete but not swapped in: the copy in place is taken
        ("checkpoint.aside", b"new"),  # old copy set aside, new one complete but staged: promoted
        ("checkpoint.renamed", b"new"),
    ],
)
def test_a_crash_at_any_commit_stage_leaves_a_complete_checkpoint(tmp_path, crash_at, stage, expected):
    manager = CheckpointManager(tmp_path, keep_last=2)
    _save(manager, 1, b"first")
    _save(manager, 2, b"old")
    crash_at(stage)
    with pytest.raises(OSError):
        _save(manager, 2, b"new")  # a re-save of step 2 (after resuming from 1) exercises the swap
    chosen, _ = manager.newest_complete("run-a")
    assert chosen == manager.path(2) and _content(chosen) == expected
    assert _content(manager.path(1)) == b"first"


def test_a_crash_mid_prune_leaves_no_half_deleted_checkpoint(tmp_path, crash_at):
    manager = CheckpointManager(tmp_path, keep_last=1)
    _save(manager, 1, b"one")
    crash_at("checkpoint.pruning")
    with pytest.raises(OSError):
        _save(manager, 2, b"two")
    assert [path.name for path in manager.all()] == ["checkpoint-000002"]  # 1 went to .trash first
    assert manager.newest_complete("run-a") == (manager.path(2), [])
    _save(manager, 3, b"three")
    assert sorted(path.name for path in manager.root.iterdir()) == ["checkpoint-000003"]


def test_resume_skips_every_broken_newer_folder_and_says_why(tmp_path):
    manager = CheckpointManager(tmp_path, keep_last=9)
    for step in range(1, 8):
        _save(manager, step, b"x" * step)
    (manager.path(7) / MANIFEST).unlink()
    (manager.path(6) / MANIFEST).write_text("{not json")
    (manager.path(5) / "weights.bin").write_bytes(b"y" * 5)  # same size, other bytes
    (manager.path(4) / "weights.bin").write_bytes(b"x")
    (manager.path(3) / "sub" / "state.json").unlink()
    write_manifest(manager.path(2), 2, "run-b")
    chosen, skipped = manager.newest_complete("run-a")
    assert chosen == manager.path(1)
    assert skipped == [
        "checkpoint-000007: no manifest.json (its save was interrupted before it completed)",
        "checkpoint-000006: manifest.json is unreadable (Expecting property name enclosed in double quotes: "
        "line 1 column 2 (char 1))",
        "checkpoint-000005: weights.bin does not match its sha256 in the manifest (corrupted)",
        "checkpoint-000004: weights.bin has 1 bytes, its manifest says 4",
        "checkpoint-000003: sub/state.json is missing",
        "checkpoint-000002: belongs to run run-b, not to this folder's run run-a",
    ]


def test_pruning_touches_only_this_runs_checkpoints(tmp_path):
    manager = CheckpointManager(tmp_path, keep_last=1)
    _save(manager, 9, b"theirs", run_id="run-b")
    for step in (1, 2, 3):
        _save(manager, step, b"mine", run_id="run-a")
    assert [path.name for path in manager.all()] == ["checkpoint-000003", "checkpoint-000009"]
    assert _content(manager.path(9)) == b"theirs"


# ----- one run per folder ----------------------------------------------------------------------------------
def test_a_fresh_run_into_a_used_folder_is_refused_with_the_three_ways_on(finished_run):
    with pytest.raises(RunFolderError) as refused:
        GenerationTrainer(small_config(finished_run, *ONE_STEP))
    message = str(refused.value)
    assert "\n" not in message and f"log.output_dir {finished_run} already holds a run" in message
    assert "1 checkpoint(s), newest checkpoint-000001" in message and "metrics.jsonl with 2 row(s)" in message
    for way in ("--resume", "another log.output_dir", "--overwrite"):
        assert way in message


def _train_script(*args: str) -> tuple[list[str], list[str]]:
    """Run gen_rl/train.py with ``args``: (stdout lines ending with 'exit <code> <torch imported?>', stderr lines)."""
    script = (
        "import runpy, sys\n"
        f"sys.argv = ['gen_rl/train.py', *{list(args)!r}]\n"
        "try:\n    runpy.run_path('gen_rl/train.py', run_name='__main__')\n"
        "except SystemExit as exit_:\n    print('exit', exit_.code, 'torch' in sys.modules)\n"
    )
    done = subprocess.run([sys.executable, "-c", script], cwd=DEMO.parents[2], capture_output=True, text=True)
    return done.stdout.splitlines(), done.stderr.splitlines()


def test_the_command_line_refuses_a_used_folder_in_one_line_before_importing_torch(tmp_path):
    root = tmp_path / "run"
    claim(root, resume=False, overwrite=False)
    (root / "metrics.jsonl").write_text('{"step": 0}\n')
    out, err = _train_script("--config", str(DEMO), f"log.output_dir={root}", "log.tracker=none")
    assert out == ["exit 1 False"], err
    assert err == [
        f"error: log.output_dir {root} already holds a run ({'; '.join(holdings(root))}): continue it with "
        "--resume, choose another log.output_dir, or pass --overwrite to move it aside to run.previous-<time> "
        "(nothing is deleted)"
    ]


def test_the_command_line_refuses_a_changed_lora_rank_on_resume_before_importing_torch(finished_run):
    out, err = _train_script(
        "--config",
        str(DEMO),
        "--resume",
        f"log.output_dir={finished_run}",
        "log.tracker=none",
        "model.lora_rank=4",
    )
    assert out == ["exit 1 False"], err
    assert len(err) == 1 and err[0].startswith(f"error: --resume from {finished_run / 'checkpoints'}")
    assert "model.lora_rank: 8 -> 4" in err[0] and "the saved state depends on them" in err[0]


def test_overwrite_moves_the_old_run_aside_and_deletes_nothing(tmp_path):
    root = tmp_path / "run"
    old = claim(root, resume=False, overwrite=False)
    (root / "checkpoints" / "checkpoint-000004").mkdir(parents=True)
    (root / "checkpoints" / "checkpoint-000004" / "weights.bin").write_bytes(b"old weights")
    (root / "metrics.jsonl").write_text('{"step": 0}\n')
    before = {path.relative_to(root): path.read_bytes() for path in root.rglob("*") if path.is_file()}
    with pytest.raises(RunFolderError, match="pass only one"):
        claim(root, resume=True, overwrite=True)
    new = claim(root, resume=False, overwrite=True)
    (moved,) = [path for path in tmp_path.iterdir() if path.name.startswith("run.previous-")]
    after = {path.relative_to(moved): path.read_bytes() for path in moved.rglob("*") if path.is_file()}
    assert after == before  # every file of the old run, byte for byte
    assert new.run_id != old.run_id and sorted(path.name for path in root.iterdir()) == ["run.json"]
    assert json.loads((moved / "run.json").read_text())["run_id"] == old.run_id


def test_resume_names_what_it_skips_and_clears_what_interrupted_saves_left(finished_run, capsys):
    checkpoints = finished_run / "checkpoints"
    (checkpoints / ".tmp-checkpoint-000002").mkdir()  # a save killed before its manifest
    (checkpoints / ".tmp-checkpoint-000002" / "model.safetensors").write_bytes(b"half")
    (checkpoints / ".trash-checkpoint-000000").mkdir()  # a prune killed before its delete
    resumed = GenerationTrainer(small_config(finished_run, *ONE_STEP), resume=True)
    assert resumed.start_step == 1
    assert capsys.readouterr().out.splitlines() == [
        "[gen-rl] --resume: skipped .tmp-checkpoint-000002: no manifest.json (its save was interrupted before "
        "it completed)",
        f"[gen-rl] --resume: continuing from {checkpoints / 'checkpoint-000001'} (step 1)",
    ]
    assert [path.name for path in checkpoints.iterdir()] == ["checkpoint-000001"]


def test_resume_without_a_checkpoint_starts_fresh_metrics(tmp_path):
    config = small_config(tmp_path / "run", "checkpoint.every_steps=0", "eval.every_steps=0")
    trainer = GenerationTrainer(config)
    trainer.run_step(0)  # logged, then "killed" before any checkpoint
    assert [row["step"] for row in read_metrics(tmp_path / "run" / "metrics.jsonl")] == [0]
    resumed = GenerationTrainer(config, resume=True)
    assert resumed.start_step == 0 and resumed.metrics.read() == []


def test_the_final_checkpoint_is_written_once(tmp_path, monkeypatch):
    committed = []
    real_commit = CheckpointManager.commit

    def counting_commit(self, step, run_id):
        committed.append(step)
        return real_commit(self, step, run_id)

    monkeypatch.setattr(CheckpointManager, "commit", counting_commit)
    config = small_config(tmp_path / "run", "checkpoint.every_steps=1", "eval.every_steps=0")
    GenerationTrainer(config).train()  # num_steps 2, a multiple of every_steps
    assert committed == [1, 2]


# ----- resume with a changed config ------------------------------------------------------------------------
def test_resume_applies_a_changed_learning_rate_and_records_it(tmp_path, capsys):
    one_update = "train.samples_per_update=8"  # one optimizer update per step
    base = ("checkpoint.every_steps=1", "eval.every_steps=0", "train.num_steps=1", one_update)
    GenerationTrainer(small_config(tmp_path / "run", *base)).train()
    shutil.copytree(tmp_path / "run", tmp_path / "doubled")
    lr = small_config(tmp_path / "run").train.lr
    updates = {}
    for name, new_lr in (("run", lr), ("doubled", 2 * lr)):
        trainer = GenerationTrainer(
            small_config(tmp_path / name, *base, "train.num_steps=2", f"train.lr={new_lr}"), resume=True
        )
        assert trainer.start_step == 1 and trainer.optimizer.param_groups[0]["lr"] == new_lr
        before = lora_weights(trainer)
        record = trainer.run_step(1)
        assert record["optim/lr"] == new_lr
        updates[name] = {key: lora_weights(trainer)[key] - value for key, value in before.items()}
    # same gradients and Adam moments: the update is proportional to the learning rate actually used
    for key, update in updates["run"].items():
        assert update.abs().max() > 0
        torch.testing.assert_close(updates["doubled"][key], 2 * update, rtol=1e-3, atol=1e-7)
    printed = capsys.readouterr().out
    assert f"applying changed settings: train.lr {lr!r} -> {2 * lr!r}, train.num_steps 1 -> 2" in printed
    history = read_history(tmp_path / "doubled")
    assert [event["event"] for event in history] == ["start", "resume"]
    assert history[1]["step"] == 1 and history[1]["checkpoint"] == "checkpoint-000001"
    assert history[1]["changes"] == {
        "train.lr": {"from": lr, "to": 2 * lr},
        "train.num_steps": {"from": 1, "to": 2},
    }


def test_resume_refuses_a_changed_lora_rank_before_the_model_loads(finished_run, monkeypatch):
    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded before the config was checked")

    monkeypatch.setattr("gen_rl.trainer.load_sampler", no_model)
    changed = small_config(
        finished_run, *ONE_STEP, "model.lora_rank=4", "sample.group_size=2", "train.lr=0.5"
    )
    with pytest.raises(ConfigChangeError) as refused:
        GenerationTrainer(changed, resume=True)
    message = str(refused.value)
    assert "\n" not in message
    assert "model.lora_rank: 8 -> 4, sample.group_size: 4 -> 2 changed" in message
    assert "train.lr" not in message  # a tunable is not a reason to refuse


# ----- metrics.jsonl ---------------------------------------------------------------------------------------
def test_a_torn_metrics_line_is_dropped_with_a_warning_and_resume_rewrites_the_file(tmp_path, capsys):
    log = MetricsLog(tmp_path / "metrics.jsonl")
    for step in range(3):
        log.append({"step": step, "reward/mean": step / 10})
    whole = log.path.read_bytes()
    line = json.dumps({"step": 3, "reward/mean": 0.3}).encode()
    with log.path.open("ab") as handle:
        handle.write(line[: len(line) // 2])  # a kill mid-append
    assert [record["step"] for record in log.read()] == [0, 1, 2]
    assert "metrics.jsonl:4: dropped a torn last line" in capsys.readouterr().err
    log.truncate_after(1)
    assert log.path.read_bytes() == whole[: whole.index(b'{"step": 2')]
    log.path.write_bytes(b'{"step": 0}\n{"st\n{"step": 2}\n')
    with pytest.raises(ValueError, match=r"metrics.jsonl:2 is not a JSON record"):
        log.read()


def test_a_full_disk_while_appending_metrics_is_one_clear_error(tmp_path, crash_at):
    log = MetricsLog(tmp_path / "metrics.jsonl")
    crash_at("metrics.append")
    with pytest.raises(
        RunError, match=r"appending to .*metrics.jsonl failed: No space left on device; the last"
    ):
        log.append({"step": 0})


@pytest.fixture
def small_disk(tmp_path):
    """A 2 MiB tmpfs: a disk that really fills up (needs root to mount; skipped where that is not allowed)."""
    mount = tmp_path / "disk"
    mount.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mount)], capture_output=True
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def _fill(disk: Path, leave: int) -> Path:
    """Fill ``disk`` with one file, then give back ``leave`` bytes."""
    filler = disk / "filler"
    with filler.open("wb") as handle:
        try:
            while True:
                handle.write(b"\0" * 65536)
                handle.flush()
        except OSError:
            pass
    size = filler.stat().st_size
    with filler.open("r+b") as handle:
        handle.truncate(size - leave)
    return filler


def test_a_really_full_disk_is_one_line_and_the_previous_checkpoint_resumes(small_disk):
    config = small_config(
        small_disk / "run", "checkpoint.every_steps=1", "eval.every_steps=0", "train.num_steps=3"
    )
    trainer = GenerationTrainer(config)
    trainer.run_step(0)  # commits checkpoint-000001 (~300 KB)
    filler = _fill(small_disk, leave=16384)  # room for a metrics line, not for a checkpoint
    with pytest.raises(CheckpointWriteError) as failed:
        trainer.run_step(1)
    message = str(failed.value)
    assert (
        "\n" not in message
        and "writing checkpoint-000002" in message
        and "no space left on device" in message
    )
    assert f"{trainer.checkpoints.path(1)} is intact" in message
    assert [path.name for path in trainer.checkpoints.root.iterdir()] == ["checkpoint-000001"]
    filler.unlink()
    resumed = GenerationTrainer(config, resume=True)
    assert resumed.start_step == 1 and problem_of(trainer.checkpoints.path(1)) is None


# ----- loading runs no code --------------------------------------------------------------------------------
class _Payload:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))  # unpickling this creates the marker file


@pytest.mark.parametrize("victim", ["trainer_state.pt", "accelerate/optimizer.bin"])
def test_a_checkpoint_holding_pickled_code_is_refused_unrun(finished_run, tmp_path, victim):
    checkpoint = finished_run / "checkpoints" / "checkpoint-000001"
    marker = tmp_path / "code-ran"
    torch.save({"state": _Payload(marker)}, checkpoint / victim)
    write_manifest(checkpoint, 1, json.loads((finished_run / "run.json").read_text())["run_id"])
    with pytest.raises(RunError, match="pickled objects beyond tensors and plain data.*refused"):
        GenerationTrainer(small_config(finished_run, *ONE_STEP), resume=True)
    assert not marker.exists()


# ----- a reward that is never finite ----------------------------------------------------------------------
class AlwaysNaN(Reward):
    """NaN for every sample (a broken reward)."""

    def score(self, pixels, prompts, metadata):
        return RewardOutput(scores=torch.full((len(prompts),), float("nan")))


def test_a_run_whose_every_reward_is_nan_stops_non_zero_after_three_steps(tmp_path, capsys):
    from gen_rl.train import cli

    argv = [
        "--config",
        str(DEMO),
        f"log.output_dir={tmp_path / 'run'}",
        "log.tracker=none",
        "log.progress=false",
        "sample.group_size=2",
        "sample.groups_per_step=2",
        "sample.groups_per_rollout=2",
        "train.samples_per_update=4",
        "train.microbatch_size=4",
        "train.num_steps=5",
        "checkpoint.every_steps=1",
        "data.eval_prompts=",
        f"data.train_prompts={DEMO.parent / 'prompts' / 'colour_train.txt'}",
        "reward.terms=[{name: 'test_run_folders:AlwaysNaN'}]",
    ]
    assert cli(argv) == 1
    captured = capsys.readouterr()
    assert captured.err.splitlines() == [
        "error: every sample's reward was NaN / inf for 3 consecutive steps, so nothing trains; fix the reward "
        "(score a few images with it by hand). The last checkpoint is intact."
    ]
    assert "[gen-rl] stopped; " in captured.out and "checkpoint-000002 is intact" in captured.out


def test_the_nan_streak_restarts_after_a_step_with_a_finite_reward(tmp_path):
    fast = ("sample.group_size=2", "sample.groups_per_rollout=2", "train.check_log_probs=false")
    config = small_config(
        tmp_path / "run", "checkpoint.every_steps=0", "eval.every_steps=0", "train.num_steps=5", *fast
    )
    trainer = GenerationTrainer(config)
    colour = trainer.reward_models["colour"]
    for step, reward in enumerate([AlwaysNaN(), AlwaysNaN(), colour, AlwaysNaN(), AlwaysNaN()]):
        trainer.reward_models = {"colour": reward}
        trainer.run_step(step)
    assert trainer.all_nan_steps == 2


def test_pickle_payload_really_runs_code_when_unpickled(tmp_path):
    """The payload used above is live: plain pickle executes it (so the refusal test is not vacuous)."""
    marker = tmp_path / "ran"
    pickle.loads(pickle.dumps(_Payload(marker)))
    assert marker.exists()


# ----- the VLM trainer shares the run-folder rules ---------------------------------------------------------
def test_vlm_resume_applies_a_changed_learning_rate_and_refuses_a_changed_lora_rank(tmp_path):
    from gen_rl.core.config import load_config
    from gen_rl.vlm.config import VLMConfig
    from gen_rl.vlm.trainer import VLMTrainer

    tiny = DEMO.parents[1] / "vlm" / "tiny_colour_cpu.yaml"
    base = [
        f"log.output_dir={tmp_path}",
        "log.progress=false",
        "checkpoint.every_steps=1",
        "train.num_steps=2",
    ]
    base += ["model.lora.enabled=true", "model.lora.r=4", "model.lora.alpha=8", "sample.groups_per_step=2"]

    def config(*overrides: str) -> VLMConfig:
        return load_config(VLMConfig, tiny, [*base, *overrides])

    VLMTrainer(config()).run()
    with pytest.raises(RunFolderError, match="already holds a run"):
        VLMTrainer(config())
    with pytest.raises(ConfigChangeError, match=r"model\.lora\.r: 4 -> 8 changed"):
        VLMTrainer(config("model.lora.r=8", "train.num_steps=3"), resume=True)
    resumed = VLMTrainer(config("train.lr=0.125", "train.num_steps=3"), resume=True)
    assert resumed.start_step == 1  # checkpoint-000001: the last step is saved as final/, not as a checkpoint
    assert [group["lr"] for group in resumed.optimizer.param_groups] == [0.125]
    assert read_history(tmp_path)[-1]["changes"] == {
        "train.lr": {"from": 0.005, "to": 0.125},
        "train.num_steps": {"from": 2, "to": 3},
    }


def test_publish_swaps_a_whole_folder_in_and_leaves_nothing_behind(tmp_path):
    final, staged = tmp_path / "final", tmp_path / ".tmp-final"
    for content in (b"first", b"second"):
        staged.mkdir()
        (staged / "adapter.safetensors").write_bytes(content)
        publish(staged, final)
        assert (final / "adapter.safetensors").read_bytes() == content
    assert sorted(path.name for path in tmp_path.iterdir()) == ["final"]
