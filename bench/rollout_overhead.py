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
from PIL import Image

from gen_rl.core.seeding import make_generators
from pipelines import FluxSampler, RolloutOptions, SD3Sampler, SDSampler, SDXLSampler
from pipelines.flux2 import Flux2KleinSampler, Flux2Sampler
from pipelines.flux_kontext import FluxKontextSampler
from pipelines.hunyuan_video import HunyuanVideoI2VSampler, HunyuanVideoSampler
from pipelines.hunyuan_video_15 import HunyuanVideo15Sampler
from pipelines.qwen_image import QwenImageSampler
from pipelines.tiny import tiny_flux_pipeline, tiny_sd3_pipeline, tiny_sd_pipeline
from pipelines.tiny_2026 import (
    tiny_flux2_klein_pipeline,
    tiny_flux2_pipeline,
    tiny_flux_kontext_pipeline,
    tiny_qwen_image_pipeline,
    tiny_z_image_pipeline,
)
from pipelines.tiny_hunyuan import (
    tiny_hunyuan_video_15_pipeline,
    tiny_hunyuan_video_i2v_pipeline,
    tiny_hunyuan_video_pipeline,
)
from pipelines.tiny_sdxl import tiny_sd2_pipeline, tiny_sdxl_pipeline
from pipelines.tiny_wan import TINY_NUM_FRAMES, tiny_wan_i2v_pipeline, tiny_wan_pipeline
from pipelines.wan import WanI2VSampler, WanSampler
from pipelines.z_image import ZImageSampler

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
# Wan videos: 5 frames of 128 px (2 x 16 x 16 latent positions of 16 channels, 128 tokens); wan22 switches
# between its two experts at the boundary
CASES.update(
    {
        "wan": (WanSampler, tiny_wan_pipeline, 128),
        "wan22": (WanSampler, lambda: tiny_wan_pipeline(two_experts=True), 128),
        "wan_i2v": (WanI2VSampler, tiny_wan_i2v_pipeline, 128),
    }
)
TARGETS.update({"wan": 1.05, "wan22": 1.05, "wan_i2v": 1.05})
# 2026 image families (pipelines/tiny_2026.py): 1024 image tokens; Qwen-Image 256 at 128 px (its 3-D VAE is slow)
CASES.update(
    {
        "qwen_image": (QwenImageSampler, tiny_qwen_image_pipeline, 128),
        "flux2": (Flux2Sampler, tiny_flux2_pipeline, 64),
        "flux2_klein": (Flux2KleinSampler, tiny_flux2_klein_pipeline, 64),
        "z_image": (ZImageSampler, tiny_z_image_pipeline, 64),
        "flux_kontext": (FluxKontextSampler, tiny_flux_kontext_pipeline, 64),
    }
)
TARGETS.update(
    {"qwen_image": 1.05, "flux2": 1.05, "flux2_klein": 1.05, "z_image": 1.05, "flux_kontext": 1.05}
)
# HunyuanVideo: 5 frames (2 latent frames) of 64 px, the pipelines' defaults otherwise (embedded guidance 6 / 1)
CASES.update(
    {
        "hunyuan_video": (HunyuanVideoSampler, tiny_hunyuan_video_pipeline, 64),
        "hunyuan_video_i2v": (HunyuanVideoI2VSampler, tiny_hunyuan_video_i2v_pipeline, 64),
        "hunyuan_video_15": (HunyuanVideo15Sampler, tiny_hunyuan_video_15_pipeline, 64),
    }
)
TARGETS.update({"hunyuan_video": 1.05, "hunyuan_video_i2v": 1.05, "hunyuan_video_15": 1.05})
# their pipelines' calls without CFG (Qwen-Image defaults to true_cfg 4, Z-Image to guidance 5, klein to 4)
PIPELINE_KWARGS_2026 = {
    "qwen_image": {"true_cfg_scale": 1.0, "max_sequence_length": 64},
    "flux2": {"max_sequence_length": 64},
    "flux2_klein": {"guidance_scale": 1.0, "max_sequence_length": 64},
    "z_image": {"guidance_scale": 0.0, "max_sequence_length": 64},
    "flux_kontext": {"max_sequence_length": 64, "_auto_resize": False},
}


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
    metadata = None
    if family in ("wan", "wan22", "wan_i2v"):  # CFG off (Wan's pipeline defaults to 5), the tiny frame count
        pipeline_kwargs = {"guidance_scale": 1.0, "max_sequence_length": 64, "num_frames": TINY_NUM_FRAMES}
        if family == "wan_i2v":  # one source image for every prompt: the I2V pipeline takes one per call
            image = Image.new("RGB", (side, side), (200, 40, 40))
            metadata = [{"image": image}] * batch
            pipeline_kwargs["image"] = image
    if family in PIPELINE_KWARGS_2026:
        pipeline_kwargs = dict(PIPELINE_KWARGS_2026[family])
        if family == "flux_kontext":  # one source image per sample on both sides
            images = [Image.new("RGB", (side, side), (200, 40, 40))] * batch
            metadata = [{"image": image} for image in images]
            pipeline_kwargs.update(image=images, max_area=side * side)
    if family.startswith("hunyuan_video"):
        pipeline_kwargs = {"num_frames": sampler.default_num_frames()}
        if family == "hunyuan_video_15":  # its VAE decodes batch > 1 only in slices (the sampler: 1 per call)
            sampler.pipeline.vae.enable_slicing()
        else:
            pipeline_kwargs.update(prompt_template=sampler.prompt_template, max_sequence_length=64)
        if family == "hunyuan_video_i2v":  # one source per sample on both sides; SkyReels' true CFG 6 off
            image = Image.new("RGB", (side, side), (200, 40, 40))
            metadata = [{"image": image}] * batch
            pipeline_kwargs.update(image=[image] * batch, true_cfg_scale=1.0)
    seeds = sampler.rollout(prompts, options, metadata=metadata).seeds.tolist()

    def call_pipeline() -> None:
        sampler.pipeline(
            prompt=prompts,
            num_inference_steps=steps,
            height=side,
            width=side,
            generator=make_generators(seeds),
            output_type="pt",
            **pipeline_kwargs,
        )

    def call_rollout() -> None:
        sampler.rollout(prompts, options, metadata=metadata)

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
