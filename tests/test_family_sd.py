"""The epsilon / v-prediction UNet families under the family contract: SD 1.5 (``tiny:sd``), SD 2.x
(``tiny:sd2``: v-prediction, SD 2's UNet layout) and SDXL (``tiny:sdxl``: two text encoders, pooled embeds, time
ids), plus the closed forms of what is theirs alone: the v-prediction DDIM step against diffusers'
``DDIMScheduler.step`` for the same noise, and SDXL's conditioning against the pipeline's own methods."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from diffusers import DDIMScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline
from family_contract import (
    assert_batch_independent,
    assert_lora_export_reproduces_policy,
    assert_recomputed_log_probs_equal_stored,
    assert_short_run_trains,
    assert_zero_noise_matches_pipeline,
)
from trainer_helpers import ROOT

from gen_rl.core.seeding import make_generators
from pipelines import RolloutOptions, SDSampler, SDXLSampler, build_sampler
from pipelines.families import FAMILIES, TINY_MODELS, build_tiny_pipeline
from pipelines.sde import ddim_v_step
from pipelines.tiny_sdxl import tiny_sd2_pipeline, tiny_sdxl_pipeline

PROMPTS = ["a red apple", "a blue sky"]
OPTIONS = RolloutOptions(num_steps=3, height=32, width=32, sde_type="ddim", noise_level=1.0)
MODELS = ["tiny:sd", "tiny:sd2", "tiny:sdxl"]
SD_DEMO = ROOT / "configs" / "demo" / "tiny_sd_cpu.yaml"


def _pipeline(name: str):
    pipeline = build_tiny_pipeline(name)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def _sampler(name: str):
    return build_sampler(TINY_MODELS[name].family, _pipeline(name))


def _pipeline_images(sampler):
    """diffusers' own pipeline call (its DDIM scheduler from the shipped config, eta 0) for the rollout's seeds."""
    components = dict(sampler.pipeline.components)
    components["scheduler"] = DDIMScheduler.from_config(components["scheduler"].config, clip_sample=False)
    if isinstance(sampler, SDXLSampler):
        pipeline = StableDiffusionXLPipeline(**components, add_watermarker=False)
    else:
        pipeline = StableDiffusionPipeline(**components, requires_safety_checker=False)
    pipeline.set_progress_bar_config(disable=True)

    def images(rollout, options):
        use_cfg = options.cfg_scale > 1
        return pipeline(
            rollout.prompts,
            num_inference_steps=options.num_steps,
            height=options.height,
            width=options.width,
            guidance_scale=options.cfg_scale,
            negative_prompt=[options.negative_prompt] * len(rollout)
            if use_cfg and options.negative_prompt
            else None,
            generator=make_generators(rollout.seeds.tolist()),
            eta=0.0,
            output_type="pt",
        ).images

    return images


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize(
    "changes",
    [{}, {"cfg_scale": 3.0, "negative_prompt": "blurry"}, {"cfg_scale": 3.0}],
    ids=["no_cfg", "cfg", "cfg_empty"],
)
def test_zero_noise_reproduces_the_diffusers_pipeline(name, changes):
    sampler = _sampler(name)
    options = dataclasses.replace(OPTIONS, **changes)
    assert_zero_noise_matches_pipeline(sampler, PROMPTS, options, _pipeline_images(sampler), atol=1e-5)


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize(
    "changes", [{}, {"cfg_scale": 3.0, "negative_prompt": "blurry", "sde_window": (1, 3)}]
)
def test_recomputed_log_probs_equal_stored_and_batch_independence(name, changes):
    sampler = _sampler(name)
    options = dataclasses.replace(OPTIONS, **changes)
    assert_recomputed_log_probs_equal_stored(sampler, PROMPTS, options)
    assert_batch_independent(sampler, PROMPTS, options)


@pytest.mark.parametrize("name", MODELS)
def test_lora_export_loads_with_load_lora_weights_and_reproduces_the_policy(name, tmp_path):
    options = dataclasses.replace(OPTIONS, cfg_scale=3.0, negative_prompt="blurry")
    assert_lora_export_reproduces_policy(_sampler(name), lambda: _pipeline(name), PROMPTS, options, tmp_path)


@pytest.mark.parametrize(
    "overrides",
    [
        ("model.pretrained=tiny:sd-pixel",),
        ("model.pretrained=tiny:sd2",),
        ("model.family=sdxl", "model.pretrained=tiny:sdxl-pixel", "sample.cfg_scale=2.0"),
    ],
    ids=["sd15", "sd2", "sdxl"],
)
def test_a_short_run_trains_and_writes_metrics(overrides, tmp_path):
    assert_short_run_trains(SD_DEMO, tmp_path, *overrides, "log.monitors=false")


# ----- SD 2.x: v-prediction -------------------------------------------------------------------------------------
def test_the_sd2_model_is_an_sd2_layout_predicting_v():
    sampler = _sampler("tiny:sd2")
    unet = sampler.denoiser.config
    assert isinstance(sampler, SDSampler) and sampler.prediction_type == "v_prediction"
    assert unet.use_linear_projection and unet.upcast_attention and tuple(unet.attention_head_dim) == (2, 4)
    assert sampler.pipeline.text_encoder.config.hidden_act == "gelu"


@pytest.mark.parametrize("eta", [0.0, 0.5, 1.0])
def test_the_v_prediction_ddim_step_is_diffusers_ddim_step_for_the_same_noise(eta):
    """Closed form against diffusers: on tiny:sd2's 50-step grid, the sampler's transition and ``ddim_v_step`` give
    ``DDIMScheduler.step(v, t, x, eta, variance_noise=noise).prev_sample`` for the same noise, and the Gaussian
    mean is the step with zero noise; a step with the prediction read as epsilon does not."""
    sampler = _sampler("tiny:sd2")
    reference = DDIMScheduler.from_config(sampler.pipeline.scheduler.config)
    reference.set_timesteps(50)
    grid = sampler.noise_grid(dataclasses.replace(OPTIONS, num_steps=50), torch.zeros(1))
    generator = torch.Generator().manual_seed(0)
    for index in (0, 17, 48, 49):
        timestep = reference.timesteps[index]
        sample = torch.randn(2, 4, 4, 4, generator=generator)
        v = torch.randn(2, 4, 4, 4, generator=generator)
        noise = torch.randn(2, 4, 4, 4, generator=generator)
        theirs = reference.step(v, timestep, sample, eta=eta, variance_noise=noise).prev_sample
        levels = grid.alpha_bars[index].expand(2), grid.alpha_bars[index + 1].expand(2)
        ours = sampler._transition("ddim", sample, v, *levels, eta, noise, None)
        public = ddim_v_step(sample, v, *levels, eta, noise=noise)
        torch.testing.assert_close(ours.next_sample, theirs, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(public.next_sample, theirs, atol=1e-5, rtol=1e-5)
        mean = reference.step(v, timestep, sample, eta=eta, variance_noise=torch.zeros_like(v)).prev_sample
        torch.testing.assert_close(ours.mean, mean, atol=1e-5, rtol=1e-5)
        if index < 48:  # near t = 0, x0 ~ x whatever the model predicts
            as_epsilon = DDIMScheduler.from_config(reference.config, prediction_type="epsilon")
            as_epsilon.set_timesteps(50)
            wrong = as_epsilon.step(v, timestep, sample, eta=eta, variance_noise=noise).prev_sample
            assert (wrong - ours.next_sample).abs().max() > 1e-2


# ----- SDXL: conditioning -------------------------------------------------------------------------------------------
def test_sdxl_conditioning_is_the_pipelines_own_and_is_stored_whole():
    """Embeddings from ``encode_prompt`` (both encoders; an empty negative prompt gives SDXL's zeros), time ids
    (original size, crop top-left, target size) from ``_get_add_time_ids``; all rows per sample."""
    sampler = _sampler("tiny:sdxl")
    pipeline = sampler.pipeline
    options = dataclasses.replace(OPTIONS, cfg_scale=3.0, negative_prompt="blurry", height=32, width=48)
    conditioning = sampler.encode_prompts(PROMPTS, options, num_per_prompt=2)
    embeds, negative, pooled, negative_pooled = pipeline.encode_prompt(
        PROMPTS, num_images_per_prompt=2, negative_prompt=["blurry"] * 2
    )
    torch.testing.assert_close(conditioning["prompt_embeds"], embeds, atol=0, rtol=0)
    torch.testing.assert_close(conditioning["negative_prompt_embeds"], negative, atol=0, rtol=0)
    torch.testing.assert_close(conditioning["pooled_prompt_embeds"], pooled, atol=0, rtol=0)
    torch.testing.assert_close(conditioning["negative_pooled_prompt_embeds"], negative_pooled, atol=0, rtol=0)
    assert embeds.shape == (4, 77, 64) and pooled.shape == (4, 32)  # 32 + 32 wide, pooled from text_encoder_2
    assert conditioning["add_time_ids"].tolist() == [[32, 48, 0, 0, 32, 48]] * 4
    empty = sampler.encode_prompts(PROMPTS, dataclasses.replace(options, negative_prompt=""), 1)
    assert not empty["negative_prompt_embeds"].any() and not empty["negative_pooled_prompt_embeds"].any()
    assert empty["prompt_embeds"].abs().sum() > 0

    cropped = SDXLSampler(
        pipeline, original_size=(64, 64), crops_coords_top_left=(8, 4), target_size=(32, 32)
    )
    assert cropped.encode_prompts(PROMPTS[:1], OPTIONS, 1)["add_time_ids"].tolist() == [
        [64, 64, 8, 4, 32, 32]
    ]


def test_sdxl_time_ids_reach_the_unet():
    """Changing the stored time ids changes the prediction: they are conditioning, not decoration."""
    sampler = _sampler("tiny:sdxl")
    rollout = sampler.rollout(PROMPTS[:1], OPTIONS)
    moved = dataclasses.replace(rollout, conditioning=dict(rollout.conditioning))
    moved.conditioning["add_time_ids"] = rollout.conditioning["add_time_ids"] * 4
    recomputed, _ = sampler.recompute_log_probs(moved)
    stochastic = (
        rollout.stochastic
    )  # SDXL's config has no set_alpha_to_one: DDIM's last step ends at 1, std 0
    assert stochastic[0].tolist() == [True, True, False]
    assert (recomputed[stochastic] - rollout.log_probs[stochastic]).abs().max() > 1e-3


def test_sdxl_registration_and_clear_errors():
    assert FAMILIES["sdxl"].step_kinds == ("ddim",) and TINY_MODELS["tiny:sdxl"].family == "sdxl"
    sampler = _sampler("tiny:sdxl")
    assert sampler.lora_target_modules == ("to_q", "to_k", "to_v", "to_out.0")
    assert type(sampler.pipeline.scheduler).__name__ == "EulerDiscreteScheduler"  # what SDXL base ships
    assert (
        isinstance(sampler.scheduler, DDIMScheduler)
        and sampler.scheduler.config.timestep_spacing == "leading"
    )
    with pytest.raises(
        ValueError, match="unknown sde_type 'flow_grpo' for the sdxl family; it steps with ddim"
    ):
        sampler.rollout(PROMPTS, dataclasses.replace(OPTIONS, sde_type="flow_grpo"))
    with pytest.raises(ValueError, match="sdxl image height and width must be multiples of 2"):
        sampler.rollout(PROMPTS, dataclasses.replace(OPTIONS, height=33))
    with pytest.raises(ValueError, match="needs an SDXL UNet .* Use family sd"):
        SDXLSampler(
            StableDiffusionXLPipeline(**{**tiny_sdxl_pipeline().components, "unet": tiny_sd2_pipeline().unet})
        )
