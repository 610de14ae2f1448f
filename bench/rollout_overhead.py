"""Rollout-with-log-probs time / diffusers pipeline call time, tiny SD3, FLUX and SD 1.5, measured in one run.

    python bench/rollout_overhead.py [--batch 4] [--steps 10] [--repeats 7]

Both sides encode the prompts, draw the same initial noise, run the same number of denoiser calls and decode;
the rollout also draws SDE noise, evaluates the Gaussian log-prob of every step and stores the trajectory.
Runs alternate (pipeline, rollout, pipeline, ...) and the medians are compared. Target: ratio <= 1.05 for every
family (SD 1.5's pipeline runs its DDIM step with eta = 1 and fresh noise, as the rollout does).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from diffusers import DDIMScheduler

from gen_rl.core.seeding import make_generators
from pipelines import FluxSampler, RolloutOptions, SD3Sampler, SDSampler, SDXLSampler
from pipelines.tiny import tiny_flux_pipeline, tiny_sd3_pipeline, tiny_sd_pipeline
from pipelines.tiny_sdxl import tiny_sd2_pipeline, tiny_sdxl_pipeline

# (sampler, builder, image side in pixels): each gives 1024 latent positions, as in shared/TINY_MODELS.md
CASES = {
    "sd3": (SD3Sampler, tiny_sd3_pipeline, 32),
    "flux": (FluxSampler, tiny_flux_pipeline, 64),
    "sd": (SDSampler, tiny_sd_pipeline, 64),
    "sd2": (SDSampler, tiny_sd2_pipeline, 64),
    "sdxl": (SDXLSampler, tiny_sdxl_pipeline, 64),
}
TARGETS = {"sd3": 1.05, "flux": 1.05, "sd": 1.05}
TARGETS.update({"sd2": 1.05, "sdxl": 1.05})


def _timed(function) -> float:
    start = time.perf_counter()
    function()
    return time.perf_counter() - start


def measure(family: str, batch: int, steps: int, repeats: int) -> dict[str, float]:
    """Median seconds of the pipeline call and of the SDE rollout, and their ratio."""
    sampler_class, build, side = CASES[family]
    sampler = sampler_class(build())
    sampler.pipeline.set_progress_bar_config(disable=True)
    prompts = [f"prompt number {index}" for index in range(batch)]
    options = RolloutOptions(num_steps=steps, height=side, width=side, max_sequence_length=64)
    # the same guidance on both sides: SD3's pipeline defaults to CFG 7.0, SD's to 7.5, the rollout to 1
    pipeline_kwargs = {"guidance_scale": 1.0, "max_sequence_length": 64} if family == "sd3" else {}
    if family == "flux":
        pipeline_kwargs = {"max_sequence_length": 64}
    # DDIM with eta = 1 on both sides: the pipeline draws variance noise every step too
    if family in ("sd", "sd2", "sdxl"):
        options = RolloutOptions(num_steps=steps, height=side, width=side, sde_type="ddim", noise_level=1.0)
        pipeline_kwargs = {"guidance_scale": 1.0, "eta": 1.0}
        # SDXL ships Euler: the pipeline steps with DDIM from the same config, as the rollout does
        sampler.pipeline.scheduler = DDIMScheduler.from_config(sampler.pipeline.scheduler.config)
    seeds = sampler.rollout(prompts, options).seeds.tolist()

    def call_pipeline() -> None:
        sampler.pipeline(
            prompts,
            num_inference_steps=steps,
            height=side,
            width=side,
            generator=make_generators(seeds),
            output_type="pt",
            **pipeline_kwargs,
        )

    def call_rollout() -> None:
        sampler.rollout(prompts, options)

    pipeline_times, rollout_times = [], []
    with torch.inference_mode():
        call_pipeline()
        call_rollout()
        for _ in range(repeats):
            pipeline_times.append(_timed(call_pipeline))
            rollout_times.append(_timed(call_rollout))
    pipeline_seconds = statistics.median(pipeline_times)
    rollout_seconds = statistics.median(rollout_times)
    return {
        "pipeline_s": pipeline_seconds,
        "rollout_s": rollout_seconds,
        "ratio": rollout_seconds / pipeline_seconds,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--families", nargs="+", default=list(CASES), choices=list(CASES))
    args = parser.parse_args()
    print(
        f"batch {args.batch}, {args.steps} steps, median of {args.repeats}, {torch.get_num_threads()} threads"
    )
    print(f"{'family':<8}{'pipeline s':>12}{'rollout s':>12}{'ratio':>8}{'target':>8}")
    for family in args.families:
        result = measure(family, args.batch, args.steps, args.repeats)
        print(
            f"{family:<8}{result['pipeline_s']:>12.4f}{result['rollout_s']:>12.4f}{result['ratio']:>8.3f}"
            f"{TARGETS[family]:>8.2f}"
        )


if __name__ == "__main__":
    main()
