"""The trainer's overhead: one training step's wall time / the sum of its parts, measured in one run.

    python bench/trainer_overhead.py [--repeats 5] [key=value config overrides ...]

Parts, each timed on its own with the same inputs: the rollout (``sampler.rollout``: the denoiser calls,
encoding and decoding), the trained forward/backward over the selected steps plus the optimizer step, and the
reward call. A step (``GenerationTrainer.run_step`` without eval and checkpoints) adds the bookkeeping between
them: gathering, advantages, step selection, logging. Step and parts alternate; medians are compared.
Target: ratio <= 1.10. Defaults: the demo config (tiny FLUX, 32 samples per step, 4 denoising steps, 16 px).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gen_rl.core.config import load_config  # noqa: E402
from gen_rl.trainer import GenerationTrainer  # noqa: E402
from gen_rl.trainer_config import GenerationConfig  # noqa: E402

DEMO = Path(__file__).resolve().parents[1] / "configs" / "demo" / "tiny_flux_cpu.yaml"


def _timed(function) -> float:
    start = time.perf_counter()
    function()
    return time.perf_counter() - start


def time_parts(trainer: GenerationTrainer, step: int) -> dict[str, float]:
    """Seconds of the rollout, the reward and the forward/backward/optimizer work of step ``step``, apart."""
    batch = trainer.sample(step)  # warm inputs for the other parts (not timed)
    rollout_seconds = _timed(lambda: trainer.sample(step))
    reward_seconds = _timed(
        lambda: trainer.score_rollout(batch.rollout, trainer.reward_models, batch.group_ids)
    )
    trainer.score(batch)
    trainer.advantages(batch)
    update_seconds = _timed(lambda: trainer.update(batch, step))
    return {"rollout": rollout_seconds, "reward": reward_seconds, "update": update_seconds}


def measure(overrides: list[str], repeats: int) -> dict[str, float]:
    """Median step time, median sum of parts, their ratio."""
    with tempfile.TemporaryDirectory() as output:
        config = load_config(
            GenerationConfig,
            DEMO,
            [
                f"log.output_dir={output}",
                "log.tracker=none",
                "log.progress=false",
                "eval.every_steps=0",
                "checkpoint.every_steps=0",
                "train.check_log_probs=false",
                *overrides,
            ],
        )
        trainer = GenerationTrainer(config)
        trainer.run_step(0)  # warm-up
        steps, parts = [], []
        for repeat in range(repeats):
            steps.append(_timed(lambda r=repeat: trainer.run_step(1 + r)))
            parts.append(time_parts(trainer, 1 + repeat))
    result = {name: statistics.median(p[name] for p in parts) for name in parts[0]}
    result["parts"] = statistics.median(sum(p.values()) for p in parts)
    result["step"] = statistics.median(steps)
    result["ratio"] = result["step"] / result["parts"]
    return result


def main(argv: list[str] | None = None) -> dict[str, float]:
    """Print the step time, each part and the ratio."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    result = measure(args.overrides, args.repeats)
    print(f"threads={torch.get_num_threads()} repeats={args.repeats} overrides={args.overrides}")
    for name in ("rollout", "reward", "update", "parts", "step"):
        print(f"  {name:8s} {result[name] * 1000:9.1f} ms")
    print(f"  step / sum of parts = {result['ratio']:.3f}  (target <= 1.10)")
    return result


if __name__ == "__main__":
    main()
