"""Train with your own algorithm, written outside gen-rl: a plain REINFORCE over the SDE steps.

    python examples/custom_algorithm.py --steps 8     # the tiny FLUX demo with this algorithm, config built in code
    PYTHONPATH=examples python gen_rl/train.py --config my_run.yaml
        # where my_run.yaml has  algorithm: {name: custom_algorithm:Reinforce, scale: 1.0}

An algorithm subclasses ``gen_rl.algorithms.base.Algorithm`` and declares what the rollout must record
(``needs``), which units train (``select``: here every stochastic denoising step) and its loss; its options are
a dataclass (``Options``) that the ``algorithm`` config section fills and checks. Here the loss is REINFORCE
without a ratio or clipping, ``-mean_i w_i A_i log p(x_{t+1} | x_t)`` per step, times the ``scale`` option.
"""

from __future__ import annotations

import argparse
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from gen_rl.algorithms.base import Algorithm, LossBatch, Policy
from gen_rl.algorithms.options import AlgorithmOptions
from gen_rl.core.config import from_dict, load_config, option, to_dict
from gen_rl.trainer import GenerationTrainer
from gen_rl.trainer_config import GenerationConfig

DEMO = Path(__file__).resolve().parents[1] / "configs" / "demo" / "tiny_flux_cpu.yaml"


@dataclass
class ReinforceOptions(AlgorithmOptions):
    """REINFORCE's options (the ``algorithm`` section: ``name`` plus these)."""

    scale: float = option(1.0, "multiplies the loss (-1 flips its sign)")


class Reinforce(Algorithm):
    """REINFORCE over every stochastic denoising step: ``-w A log p`` (Williams 1992, per step)."""

    Options = ReinforceOptions
    needs = frozenset({"log_probs"})
    options: ReinforceOptions

    def select(self, rollout: Any, step: int) -> Tensor:
        """Every stochastic step of each sample (the same steps for the whole batch here)."""
        steps = torch.nonzero(rollout.stochastic[0]).flatten()
        return steps.expand(len(rollout), -1)

    def loss(self, batch: LossBatch, policy: Policy) -> tuple[Tensor, dict[str, Tensor]]:
        """``-mean_i w_i A_i log p_i`` at one step, with gradients through the recomputed log-prob."""
        log_probs = policy.sampler.log_prob(batch.rollout, batch.units).log_probs[:, 0]
        loss = -(batch.weight * batch.advantages * log_probs).mean() * self.options.scale
        return loss, {"loss/total": loss.detach(), "reinforce/log_prob_mean": log_probs.detach().mean()}


def demo_config(output_dir: str, steps: int, scale: float) -> GenerationConfig:
    """The tiny FLUX demo shrunk to ``steps`` steps, its algorithm section replaced by this module's."""
    config = load_config(
        GenerationConfig,
        DEMO,
        [f"log.output_dir={output_dir}", "log.tracker=none", "log.progress=false", f"train.num_steps={steps}",
         "train.lr=3e-2", "train.samples_per_update=8", "train.microbatch_size=8", "sample.group_size=4",
         "sample.groups_per_rollout=2", "eval.every_steps=0", "eval.max_prompts=4", "checkpoint.every_steps=0",
         "log.monitors=false"],
    )  # fmt: skip
    data = to_dict(config)
    data["algorithm"] = {"name": f"{Reinforce.__module__}:Reinforce", "scale": scale}
    config = from_dict(GenerationConfig, data)
    config.validate()
    return config


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Train the tiny demo with REINFORCE; prints and returns the held-out reward before and after."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--scale", type=float, default=1.0)
    parser.add_argument("--out", default=None, help="run folder (default: a temporary one)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as temporary:
        trainer = GenerationTrainer(demo_config(args.out or temporary, args.steps, args.scale))
        before = trainer.evaluate(0)["eval/reward/mean"]
        for step in range(args.steps):
            trainer.run_step(step)
        after = trainer.evaluate(args.steps)["eval/reward/mean"]
    print(
        f"{type(trainer.algorithm).__name__}: held-out reward {before:.4f} -> {after:.4f} in {args.steps} steps"
    )
    return {"before": before, "after": after, "algorithm": trainer.algorithm}


if __name__ == "__main__":
    main()
