"""Two VLM processes (accelerate launch, gloo on CPU) train exactly as one process on the same samples:
the same advantages (each rank keeps its own slice of the batch's) and the same weights after the update."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import torch
from vlm_distributed_worker import config, one_step

from gen_rl.vlm.trainer import VLMTrainer, _concat_rollouts

WORKER = Path(__file__).resolve().parent / "vlm_distributed_worker.py"


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _launch_two_processes(output: Path) -> list[dict]:
    output.mkdir(parents=True)
    tests = str(WORKER.parent)
    environment = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "CUDA_VISIBLE_DEVICES": "",
        "HF_HUB_OFFLINE": "1",
        "PYTHONPATH": os.pathsep.join([tests, os.environ.get("PYTHONPATH", "")]),
    }
    command = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
        "--main_process_port", str(_free_port()), str(WORKER), str(output),
    ]  # fmt: skip
    finished = subprocess.run(command, env=environment, capture_output=True, text=True, timeout=600)
    assert finished.returncode == 0, finished.stderr[-3000:]
    return [torch.load(output / f"rank{rank}.pt", weights_only=False) for rank in (0, 1)]


def test_two_vlm_processes_equal_one_process(tmp_path):
    ranks = _launch_two_processes(tmp_path / "two")
    # the one-process run trains on the very samples the two ranks drew (rank 0's prompts first)
    trainer = VLMTrainer(config(tmp_path / "one"))
    rollout = _concat_rollouts([rank["rollout"] for rank in ranks], trainer.settings.pad_token_id)
    scores = {name: torch.cat([rank["scores"][name] for rank in ranks]) for name in ranks[0]["scores"]}
    trainer._sample_round = lambda step, round_index: (rollout, scores, 0.0, 0.0)
    model = trainer.accelerator.unwrap_model(trainer.model)
    before = {name: value.detach().clone() for name, value in model.named_parameters()}
    single = one_step(trainer)

    torch.testing.assert_close(single["rollout"].group_ids, rollout.group_ids)
    two_advantages = torch.cat([rank["advantages"] for rank in ranks])
    torch.testing.assert_close(two_advantages, single["advantages"], rtol=0, atol=1e-6)
    halves = single["advantages"].chunk(2)
    assert not torch.allclose(halves[0], halves[1])  # each rank's slice is its own (not vacuous)
    assert single["stats"]["policy/trained_token_fraction"] < 0.75  # the entropy gate is on
    loss_tokens = [
        int((rank["rollout"].completion_mask & ~rank["rollout"].is_truncated[:, None]).sum())
        for rank in ranks
    ]
    assert loss_tokens[0] != loss_tokens[1]  # token-mean denominators differ between the ranks
    for key in ("policy/entropy", "policy/trained_token_fraction"):
        assert ranks[0]["stats"][key] == ranks[1]["stats"][key]  # gathered over processes

    for name, value in ranks[0]["weights"].items():
        torch.testing.assert_close(ranks[1]["weights"][name], value, rtol=0, atol=0)  # DDP kept them equal
        # AdamW's first steps move each weight by about lr * sign(g): a gradient within float noise of 0 moves it
        # by less, so weights agree to a small fraction of lr (a process weighted wrongly moves them by ~lr)
        torch.testing.assert_close(value, single["weights"][name], rtol=0, atol=1e-4)
    # AdamW's step hides a gradient's scale (and clipping would too): compare the all-reduced gradients
    assert len(single["gradients"]) == 2  # num_iterations=2 optimizer steps
    for rank in ranks:
        for two, one in zip(rank["gradients"], single["gradients"], strict=True):
            assert two.keys() == one.keys()
            for name, value in one.items():
                torch.testing.assert_close(two[name], value, rtol=1e-4, atol=1e-7)
    moved = max(float((single["weights"][name] - before[name]).abs().max()) for name in before)
    assert moved > 1e-3  # the update happened (lr 0.01)
