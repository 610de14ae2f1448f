"""FSDP2 is a config, not code: two processes (gloo on CPU) train under FSDP2 exactly as under DDP.

One launch per wrapper (accelerate launch, 2 processes, about 25 s each on 2 cores), same tiny config: two
training steps with the KL reference pass (the prepared model with its LoRA disabled) and an evaluation before
each step over 3 prompts (padded to even shards on 2 processes). See fsdp_worker.py for how accelerate is put in
FSDP2 mode on CPU.

Tolerances: the two wrappers run the same arithmetic; only the gradient reduction differs (DDP all-reduce vs
FSDP2 reduce-scatter), and a sum over 2 ranks does not depend on order, so the runs agree bit for bit here (measured
on torch 2.14 / accelerate 1.16). The bounds leave room for another reduction order (1e-6 on weights, 1e-5 relative
on metrics); a wrong update moves a weight by about the learning rate (1e-2), four orders more.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from trainer_helpers import TIMING_KEYS, free_port

WORKER = Path(__file__).resolve().parent / "fsdp_worker.py"
OVERRIDES = (
    "sample.groups_per_step=4",
    "sample.group_size=2",
    "train.samples_per_update=2",
    "train.microbatch_size=1",
    "train.num_steps=2",
    "algorithm.kl_coef=0.1",
    "eval.every_steps=1",
    "eval.max_prompts=3",
    "eval.samples_per_prompt=1",
    "checkpoint.every_steps=0",
)
# compared on its own below (a sum-instead-of-mean gradient would show only here: AdamW ignores scale)
GRAD_NORM = "optim/grad_norm"


def _launch(output: Path, mode: str) -> dict:
    environment = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "CUDA_VISIBLE_DEVICES": "",
        "HF_HUB_OFFLINE": "1",
        "PYTHONPATH": os.pathsep.join([str(WORKER.parent), os.environ.get("PYTHONPATH", "")]),
    }
    command = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
        "--main_process_port", str(free_port()), str(WORKER), str(output), mode, *OVERRIDES,
    ]  # fmt: skip
    finished = subprocess.run(command, env=environment, capture_output=True, text=True, timeout=300)
    assert finished.returncode == 0, finished.stderr[-3000:]
    ranks = [torch.load(output / f"rank{rank}.pt") for rank in (0, 1)]
    records = [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]
    return {"ranks": ranks, "records": records, "output": output}


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, dict]:
    root = tmp_path_factory.mktemp("fsdp")
    return {mode: _launch(root / mode, mode) for mode in ("ddp", "fsdp2")}


def _numbers(record: dict) -> dict[str, float]:
    return {
        key: value
        for key, value in record.items()
        if isinstance(value, (int, float)) and key not in TIMING_KEYS and key != GRAD_NORM
    }


def test_fsdp2_trains_as_ddp(runs):
    ddp, fsdp = runs["ddp"], runs["fsdp2"]
    assert ddp["ranks"][0]["wrapper"] == "DistributedDataParallel"
    assert fsdp["ranks"][0]["wrapper"].startswith("FSDP")  # fully_shard's in-place FSDP<Class> subclass

    assert len(ddp["records"]) == len(fsdp["records"]) == 2
    for one, two in zip(ddp["records"], fsdp["records"], strict=True):
        one, two = _numbers(one), _numbers(two)
        assert one.keys() == two.keys()
        for key, value in one.items():
            assert math.isclose(two[key], value, rel_tol=1e-5, abs_tol=1e-7), (key, value, two[key])
    first = ddp["records"][0]
    assert first["loss/kl"] > 0 and "eval/reward/mean" in first  # the reference pass and the eval ran

    weights = ddp["ranks"][0]["weights"]
    for rank in (*ddp["ranks"], *fsdp["ranks"]):
        assert rank["weights"].keys() == weights.keys()
        for name, value in weights.items():
            torch.testing.assert_close(rank["weights"][name], value, rtol=0, atol=1e-6)
    moved = sum(float(value.abs().sum()) for name, value in weights.items() if "lora_B" in name)
    assert moved > 0  # the updates happened (LoRA B starts at zero)


def test_fsdp2_gradient_norm_equals_ddp(runs):
    for one, two in zip(runs["ddp"]["records"], runs["fsdp2"]["records"], strict=True):
        assert one[GRAD_NORM] > 0
        assert math.isclose(two[GRAD_NORM], one[GRAD_NORM], rel_tol=1e-5)


def test_fsdp2_checkpoint_equals_ddp(runs):
    from safetensors.torch import load_file

    exported = {}
    for mode, run in runs.items():
        assert [rank["save_error"] for rank in run["ranks"]] == [None, None], mode
        folder = run["output"] / "checkpoints" / "checkpoint-000002" / "lora"
        exported[mode] = load_file(str(folder / "pytorch_lora_weights.safetensors"))
    assert exported["ddp"].keys() == exported["fsdp2"].keys()
    for name, value in exported["ddp"].items():
        torch.testing.assert_close(exported["fsdp2"][name], value, rtol=0, atol=1e-6)


@pytest.fixture(scope="module")
def nft_runs(tmp_path_factory) -> dict[str, dict]:
    root = tmp_path_factory.mktemp("fsdp_nft")
    return {mode: _launch(root / mode, f"{mode}:nft") for mode in ("ddp", "fsdp2")}


def test_fsdp2_diffusion_nft_trains_as_ddp(nft_runs):
    """DiffusionNFT swaps its old policy into the sharded parameters (rollouts, the old-velocity pass): under FSDP2
    the swap must reach the forward (the root module is resharded first), else the old policy is the current one
    (nft/old_deviation 0) and the metrics leave DDP's from the first step."""
    ddp, fsdp = nft_runs["ddp"], nft_runs["fsdp2"]
    assert fsdp["ranks"][0]["wrapper"].startswith("FSDP")
    for one, two in zip(ddp["records"], fsdp["records"], strict=True):
        one, two = _numbers(one), _numbers(two)
        assert one.keys() == two.keys()
        for key, value in one.items():
            assert math.isclose(two[key], value, rel_tol=1e-5, abs_tol=1e-7), (key, value, two[key])
    assert ddp["records"][-1]["nft/old_deviation"] > 0  # the old policy lags the current one after an update
    weights = ddp["ranks"][0]["weights"]
    for rank in (*ddp["ranks"], *fsdp["ranks"]):
        assert sorted(rank["weights"]) == sorted(weights), (sorted(rank["weights"])[:2], sorted(weights)[:2])
        for name, value in weights.items():
            torch.testing.assert_close(rank["weights"][name], value, rtol=0, atol=1e-6)
    assert [rank["save_error"] for rank in fsdp["ranks"]] == [None, None]
