"""Crash tests of a run folder: the real ``gen_rl/train.py`` is SIGKILLed at every stage of a checkpoint commit
and in the middle of a metrics append, and fails one write with ENOSPC; each time ``--resume`` continues.

One chain of runs on the tiny demo config (6 steps, a checkpoint after every step, keep_last 2): each run is
killed (or fails) at the next named stage (``GEN_RL_FAULT``, see ``gen_rl/faults.py``) and the next one resumes.
At the end its metrics rows must be exactly an uninterrupted run's and its final LoRA bitwise equal.

Each run executes the real script (``runpy`` of ``gen_rl/train.py`` as ``__main__`` with its argv) in a process
forked from a multiprocessing fork server that imported torch and diffusers once: a separate process that a
SIGKILL ends mid-write, without paying the ~6 s import ten times over on 2 cores.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import runpy
import signal
import sys
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file
from trainer_helpers import DEMO, TIMING_KEYS

ROOT = Path(__file__).resolve().parents[1]
TRAIN_SCRIPT = ROOT / "gen_rl" / "train.py"
NUM_STEPS = 6
OVERRIDES = [
    "log.tracker=none",
    "log.progress=false",
    "log.monitors=false",
    "sample.num_steps=4",
    "sample.group_size=2",
    "sample.groups_per_step=2",
    "sample.groups_per_rollout=2",
    f"train.num_steps={NUM_STEPS}",
    "train.samples_per_update=4",
    "train.microbatch_size=4",
    "eval.every_steps=0",
    "data.eval_prompts=",
    f"data.train_prompts={DEMO.parent / 'prompts' / 'colour_train.txt'}",
    "checkpoint.every_steps=1",
    "checkpoint.keep_last=2",
    "train.check_log_probs=false",
]
LORA = Path("lora") / "pytorch_lora_weights.safetensors"

# (fault for this run, what the run must leave behind); every run after the first is a --resume
CHAIN = [
    ("enospc:checkpoint.staged@2", "disk full while committing checkpoint 2: one line, checkpoint 1 intact"),
    ("kill:checkpoint.synced@1", "checkpoint 2's files synced, no manifest yet"),
    ("kill:checkpoint.manifest@1", "checkpoint 2 complete but still staged (not renamed)"),
    ("kill:checkpoint.renamed@1", "checkpoint 3 renamed in, old ones not pruned"),
    ("kill:checkpoint.pruning@1", "checkpoint 2 moved to .trash, not yet deleted"),
    ("kill:metrics.append@2", "half of step 5's metrics line written"),
    (
        "kill:checkpoint.aside@1",
        "checkpoint 5 corrupted, resumed from 4: 5's re-save killed after the swap-aside",
    ),
    ("", "resumes from the staged complete checkpoint 5 and runs to the end"),
]


def _run_train_script(argv: list[str], fault: str, log_path: str) -> None:
    """Child process: run gen_rl/train.py as ``__main__`` with ``argv``, stdout/stderr into ``log_path``."""
    import torch

    torch.set_num_threads(1)
    os.environ["GEN_RL_FAULT"] = fault
    descriptor = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    os.dup2(descriptor, 1)
    os.dup2(descriptor, 2)
    sys.argv = [str(TRAIN_SCRIPT), *argv]
    code = 0
    try:
        runpy.run_path(str(TRAIN_SCRIPT), run_name="__main__")
    except SystemExit as exit_:
        code = exit_.code if isinstance(exit_.code, int) else 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


class ScriptRunner:
    """Runs the training script in processes forked from a server that preloaded the heavy imports."""

    def __init__(self, logs: Path) -> None:
        self.context = multiprocessing.get_context("forkserver")
        self.context.set_forkserver_preload(["torch", "diffusers", "gen_rl.trainer", "matplotlib.pyplot"])
        self.logs = logs
        self.count = 0

    def __call__(self, output_dir: Path, *flags: str, fault: str = "") -> tuple[int, str]:
        """(exit code, -9 for SIGKILL; combined output) of one run."""
        self.count += 1
        log = self.logs / f"run-{self.count}.log"
        argv = ["--config", str(DEMO), *flags, f"log.output_dir={output_dir}", *OVERRIDES]
        process = self.context.Process(target=_run_train_script, args=(argv, fault, str(log)))
        process.start()
        process.join(timeout=240)
        if process.is_alive():
            process.kill()
            pytest.fail(f"run {self.count} ({fault or 'no fault'}) did not finish in 240 s; see {log}")
        return process.exitcode, log.read_text()


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    """An uninterrupted reference run and the interrupted chain; per chain run: (code, output, folder listing)."""
    root = tmp_path_factory.mktemp("faults")
    run = ScriptRunner(root)
    reference_code, reference_output = run(root / "reference")
    assert reference_code == 0, reference_output
    folder = root / "chain"
    steps = []
    for index, (fault, _) in enumerate(CHAIN):
        if fault.startswith("kill:checkpoint.aside"):  # corrupt checkpoint 5: its re-save swaps it aside
            lora = folder / "checkpoints" / "checkpoint-000005" / LORA
            data = bytearray(lora.read_bytes())
            data[-1] ^= 0xFF
            lora.write_bytes(bytes(data))
        code, output = run(folder, *(["--resume"] if index else []), fault=fault)
        steps.append((code, output, sorted(path.name for path in (folder / "checkpoints").iterdir())))
    return {"reference": root / "reference", "folder": folder, "steps": steps}


def test_each_fault_stops_the_run_as_planned(chain):
    codes = [code for code, _, _ in chain["steps"]]
    killed = -signal.SIGKILL
    assert codes == [1, killed, killed, killed, killed, killed, killed, 0], [
        out for _, out, _ in chain["steps"]
    ]
    leftovers = [listing for _, _, listing in chain["steps"]]
    assert leftovers[1] == [".tmp-checkpoint-000002", "checkpoint-000001"]
    assert leftovers[2] == [".tmp-checkpoint-000002", "checkpoint-000001"]
    assert leftovers[3] == ["checkpoint-000001", "checkpoint-000002", "checkpoint-000003"]
    assert leftovers[4] == [".trash-checkpoint-000001", *(f"checkpoint-00000{step}" for step in (2, 3, 4))]
    assert leftovers[5] == ["checkpoint-000004", "checkpoint-000005"]
    assert leftovers[6] == [".old-checkpoint-000005", ".tmp-checkpoint-000005", "checkpoint-000004"]
    assert leftovers[7] == ["checkpoint-000005", "checkpoint-000006"]


def test_a_full_disk_prints_one_line_and_leaves_the_previous_checkpoint_resumable(chain):
    code, output, listing = chain["steps"][0]
    # everything but the start-up summary (its "[gen-rl] run" header and indented lines) is the one error line
    summary = output.split("\n  starting at step 0 of 6\n", 1)
    assert len(summary) == 2 and summary[0].startswith("[gen-rl] run"), output
    lines = [line for line in summary[1].splitlines() if line.strip()]
    assert code == 1 and len(lines) == 1, output
    assert lines[0].startswith("error: writing checkpoint-000002 under ")
    assert "no space left on device" in lines[0] and "checkpoint-000001 is intact" in lines[0]
    assert lines[0].endswith("then run the same command with --resume.")
    assert listing == ["checkpoint-000001"]  # the failed save's staging folder was removed
    assert "continuing from " in chain["steps"][1][1] and "checkpoint-000001 (step 1)" in chain["steps"][1][1]


def test_resume_names_the_checkpoint_it_takes_and_what_it_skipped(chain):
    outputs = [output for _, output, _ in chain["steps"]]
    # after the kill before the manifest: the staged folder is skipped, the older complete one taken
    assert "skipped .tmp-checkpoint-000002: no manifest.json" in outputs[2]
    assert "checkpoint-000001 (step 1)" in outputs[2]
    # after the kill between manifest and rename: the staged folder is complete, renamed into place and taken
    assert "skipped" not in outputs[3] and "checkpoint-000002 (step 2)" in outputs[3]
    assert "checkpoint-000003 (step 3)" in outputs[4]
    assert "checkpoint-000004 (step 4)" in outputs[5]
    # after the kill mid-append and the corruption of checkpoint 5: the torn row is dropped, 5 skipped, 4 taken
    assert "metrics.jsonl:6: dropped a torn last line" in outputs[6]
    assert (
        "skipped checkpoint-000005: lora/pytorch_lora_weights.safetensors does not match its sha"
        in outputs[6]
    )
    assert "checkpoint-000004 (step 4)" in outputs[6]
    # after the kill between setting the corrupt copy aside and renaming the new one in: the staged one is taken
    assert "skipped" not in outputs[7] and "checkpoint-000005 (step 5)" in outputs[7]


def test_the_interrupted_run_ends_exactly_where_an_uninterrupted_one_does(chain):
    expected = _rows(chain["reference"] / "metrics.jsonl")
    got = _rows(chain["folder"] / "metrics.jsonl")
    assert [row["step"] for row in got] == list(range(NUM_STEPS))
    assert got == expected  # every logged value, exactly (wall-clock fields left out)
    final = "checkpoints/checkpoint-000006" / LORA
    want, have = load_file(chain["reference"] / final), load_file(chain["folder"] / final)
    assert want.keys() == have.keys() and len(want) > 0
    for name in want:
        assert np.array_equal(want[name], have[name]), name  # bitwise
    history = [json.loads(line) for line in (chain["folder"] / "config_history.jsonl").open()]
    assert [event["event"] for event in history] == ["start"] + ["resume"] * (len(CHAIN) - 1)
    assert all(event["changes"] == {} for event in history[1:])


def _rows(path: Path) -> list[dict]:
    return [
        {key: value for key, value in json.loads(line).items() if key not in TIMING_KEYS}
        for line in path.read_text().splitlines()
    ]
