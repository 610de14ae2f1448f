"""Two processes (accelerate launch, gloo on CPU) compute the same advantages as one, and stay in sync."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch
from distributed_worker import one_step
from trainer_helpers import free_port, small_config

from gen_rl.trainer import GenerationTrainer

WORKER = Path(__file__).resolve().parent / "distributed_worker.py"
OVERRIDES = (
    "sample.groups_per_step=4",
    "sample.group_size=2",
    "train.samples_per_update=2",
    "train.microbatch_size=1",
    "data.eval_prompts=",
    "eval.every_steps=0",
    "checkpoint.every_steps=0",
)


def test_two_processes_match_one_process_and_each_other(tmp_path):
    environment = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    command = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--multi_gpu",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "--main_process_port",
        str(free_port()),
        str(WORKER),
        str(tmp_path / "two"),
        *OVERRIDES,
    ]
    finished = subprocess.run(command, env=environment, capture_output=True, text=True, timeout=300)
    assert finished.returncode == 0, finished.stderr[-3000:]
    ranks = [torch.load(tmp_path / "two" / f"rank{rank}.pt") for rank in (0, 1)]

    single = one_step(GenerationTrainer(small_config(tmp_path / "one", *OVERRIDES)))
    # rank r holds groups [2r, 2r + 2) of the step: the concatenation is the single process's batch
    torch.testing.assert_close(torch.cat([r["group_ids"] for r in ranks]), single["group_ids"])
    torch.testing.assert_close(torch.cat([r["rewards"] for r in ranks]), single["rewards"], rtol=0, atol=1e-6)
    torch.testing.assert_close(
        torch.cat([r["advantages"] for r in ranks]), single["advantages"], rtol=0, atol=1e-5
    )
    assert single["advantages"].abs().sum() > 0  # the comparison is not between zeros

    start = {name: value for name, value in ranks[0]["weights"].items()}
    for name, value in ranks[1]["weights"].items():
        torch.testing.assert_close(value, start[name], rtol=0, atol=0)  # DDP kept the ranks identical
    moved = sum(float(value.abs().sum()) for name, value in start.items() if "lora_B" in name)
    assert moved > 0  # the update happened (LoRA B starts at zero)
