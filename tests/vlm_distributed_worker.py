"""Run by ``accelerate launch`` from test_vlm_distributed.py (and in-process for the one-process side): one VLM
training step; each rank saves its samples, advantages and the weights after the update."""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from trainer_helpers import finish_processes

from gen_rl.core.config import load_config
from gen_rl.vlm.config import VLMConfig
from gen_rl.vlm.trainer import VLMTrainer

TINY = Path(__file__).resolve().parent.parent / "configs" / "vlm" / "tiny_colour_cpu.yaml"
# every option whose maths spans processes: batch-wide advantage statistics, token-mean denominators (truncated
# completions masked, so the ranks hold different token counts), the high-entropy threshold, micro-batch
# accumulation and a second pass over the batch (old log-probs); no gradient clipping, which would hide a scale
OVERRIDES = (
    "sample.groups_per_step=4",
    "sample.group_size=4",
    "sample.max_new_tokens=16",
    "sample.mask_truncated=true",
    "train.num_steps=1",
    "train.inner_epochs=2",
    "train.microbatch_size=4",
    "algorithm.loss_aggregation=token_mean",
    "reward.advantage_estimator=reinforce_pp_baseline",
    "algorithm.top_entropy_fraction=0.5",
    "train.lr=0.01",
    "train.max_grad_norm=0",
    "reward.terms=[{name: vlm_distributed_worker:character_reward, weight: 1.0}]",
    "log.progress=false",
    "log.log_completions=0",
)


def character_reward(completion: str, solution, metadata) -> float:
    """A reward with spread at initialisation (the colour task pays almost nothing before training)."""
    return float(sum(map(ord, completion)) % 5) / 4


def config(output_dir: Path) -> VLMConfig:
    """The shared configuration of both sides, writing into ``output_dir``."""
    return load_config(VLMConfig, TINY, [f"log.output_dir={output_dir}", *OVERRIDES])


def one_step(trainer: VLMTrainer) -> dict:
    """Collect, old / reference passes and the update of step 0; returns what this process computed, with the
    (all-reduced) gradient of every optimizer step."""
    model = trainer.accelerator.unwrap_model(trainer.model)
    gradients = []
    trainer.optimizer.optimizer.register_step_pre_hook(
        lambda *unused: gradients.append(
            {
                name: value.grad.detach().clone()
                for name, value in model.named_parameters()
                if value.grad is not None
            }
        )
    )
    scored = trainer.dynamic_sample(0)
    ref_log_probs = trainer.reference_pass(scored.rollout)
    old_log_probs, sampling_entropy = trainer.old_pass(scored.rollout)
    stats = trainer.optimize(0, scored, old_log_probs, ref_log_probs, sampling_entropy)
    return {
        "gradients": gradients,
        "rollout": scored.rollout,
        "scores": scored.scores,
        "advantages": scored.advantages.cpu(),
        "stats": stats,
        "weights": {name: value.detach().cpu().clone() for name, value in model.named_parameters()},
    }


if __name__ == "__main__":
    output = Path(sys.argv[1])
    trainer = VLMTrainer(config(output))
    torch.save(one_step(trainer), output / f"rank{trainer.accelerator.process_index}.pt")
    finish_processes()
