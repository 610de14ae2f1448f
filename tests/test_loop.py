"""The phase skeleton itself (gen_rl.loop.PhaseLoop), driven by a hand-made trainer whose phases record their calls:
phase order, eval cadence under both step-numbering policies, save cadence, the final save, the stop message."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from accelerate import Accelerator

from gen_rl.checkpoint import CheckpointManager, CheckpointWriteError, RunError
from gen_rl.loop import Collected, PhaseLoop
from gen_rl.metrics import MetricsLog

STOP = "Continue with the same command plus --resume."


class Recorder(PhaseLoop):
    """Fake phases: each appends ``(phase, step)`` to ``calls``; ``save`` commits a real (empty) checkpoint."""

    def __init__(self, tmp_path, num_steps=5, eval_every=2, save_every=2, start_step=0, interrupt_at=None):
        self.config = SimpleNamespace(
            train=SimpleNamespace(num_steps=num_steps),
            eval=SimpleNamespace(every_steps=eval_every),
            checkpoint=SimpleNamespace(every_steps=save_every),
            log=SimpleNamespace(progress=False, tracker="none"),
        )
        self.accelerator = Accelerator(cpu=True)
        self.output_dir = tmp_path
        self.metrics = MetricsLog(tmp_path / "metrics.jsonl")
        self.checkpoints = CheckpointManager(tmp_path, keep_last=100)
        self.start_step = start_step
        self.interrupt_at = interrupt_at
        self.calls: list[tuple[str, int]] = []
        self.logged_batches: list = []

    def sample(self, step):
        self.calls.append(("sample", step))
        return {"step": step}

    def score(self, batch):
        self.calls.append(("score", batch["step"]))
        return {"reward/mean": float(batch["step"])}

    def advantages(self, batch):
        self.calls.append(("advantages", batch["step"]))
        return {"advantage/std": 1.0}

    def update(self, batch, step):
        self.calls.append(("update", step))
        if step == self.interrupt_at:
            raise KeyboardInterrupt
        return {"loss/total": -10.0 * step - batch["step"]}

    def evaluate(self, step):
        self.calls.append(("evaluate", step))
        return {"eval/reward/mean": 100.0 + step}

    def save(self, step):
        self.calls.append(("save", step))
        self.checkpoints.staging_dir(step)
        self.checkpoints.commit(step, run_id="test")

    def log(self, record, batch=None):
        self.logged_batches.append(batch)
        super().log(record, batch)

    def summary(self):
        return {"records": len(self.metrics.read())}


class AfterUpdate(Recorder):
    """The VLM's numbering: step t's record is ``step: t + 1``, evaluated after the update."""

    records_after_update = True


def _step_calls(step, evaluate_before=False, evaluate_after=None, save=None):
    calls = [("evaluate", step)] if evaluate_before else []
    calls += [("sample", step), ("score", step), ("advantages", step), ("update", step)]
    calls += [("evaluate", evaluate_after)] if evaluate_after is not None else []
    return calls + ([("save", save)] if save is not None else [])


def test_records_before_update_evaluate_first_and_add_a_final_record(tmp_path):
    """Generation numbering: eval at steps 0, 2, 4 before the update, a final record 5, saves 2, 4 and the last."""
    trainer = Recorder(tmp_path)
    assert trainer.train() == {"records": 6}
    expected = []
    for step in range(5):
        expected += _step_calls(
            step, evaluate_before=step % 2 == 0, save=step + 1 if step in (1, 3) else None
        )
    assert trainer.calls == [*expected, ("evaluate", 5), ("save", 5)]

    records = trainer.metrics.read()
    assert [record["step"] for record in records] == [0, 1, 2, 3, 4, 5]
    assert [record["step"] for record in records if "eval/reward/mean" in record] == [0, 2, 4, 5]
    assert records[-1] == {"step": 5, "eval/reward/mean": 105.0}
    for step, record in enumerate(records[:5]):  # every phase's statistics reach the record unchanged
        assert (record["reward/mean"], record["advantage/std"], record["loss/total"]) == (
            step,
            1.0,
            -11.0 * step,
        )
        assert list(record)[-6:] == [
            "time/sample_s", "time/reward_s", "time/advantage_s", "time/update_s", "time/step_s",
            "perf/samples_per_s",
        ]  # fmt: skip
        assert record["time/step_s"] >= record["time/update_s"] >= 0
    assert trainer.logged_batches == [{"step": step} for step in range(5)]
    assert [CheckpointManager.step_of(path) for path in trainer.checkpoints.all()] == [2, 4, 5]
    assert (tmp_path / "reward_curve.png").is_file()


def test_records_after_update_number_t_plus_one_and_evaluate_after_the_update(tmp_path):
    """VLM numbering: records 1..5, eval after the update at 2, 4 and the last step (5), no extra record."""
    trainer = AfterUpdate(tmp_path)
    trainer.train()
    expected = []
    for step in range(5):
        done = step + 1
        evaluated = done if done % 2 == 0 or done == 5 else None
        expected += _step_calls(step, evaluate_after=evaluated, save=done if done in (2, 4) else None)
    assert trainer.calls == [*expected, ("save", 5)]
    records = trainer.metrics.read()
    assert [record["step"] for record in records] == [1, 2, 3, 4, 5]
    assert [record["step"] for record in records if "eval/reward/mean" in record] == [2, 4, 5]
    assert [record.get("eval/reward/mean") for record in records] == [None, 102.0, None, 104.0, 105.0]
    assert records[0]["reward/mean"] == 0.0  # the record of step 0 (numbered 1) holds step 0's batch


def test_no_eval_and_no_periodic_save_when_switched_off(tmp_path):
    trainer = Recorder(tmp_path, num_steps=3, eval_every=0, save_every=0)
    trainer.train()
    assert [call for call in trainer.calls if call[0] in ("evaluate", "save")] == [
        ("evaluate", 3),
        ("save", 3),
    ]
    assert [record["step"] for record in trainer.metrics.read()] == [
        0,
        1,
        2,
        3,
    ]  # the final eval record is kept


def test_a_resumed_run_starts_at_its_step_and_a_finished_one_only_evaluates(tmp_path):
    trainer = Recorder(tmp_path, num_steps=4, start_step=3)
    trainer.train()
    assert trainer.calls == [*_step_calls(3), ("evaluate", 4), ("save", 4)]

    finished = Recorder(
        tmp_path, num_steps=4, start_step=4
    )  # checkpoint-000004 exists: nothing to save again
    finished.train()
    assert finished.calls == [("evaluate", 4)]


def test_the_collect_hook_replaces_sample_score_advantages(tmp_path):
    """A trainer that overrides collect (the VLM's dynamic sampling) is asked once per step; its batch is what
    update and log receive, its statistics and timings are in the record."""

    class Rounds(Recorder):
        def collect(self, step):
            self.calls.append(("collect", step))
            return Collected({"step": step, "rounds": 2}, {"sample/rounds": 2.0}, {"time/sample_s": 7.0})

    trainer = Rounds(tmp_path, num_steps=2, eval_every=0, save_every=0)
    trainer.train()
    assert trainer.calls == [
        ("collect", 0),
        ("update", 0),
        ("collect", 1),
        ("update", 1),
        ("evaluate", 2),
        ("save", 2),
    ]
    assert trainer.logged_batches == [{"step": 0, "rounds": 2}, {"step": 1, "rounds": 2}]
    record = trainer.metrics.read()[1]
    assert (record["sample/rounds"], record["time/sample_s"], record["loss/total"]) == (2.0, 7.0, -11.0)


def test_an_interrupted_run_names_its_intact_checkpoint(tmp_path, capsys):
    trainer = Recorder(tmp_path, interrupt_at=3)
    with pytest.raises(KeyboardInterrupt):
        trainer.train()
    assert trainer.calls[-4:] == _step_calls(3)  # stopped inside step 3's update: no log, no finish
    assert [record["step"] for record in trainer.metrics.read()] == [0, 1, 2]  # step 3 was never logged
    out = capsys.readouterr().out
    assert f"[gen-rl] stopped; {trainer.checkpoints.path(2)} is intact. {STOP}" in out


def test_a_run_error_in_the_final_save_says_no_checkpoint_was_written(tmp_path, capsys):
    class Refused(Recorder):
        def save(self, step):
            raise RunError("refused")

    with pytest.raises(RunError):
        Refused(tmp_path, num_steps=1, save_every=0).train()
    assert f"[gen-rl] stopped; no checkpoint was written yet. {STOP}" in capsys.readouterr().out


def test_a_failed_checkpoint_write_adds_no_second_line(tmp_path, capsys):
    """CheckpointWriteError's one line already names the intact checkpoint and --resume (the CLI prints it)."""

    class FullDisk(Recorder):
        def save(self, step):
            raise CheckpointWriteError("disk full")

    with pytest.raises(CheckpointWriteError):
        FullDisk(tmp_path, num_steps=1, save_every=0).train()
    assert "[gen-rl] stopped" not in capsys.readouterr().out
