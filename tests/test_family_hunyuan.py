"""The HunyuanVideo families under the family contract: text-to-video (``tiny:hunyuan_video``), SkyReels-style
image-to-video (``tiny:hunyuan_video_i2v``: source latents concatenated on channels) and HunyuanVideo 1.5
(``tiny:hunyuan_video_15``), plus what is theirs alone: frames in every record, the shifted grid and the embedded
guidance in closed form, the stored source image driving the recomputed log-probs, gradient checkpointing and VAE
slicing leaving the numbers unchanged."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, HunyuanVideo15Pipeline
from diffusers.guiders import ClassifierFreeGuidance
from diffusers.loaders.lora_base import LORA_WEIGHT_NAME_SAFE as LORA_WEIGHT_NAME
from family_contract import (
    assert_batch_independent,
    assert_lora_export_reproduces_policy,
    assert_recomputed_log_probs_equal_stored,
    assert_short_run_trains,
    assert_zero_noise_matches_pipeline,
    attach_random_lora,
)
from trainer_helpers import ROOT

from gen_rl.core.seeding import make_generators
from gen_rl.export import save_lora
from pipelines import (
    HunyuanVideo15Sampler,
    HunyuanVideoI2VSampler,
    HunyuanVideoSampler,
    RolloutOptions,
    build_sampler,
)
from pipelines.families import FAMILIES, TINY_MODELS, build_tiny_pipeline

PROMPTS = ["a red apple", "a blue sky"]
OPTIONS = RolloutOptions(
    num_steps=3, height=16, width=16, num_frames=5, noise_level=0.7, max_sequence_length=16
)
MODELS = ["tiny:hunyuan_video", "tiny:hunyuan_video_i2v", "tiny:hunyuan_video_15"]
DEMO = ROOT / "configs" / "demo" / "tiny_hunyuan_video_cpu.yaml"
I2V_PROMPTS = ROOT / "configs" / "hunyuan_video" / "prompts" / "i2v_demo.jsonl"


def _sources(count: int = 2) -> list[dict]:
    """One distinct source image ([3, 16, 16] in [0, 1]) per prompt."""
    generator = torch.Generator().manual_seed(7)
    return [{"image": torch.rand(3, 16, 16, generator=generator)} for _ in range(count)]


def _metadata(name: str, count: int = 2) -> list[dict] | None:
    return _sources(count) if name == "tiny:hunyuan_video_i2v" else None


def _pipeline(name: str):
    pipeline = build_tiny_pipeline(name)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def _sampler(name: str):
    return build_sampler(TINY_MODELS[name].family, _pipeline(name))


def _pipeline_images(sampler, metadata=None):
    """diffusers' own pipeline call for the rollout's prompts, seeds and options; video as [B, 3, T, H, W]."""
    pipeline = sampler.pipeline

    def images(rollout, options):
        use_cfg = options.cfg_scale > 1
        kwargs = {
            "prompt": rollout.prompts,
            "height": options.height,
            "width": options.width,
            "num_frames": options.num_frames,
            "num_inference_steps": options.num_steps,
            "generator": make_generators(rollout.seeds.tolist()),
            "output_type": "pt",
        }
        if options.shift is not None:
            pipeline.scheduler = FlowMatchEulerDiscreteScheduler.from_config(
                pipeline.scheduler.config, shift=options.shift
            )
        if isinstance(sampler, HunyuanVideo15Sampler):
            pipeline.guider = ClassifierFreeGuidance(guidance_scale=options.cfg_scale)
            pipeline.vae.enable_slicing()  # diffusers' 1.5 VAE decodes a batch > 1 only in slices
            kwargs["negative_prompt"] = [options.negative_prompt] * len(rollout) if use_cfg else None
        else:
            kwargs["prompt_template"] = sampler.prompt_template
            kwargs["max_sequence_length"] = options.max_sequence_length
            kwargs["guidance_scale"] = (
                sampler.default_guidance if options.guidance is None else options.guidance
            )
            kwargs["true_cfg_scale"] = options.cfg_scale
            kwargs["negative_prompt"] = [options.negative_prompt] * len(rollout) if use_cfg else None
        if isinstance(sampler, HunyuanVideoI2VSampler):
            kwargs["image"] = torch.stack([item["image"] for item in rollout.metadata])
        return pipeline(**kwargs).frames.permute(0, 2, 1, 3, 4)

    return images


# ----- the contract ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize(
    "changes",
    [{}, {"cfg_scale": 3.0, "negative_prompt": "blurry"}, {"shift": 3.0, "guidance": 2.5}],
    ids=["plain", "cfg", "shift_guidance"],
)
def test_zero_noise_reproduces_the_diffusers_pipeline(name, changes):
    if name == "tiny:hunyuan_video_15" and "guidance" in changes:
        changes = {"shift": changes["shift"]}  # no embedded guidance in 1.5
    sampler = _sampler(name)
    options = dataclasses.replace(OPTIONS, **changes)
    metadata = _metadata(name)
    assert_zero_noise_matches_pipeline(
        sampler, PROMPTS, options, _pipeline_images(sampler), metadata=metadata, atol=1e-5
    )


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize(
    "changes",
    [
        {"sde_type": "flow_grpo"},
        {"sde_type": "dance_grpo", "noise_level": 0.3, "cfg_scale": 3.0},
        {"sde_type": "cps", "sde_window": (1, 3)},
    ],
    ids=["flow_grpo", "dance_grpo_cfg", "cps_window"],
)
def test_recomputed_log_probs_equal_stored_and_batch_independence(name, changes):
    sampler = _sampler(name)
    options = dataclasses.replace(OPTIONS, **changes)
    metadata = _metadata(name)
    assert_recomputed_log_probs_equal_stored(sampler, PROMPTS, options, metadata=metadata)
    assert_batch_independent(sampler, PROMPTS, options, metadata=metadata)


@pytest.mark.parametrize("name", MODELS)
def test_lora_export_loads_with_load_lora_weights_and_reproduces_the_policy(name, tmp_path):
    options = dataclasses.replace(OPTIONS, cfg_scale=3.0, negative_prompt="blurry")
    assert_lora_export_reproduces_policy(
        _sampler(name), lambda: _pipeline(name), PROMPTS, options, tmp_path, metadata=_metadata(name)
    )


def test_a_hunyuan_video_15_lora_export_loads_into_the_stock_pipeline(tmp_path):
    """diffusers 0.42.1's ``HunyuanVideo15Pipeline`` has no LoRA loader (the sampler's ``HunyuanVideo15LoraPipeline``
    adds HunyuanVideo's): the exported folder loads into the stock pipeline through the transformer's own
    ``load_lora_adapter`` and reproduces the policy."""
    assert not hasattr(HunyuanVideo15Pipeline, "load_lora_weights")
    sampler = _sampler("tiny:hunyuan_video_15")
    zero = dataclasses.replace(OPTIONS, noise_level=0.0, decode=False)
    attach_random_lora(sampler)
    trained = sampler.rollout(PROMPTS, zero).latents[:, -1]
    folder = save_lora(sampler, tmp_path / "lora")
    stock = HunyuanVideo15Pipeline(**_pipeline("tiny:hunyuan_video_15").components)
    for name in ("prompt_template_encode_start_idx", "tokenizer_max_length", "tokenizer_2_max_length"):
        setattr(stock, name, getattr(sampler.pipeline, name))
    stock.vision_num_semantic_tokens = sampler.pipeline.vision_num_semantic_tokens
    stock.default_num_frames = sampler.pipeline.default_num_frames
    stock.transformer.load_lora_adapter(folder, prefix="transformer", weight_name=LORA_WEIGHT_NAME)
    loaded = HunyuanVideo15Sampler(stock).rollout(PROMPTS, zero).latents[:, -1]
    torch.testing.assert_close(loaded, trained, rtol=0, atol=1e-5)


@pytest.mark.parametrize(
    "overrides",
    [
        (),
        (
            "model.family=hunyuan_video_i2v",
            "model.pretrained=tiny:hunyuan_video_i2v",
            f"data.train_prompts={I2V_PROMPTS}",
            f"data.eval_prompts={I2V_PROMPTS}",
        ),
        ("model.family=hunyuan_video_15", "model.pretrained=tiny:hunyuan_video_15"),
    ],
    ids=["t2v", "i2v", "v15"],
)
def test_a_short_run_trains_and_writes_metrics(overrides, tmp_path):
    small = ("sample.height=16", "sample.width=16", "sample.group_size=2", "eval.max_prompts=1")
    assert_short_run_trains(DEMO, tmp_path, *small, *overrides, "log.monitors=false")


# ----- frames -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", MODELS)
def test_every_record_carries_its_frames(name):
    """Latents [B, S+1, C, T', h, w], pixels [B, 3, T, H, W] in [0, 1] with T = num_frames; the frame count
    defaults to the pipeline's and must fit the VAE's temporal compression."""
    sampler = _sampler(name)
    metadata = _metadata(name, 1)
    for frames in (5, 9):
        rollout = sampler.rollout(
            PROMPTS[:1], dataclasses.replace(OPTIONS, num_frames=frames), metadata=metadata
        )
        temporal = sampler.pipeline.vae_scale_factor_temporal
        spatial = sampler.pipeline.vae_scale_factor_spatial
        assert rollout.num_frames == frames
        assert rollout.latents.shape == (1, 4, 4, (frames - 1) // temporal + 1, 16 // spatial, 16 // spatial)
        assert rollout.pixels.shape == (1, 3, frames, 16, 16)
        assert rollout.pixels.min() >= 0 and rollout.pixels.max() <= 1
    default = sampler.rollout(PROMPTS[:1], dataclasses.replace(OPTIONS, num_frames=None), metadata=metadata)
    assert default.num_frames == sampler.pipeline.default_num_frames == 5
    with pytest.raises(ValueError, match="temporal compression"):
        sampler.rollout(PROMPTS[:1], dataclasses.replace(OPTIONS, num_frames=6), metadata=metadata)


def test_registration():
    for name, sampler_class in zip(
        MODELS, (HunyuanVideoSampler, HunyuanVideoI2VSampler, HunyuanVideo15Sampler), strict=True
    ):
        family = TINY_MODELS[name].family
        assert isinstance(_sampler(name), sampler_class) and sampler_class.video
        assert FAMILIES[family].step_kinds == ("flow_grpo", "dance_grpo", "cps")
    assert HunyuanVideoI2VSampler.conditions == ("image",) and HunyuanVideoSampler.conditions == ()


@pytest.mark.parametrize("name", MODELS)
def test_conditioning_rows_follow_the_prompts(name):
    """Encoding 2 prompts for groups of 2 equals encoding the 4 expanded prompts one row each (diffusers 0.42's 1.5
    ``encode_prompt`` pairs embeddings with another prompt's mask when asked for several videos per prompt)."""
    sampler = _sampler(name)
    options = dataclasses.replace(OPTIONS, cfg_scale=3.0, negative_prompt="blurry")
    grouped = sampler.encode_prompts(PROMPTS, options, num_per_prompt=2)
    expanded = sampler.encode_prompts([p for p in PROMPTS for _ in range(2)], options, num_per_prompt=1)
    assert grouped.keys() == expanded.keys()
    for key, value in grouped.items():
        torch.testing.assert_close(value, expanded[key], atol=1e-6, rtol=0)
    assert (grouped["prompt_embeds"][0] - grouped["prompt_embeds"][2]).abs().max() > 0


# ----- closed forms -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("shift", [None, 3.0])
def test_the_grid_is_the_shifted_linspace(shift):
    """sigma_i = s t_i / (1 + (s - 1) t_i) for t = linspace(1, 0, S + 1) (s: the scheduler's 7, or options.shift),
    model timesteps 1000 sigma_i."""
    sampler = _sampler("tiny:hunyuan_video")
    options = dataclasses.replace(OPTIONS, num_steps=6, shift=shift)
    sigmas, timesteps = sampler.grid(options, torch.zeros(1))
    s = 7.0 if shift is None else shift
    t = torch.linspace(1, 0, 7, dtype=torch.float64)
    expected = (s * t / (1 + (s - 1) * t)).float()
    torch.testing.assert_close(sigmas, expected, atol=1e-6, rtol=0)
    torch.testing.assert_close(timesteps, 1000 * expected[:-1], atol=1e-3, rtol=0)


def test_embedded_guidance_is_fed_times_1000_and_reaches_the_transformer():
    sampler = _sampler("tiny:hunyuan_video")
    conditioning = sampler.encode_prompts(PROMPTS, OPTIONS, num_per_prompt=2)
    assert conditioning["guidance"].tolist() == [6000.0] * 4  # the pipeline's default guidance_scale 6
    rollout = sampler.rollout(PROMPTS[:1], dataclasses.replace(OPTIONS, guidance=2.5))
    assert rollout.conditioning["guidance"].tolist() == [2500.0]
    moved = dataclasses.replace(
        rollout, conditioning={**rollout.conditioning, "guidance": torch.tensor([6000.0])}
    )
    recomputed, _ = sampler.recompute_log_probs(moved)
    assert (recomputed - rollout.log_probs).abs().max() > 1e-3
    with pytest.raises(ValueError, match="no embedded guidance"):
        _sampler("tiny:hunyuan_video_15").rollout(PROMPTS[:1], dataclasses.replace(OPTIONS, guidance=2.0))


@pytest.mark.parametrize("recipe", ["dancegrpo_t2v.yaml", "skyreels_style_i2v.yaml"])
def test_the_recipes_sample_and_train_dance_grpos_steps(recipe):
    """DanceGRPO's train_grpo_hunyuan.py / train_grpo_skyreels_i2v.py: sigma = sd3_time_shift(shift, linspace(1, 0,
    17)), timesteps 1000 sigma, guidance fed as 1000 x guidance (6018 / 1000), int(16 * 0.6) = 9 trained steps per
    sample from a per-sample permutation of all 16; T2V's best-of-8 trains the top 4 and bottom 4 of a group of 24."""
    from gen_rl.algorithms.policy_gradient import best_of_n_mask
    from gen_rl.core.config import load_config
    from gen_rl.core.step_selection import train_step_indices
    from gen_rl.trainer_config import GenerationConfig

    config = load_config(GenerationConfig, ROOT / "configs" / "hunyuan_video" / recipe)
    sample, algorithm = config.sample, config.algorithm
    sampler = _sampler("tiny:hunyuan_video_i2v" if "i2v" in recipe else "tiny:hunyuan_video")
    options = RolloutOptions(num_steps=sample.num_steps, shift=sample.shift, guidance=sample.guidance)
    sigmas, timesteps = sampler.grid(options, torch.zeros(1))
    t = torch.linspace(1, 0, 17, dtype=torch.float64)
    theirs = sample.shift * t / (1 + (sample.shift - 1) * t)  # DanceGRPO's sd3_time_shift
    torch.testing.assert_close(sigmas, theirs.float(), atol=1e-6, rtol=0)
    torch.testing.assert_close(timesteps, 1000 * theirs[:-1].float(), atol=1e-3, rtol=0)
    guidance = sampler.encode_prompts(PROMPTS[:1], options, 1)["guidance"]
    assert guidance.tolist() == [6018.0 if "t2v" in recipe else 1000.0]
    stochastic = torch.ones(3, 16, dtype=torch.bool)
    chosen = [
        train_step_indices(
            stochastic, algorithm.step_selection, fraction=algorithm.step_fraction, seed=0, step=step
        )
        for step in range(10)
    ]
    assert all(c.shape == (3, 9) for c in chosen) and max(int(c.max()) for c in chosen) == 15
    if "t2v" in recipe:
        assert sample.group_size == 24 and algorithm.best_of_n_k == 4
        advantages = torch.tensor([float(i) for i in (5, 17, 2, 11, 23, 8, 14, 0, 20, 3, 9, 16)] * 2)
        advantages[12:] += 100  # a second group
        chosen = best_of_n_mask(advantages, torch.arange(24) // 12, 4)
        expected = {0, 2, 4, 7, 8, 9, 1, 11}  # values 0, 2, 3, 5 and 23, 20, 17, 16 of the first group
        assert set(chosen[:12].nonzero().flatten().tolist()) == expected
        assert set((chosen[12:].nonzero().flatten()).tolist()) == expected


# ----- image-to-video: the stored source --------------------------------------------------------------------------
def test_the_source_image_is_encoded_once_and_stored_for_training():
    """conditioning['image_latents'] is the source's VAE posterior mode x scaling factor on the first latent frame,
    zeros after, repeated for the group; the recomputed log-probs read it (a changed source changes them)."""
    sampler = _sampler("tiny:hunyuan_video_i2v")
    vae = sampler.pipeline.vae
    sources = _sources(2)
    options = dataclasses.replace(OPTIONS, num_frames=9)
    rollout = sampler.rollout(PROMPTS, options, group_size=2, metadata=sources)
    stored = rollout.conditioning["image_latents"]
    assert stored.shape == (4, 4, 3, 2, 2)
    for row, source in enumerate(sources):
        pixels = source["image"][None, :, None] * 2 - 1  # [1, 3, 1, H, W] in [-1, 1]
        expected = vae.encode(pixels).latent_dist.mode() * vae.config.scaling_factor
        for member in (2 * row, 2 * row + 1):
            torch.testing.assert_close(stored[member, :, :1], expected[0], atol=1e-6, rtol=0)
    assert not stored[:, :, 1:].any()
    assert (stored[0] - stored[2]).abs().max() > 1e-3  # prompts have their own sources
    swapped = dataclasses.replace(
        rollout, conditioning={**rollout.conditioning, "image_latents": stored.flip(0)}
    )
    recomputed, _ = sampler.recompute_log_probs(swapped)
    assert (recomputed - rollout.log_probs).abs().max() > 1e-3


def test_the_source_may_be_a_path_and_is_required(tmp_path):
    from PIL import Image

    sampler = _sampler("tiny:hunyuan_video_i2v")
    picture = _sources(1)[0]["image"]
    path = tmp_path / "source.png"
    Image.fromarray((picture.permute(1, 2, 0) * 255).round().byte().numpy()).save(path)
    from_path = sampler.rollout(PROMPTS[:1], OPTIONS, metadata=[{"image": str(path)}])
    from_tensor = sampler.rollout(PROMPTS[:1], OPTIONS, metadata=[{"image": picture}])
    assert (from_path.latents - from_tensor.latents).abs().max() < 1e-2  # 8-bit rounding of the PNG
    with pytest.raises(ValueError, match="'image'"):
        sampler.rollout(PROMPTS[:1], OPTIONS)


# ----- memory options ---------------------------------------------------------------------------------------------
def test_gradient_checkpointing_gives_the_same_log_probs_and_gradients():
    sampler = _sampler("tiny:hunyuan_video")
    attach_random_lora(sampler)
    rollout = sampler.rollout(PROMPTS, OPTIONS)
    results = []
    for checkpointing in (False, True):
        if checkpointing:
            sampler.denoiser.enable_gradient_checkpointing()
        sampler.denoiser.zero_grad()
        log_probs = sampler.log_prob(rollout, [0, 1]).log_probs
        log_probs.sum().backward()
        grads = {n: p.grad.clone() for n, p in sampler.denoiser.named_parameters() if p.grad is not None}
        results.append((log_probs.detach(), grads))
    assert sampler.denoiser.gradient_checkpointing
    torch.testing.assert_close(results[0][0], results[1][0], atol=1e-6, rtol=0)
    assert results[0][1].keys() == results[1][1].keys() and results[0][1]
    for name, grad in results[0][1].items():
        torch.testing.assert_close(results[1][1][name], grad, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("name", ["tiny:hunyuan_video", "tiny:hunyuan_video_15"])
def test_vae_slicing_and_tiling_decode_the_same_video(name):
    sampler = _sampler(name)
    rollout = sampler.rollout(PROMPTS, dataclasses.replace(OPTIONS, height=32, width=32))
    final = rollout.latents[:, -1]
    sampler.pipeline.vae.enable_slicing()
    torch.testing.assert_close(sampler.decode(final, (32, 32)), rollout.pixels, atol=1e-5, rtol=0)
    sampler.pipeline.vae.disable_slicing()
    sampler.pipeline.vae.enable_tiling()  # tiles only above the VAE's minimum tile: the tiny video is one tile
    torch.testing.assert_close(sampler.decode(final, (32, 32)), rollout.pixels, atol=1e-5, rtol=0)
