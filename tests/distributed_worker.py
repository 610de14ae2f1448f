"""Run by ``accelerate launch`` from test_distributed.py: one training step, each rank saves what it computed."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from trainer_helpers import finish_processes, lora_weights, small_config  # noqa: E402

from gen_rl.trainer import GenerationTrainer  # noqa: E402


def one_step(trainer: GenerationTrainer) -> dict:
    """Sample, score, advantages and one update of step 0; returns this process's tensors."""
    batch = trainer.sample(0)
    trainer.score(batch)
    trainer.advantages(batch)
    advantages = batch.advantages
    trainer.update(batch, 0)
    return {
        "advantages": advantages.cpu(),
        "group_ids": batch.group_ids,
        "rewards": batch.rewards["colour"],
        "weights": lora_weights(trainer),
    }


if __name__ == "__main__":
    output = Path(sys.argv[1])
    trainer = GenerationTrainer(small_config(output, *sys.argv[2:]))
    result = one_step(trainer)
    torch.save(result, output / f"rank{trainer.accelerator.process_index}.pt")
    finish_processes()
