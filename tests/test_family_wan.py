"""The Wan families on tiny models built in code: Wan 2.1 text-to-video, Wan 2.2's two experts and Wan 2.1
image-to-video keep the family contract (zero noise = WanPipeline / WanImageToVideoPipeline, ratio == 1, batch
independence, LoRA export through Wan's ``load_lora_weights``, a short training run); each grid point calls the
expert WanPipeline calls, at rollout and at log-prob recomputation; the grid is the shipped scheduler's; a rollout
written as MP4 reads back with its frames and size."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import UniPCMultistepScheduler
from family_contract import (
    assert_batch_independent,
    assert_lora_export_reproduces_policy,
    assert_recomputed_log_probs_equal_stored,
    assert_short_run_trains,
    assert_zero_noise_matches_pipeline,
    attach_random_lora,
)
from PIL import Image

from gen_rl.core.seeding import make_generators
from gen_rl.core.video_io import read_video, write_mp4
from gen_rl.export import lora_state_dict, save_lora
from pipelines import RolloutOptions, WanI2VSampler, WanSampler
from pipelines.tiny_wan import TINY_NUM_FRAMES, tiny_wan_i2v_pipeline, tiny_wan_pipeline
from pipelines.wan import WanExperts

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ["a red apple", "a blue sky"]
HEIGHT, WIDTH = 16, 32  # not square: a swapped height / width cannot pass
# 4 steps on the tiny grid (shift 3): timesteps 1000 | 857, 600, 3 -> one high-noise step, then three low-noise ones
OPTIONS = RolloutOptions(num_steps=4, height=HEIGHT, width=WIDTH, max_sequence_length=16, noise_level=0.7)
CFG = dataclasses.replace(OPTIONS, cfg_scale=4.0, negative_prompt="blurry")


def source_image(seed: int) -> Image.Image:
    generator = np.random.default_rng(seed)
    return Image.fromarray(generator.integers(0, 256, (HEIGHT, WIDTH, 3), dtype=np.uint8))


SOURCES = [{"image": source_image(0)}, {"image": source_image(1)}]
MODELS = {
    "wan": (WanSampler, tiny_wan_pipeline, None, OPTIONS),
    "wan22": (WanSampler, lambda: tiny_wan_pipeline(two_experts=True), None, CFG),
    "wan_i2v": (WanI2VSampler, tiny_wan_i2v_pipeline, SOURCES, OPTIONS),
}


def pipeline_videos(sampler):
    """The diffusers pipeline's own output for a rollout's prompts and seeds, as ``[B, 3, T, H, W]``."""

    def videos(rollout, options):
        kwargs = dict(
            num_inference_steps=options.num_steps,
            height=options.height,
            width=options.width,
            num_frames=rollout.num_frames,
            max_sequence_length=options.max_sequence_length,
            guidance_scale=options.cfg_scale,
            negative_prompt=options.negative_prompt,
            output_type="pt",
        )
        if not sampler.conditions:
            frames = sampler.pipeline(
                rollout.prompts,
                generator=make_generators(rollout.seeds.tolist()),
                **{**kwargs, "negative_prompt": [options.negative_prompt] * len(rollout)},
            ).frames
        else:  # WanImageToVideoPipeline takes one image per call
            frames = torch.cat(
                [
                    sampler.pipeline(
                        image=record["image"],
                        prompt=[prompt],
                        generator=make_generators([int(seed)]),
                        **kwargs,
                    ).frames
                    for prompt, record, seed in zip(
                        rollout.prompts, rollout.metadata, rollout.seeds, strict=True
                    )
                ]
            )
        return frames.permute(0, 2, 1, 3, 4)  # [B, T, 3, H, W] -> [B, 3, T, H, W]

    return videos


@pytest.mark.parametrize("name", sorted(MODELS))
def test_the_contract_holds(name, tmp_path):
    sampler_class, build, metadata, options = MODELS[name]
    sampler = sampler_class(build())
    if name == "wan22":  # a one-expert adapter: the contract loads the export with plain load_lora_weights
        sampler.trained_experts = ("high",)
    rollout = assert_zero_noise_matches_pipeline(
        sampler, PROMPTS, options, pipeline_videos(sampler), metadata=metadata
    )
    assert rollout.pixels.shape == (2, 3, TINY_NUM_FRAMES, HEIGHT, WIDTH)
    assert rollout.latents.dtype == torch.float32  # the pipeline's float32 latents, also in the record
    assert_recomputed_log_probs_equal_stored(sampler, PROMPTS, options, metadata=metadata)
    assert_batch_independent(sampler, PROMPTS, options, metadata=metadata)
    assert_lora_export_reproduces_policy(sampler, build, PROMPTS, options, tmp_path, metadata=metadata)


# ----- Wan 2.2: two experts ------------------------------------------------------------------------------------
def record_expert_calls(pipeline) -> tuple[list[tuple[str, tuple[float, ...]]], list]:
    """A log of (expert, timesteps) per transformer call, and the hook handles."""
    calls: list[tuple[str, tuple[float, ...]]] = []
    handles = []
    for expert, module in (("high", pipeline.transformer), ("low", pipeline.transformer_2)):

        def hook(_module, _args, kwargs, expert=expert):
            calls.append((expert, tuple(float(t) for t in kwargs["timestep"].flatten())))

        handles.append(module.register_forward_pre_hook(hook, with_kwargs=True))
    return calls, handles


def test_each_grid_point_calls_the_experts_wan_pipeline_calls_at_rollout_and_at_recomputation():
    sampler = WanSampler(tiny_wan_pipeline(two_experts=True))
    calls, handles = record_expert_calls(sampler.pipeline)
    try:
        rollout = sampler.rollout(PROMPTS, OPTIONS)
        at_rollout = list(calls)
        calls.clear()
        sampler.pipeline(
            PROMPTS,
            num_inference_steps=OPTIONS.num_steps,
            height=HEIGHT,
            width=WIDTH,
            max_sequence_length=16,
            guidance_scale=1.0,
            generator=make_generators(rollout.seeds.tolist()),
            output_type="latent",
        )
        in_pipeline = list(calls)
        calls.clear()
        assert sampler.check_log_probs(rollout, atol=1e-5) <= 1e-5  # ratio == 1 on both sides of the boundary
        at_recomputation = list(calls)
        calls.clear()
        # DanceGRPO-style per-sample steps: sample 0 at step 0 (high), sample 1 at step 2 (low), one call
        mixed = sampler.log_prob(rollout, torch.tensor([[0], [2]]))
        split = list(calls)
    finally:
        for handle in handles:
            handle.remove()
    grid = rollout.timesteps[0].tolist()
    assert [expert for expert, _ in at_rollout] == ["high", "low", "low", "low"]
    assert [(e, t[0]) for e, t in at_rollout] == [(e, t[0]) for e, t in in_pipeline]
    assert at_recomputation == at_rollout
    assert sorted(split) == [("high", (grid[0],)), ("low", (grid[2],))]
    torch.testing.assert_close(mixed.log_probs[:, 0], rollout.log_probs[[0, 1], [0, 2]], rtol=0, atol=1e-5)
    boundary = sampler.boundary_timestep
    assert boundary == 875.0 and grid[0] >= boundary > grid[1]


def test_the_ratio_check_catches_a_grid_point_recomputed_with_the_other_expert():
    sampler = WanSampler(tiny_wan_pipeline(two_experts=True))
    rollout = sampler.rollout(PROMPTS, OPTIONS)
    sampler.pipeline.register_to_config(
        boundary_ratio=0.5
    )  # steps at t = 857 and 600 now go to the high expert
    recomputed, _ = sampler.recompute_log_probs(rollout)
    difference = (recomputed - rollout.log_probs).abs()
    assert float(difference[:, 0].max()) < 1e-5 and float(difference[:, 1:3].min()) > 1e-3


def test_the_boundary_is_wan_pipelines_inclusive_switch():
    sampler = WanSampler(tiny_wan_pipeline(two_experts=True))
    assert sampler.experts_at(torch.tensor([1000.0, 875.0, 874.99, 0.0])) == ["high", "high", "low", "low"]
    assert WanSampler(tiny_wan_pipeline()).experts_at(torch.tensor([1000.0, 1.0])) == ["high", "high"]


@pytest.mark.parametrize("experts", [("high",), ("low",), ("high", "low")], ids="+".join)
def test_lora_on_either_or_both_experts_exports_files_wan_loads(experts, tmp_path):
    """Each trained expert's adapter is its own diffusers file: ``load_lora_weights(folder)`` for the high-noise
    expert, ``load_into_transformer_2=True`` for the low-noise one; reloaded, they reproduce the policy."""
    pipeline = tiny_wan_pipeline(two_experts=True)
    sampler = WanSampler(pipeline, trained_experts=experts)
    modules = {"high": pipeline.transformer, "low": pipeline.transformer_2}
    assert sampler.denoisers == [modules[e] for e in experts]
    if len(experts) == 2:
        assert isinstance(sampler.denoiser, WanExperts) and sampler.denoiser.high is pipeline.transformer
    else:
        assert sampler.denoiser is modules[experts[0]]
    zero = dataclasses.replace(OPTIONS, noise_level=0.0, decode=False)
    base = sampler.rollout(PROMPTS, zero).latents[:, -1]
    attach_random_lora(sampler)
    trained = sampler.rollout(PROMPTS, zero).latents[:, -1]
    adapted = {e for e, module in modules.items() if any("lora_B" in n for n, _ in module.named_parameters())}
    assert adapted == set(experts)
    parts = sampler.lora_export_parts(lora_state_dict(sampler.denoiser))
    assert set(parts) == ({""} if len(experts) == 1 else {"high_noise", "low_noise"})
    folder = save_lora(sampler, tmp_path / "lora")  # one file per trained expert, named by its loader's slot
    fresh = tiny_wan_pipeline(two_experts=True)
    for part in parts:
        expert = {"": experts[0], "high_noise": "high", "low_noise": "low"}[part]
        fresh.load_lora_weights(folder / part, load_into_transformer_2=expert == "low")
    loaded = WanSampler(fresh).rollout(PROMPTS, zero).latents[:, -1]
    torch.testing.assert_close(loaded, trained, rtol=0, atol=1e-5)
    assert float((trained - base).abs().max()) > 1e-3


def test_both_experts_train_through_one_module():
    """With both experts trained, a loss over steps on both sides of the boundary reaches both adapters, and
    every trained parameter gets a gradient even in a call of one expert (DDP needs no unused parameters)."""
    from peft import LoraConfig

    sampler = WanSampler(tiny_wan_pipeline(two_experts=True))
    rollout = sampler.rollout(PROMPTS, OPTIONS)
    sampler.denoiser.add_adapter(
        LoraConfig(r=2, lora_alpha=2, target_modules=list(sampler.lora_target_modules))
    )
    sampler.forward_module = sampler.denoiser  # as a trainer sets it
    trained = [(n, p) for n, p in sampler.denoiser.named_parameters() if "lora_" in n]
    for name, parameter in trained:
        parameter.requires_grad_(True)
        if "lora_B" in name:
            torch.nn.init.normal_(parameter, std=0.1)
    with torch.enable_grad():
        sampler.log_prob(rollout, [0, 1]).log_probs.sum().backward()
    high = [p.grad for n, p in trained if n.startswith("high.")]
    low = [p.grad for n, p in trained if n.startswith("low.")]
    assert all(g is not None for g in high + low)
    assert max(float(g.abs().max()) for g in high) > 0 and max(float(g.abs().max()) for g in low) > 0
    for _, parameter in trained:
        parameter.grad = None
    with torch.enable_grad():
        sampler.log_prob(rollout, [0]).log_probs.sum().backward()  # the high expert only
    assert all(p.grad is not None for _, p in trained)
    assert all(float(p.grad.abs().max()) == 0 for n, p in trained if n.startswith("low."))


def test_the_trained_experts_are_checked():
    with pytest.raises(ValueError, match=r"subset of \['high'\]"):
        WanSampler(tiny_wan_pipeline(), trained_experts=("low",))
    with pytest.raises(ValueError, match="non-empty subset"):
        WanSampler(tiny_wan_pipeline(two_experts=True), trained_experts=())


# ----- the grid, sizes, frames ---------------------------------------------------------------------------------
def unipc_flow_sigmas(num_steps: int, shift: float, num_train_timesteps: int = 1000) -> list[float]:
    """UniPC's flow-sigma grid written out: linspace(1, 1/N, S+1) without its last point, shifted
    (s' = shift s / (1 + (shift - 1) s)), then 0 (the final sigma)."""
    sigmas = np.linspace(1, 1 / num_train_timesteps, num_steps + 1)[:-1]
    sigmas = shift * sigmas / (1 + (shift - 1) * sigmas)
    return [*sigmas.tolist(), 0.0]  # UniPC itself starts at 1 - 1e-6: the sampler's SDE steps start at 1


@pytest.mark.parametrize("shift", [None, 5.0])
def test_a_shipped_unipc_scheduler_gives_its_own_flow_grid(shift):
    """Released Wan checkpoints ship UniPC with flow sigmas (flow_shift 3.0 for Wan 2.1): the rollout runs on that
    scheduler's grid, and sample.shift replaces the flow shift."""
    pipeline = tiny_wan_pipeline()
    pipeline.scheduler = UniPCMultistepScheduler(
        prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0
    )
    sampler = WanSampler(pipeline)
    options = dataclasses.replace(OPTIONS, num_steps=6, shift=shift)
    sigmas, timesteps = sampler.grid(options, torch.zeros(1))
    expected = unipc_flow_sigmas(6, 3.0 if shift is None else shift)
    assert sigmas.tolist() == pytest.approx(expected, abs=1e-6)
    assert timesteps.tolist() == pytest.approx([math.floor(s * 1000) for s in expected[:-1]], abs=1.0)
    assert float(sigmas[0]) == 1.0  # not UniPC's 1 - 1e-6, which makes Flow-GRPO's first std ~700 a
    rollout = sampler.rollout(PROMPTS[:1], options)
    assert sampler.check_log_probs(rollout, atol=1e-5) <= 1e-5
    _, stds = sampler.recompute_log_probs(rollout)
    first_std = (
        0.7 * math.sqrt(1 / (1 - expected[1])) * math.sqrt(1 - expected[1])
    )  # a sqrt(s / (1 - s')) |ds|^.5
    assert float(stds[0, 0]) == pytest.approx(first_std, rel=1e-4)


def test_sizes_and_frames_are_checked():
    sampler = WanSampler(tiny_wan_pipeline())
    with pytest.raises(ValueError, match="multiples of 16"):
        sampler.rollout(PROMPTS, dataclasses.replace(OPTIONS, height=24))
    with pytest.raises(ValueError, match="num_frames must be 4k \\+ 1"):
        sampler.rollout(PROMPTS, dataclasses.replace(OPTIONS, num_frames=6))
    assert sampler.rollout(PROMPTS[:1], dataclasses.replace(OPTIONS, num_frames=9)).pixels.shape[2] == 9


def test_image_to_video_conditions_on_the_source():
    sampler = WanI2VSampler(tiny_wan_i2v_pipeline())
    with pytest.raises(ValueError, match="conditions every sample on metadata 'image'"):
        sampler.rollout(PROMPTS, OPTIONS)
    one = sampler.rollout(PROMPTS[:1], OPTIONS, group_size=2, metadata=SOURCES[:1])
    other = sampler.rollout(PROMPTS[:1], OPTIONS, group_size=2, metadata=SOURCES[1:])
    assert set(one.conditioning) == {"prompt_embeds", "condition", "image_embeds"}
    assert one.conditioning["condition"].shape == (2, 4 + 16, 2, HEIGHT // 8, WIDTH // 8)
    assert float((one.latents[:, -1] - other.latents[:, -1]).abs().max()) > 1e-3


def test_a_rollout_written_as_mp4_reads_back_with_its_frames_and_size(tmp_path):
    sampler = WanSampler(tiny_wan_pipeline())
    rollout = sampler.rollout(PROMPTS[:1], dataclasses.replace(OPTIONS, num_frames=9))
    path = write_mp4(rollout.pixels[0], tmp_path / "sample.mp4", fps=16)
    frames = read_video(path)
    assert frames.shape == (9, HEIGHT, WIDTH, 3)
    written = (rollout.pixels[0].permute(1, 2, 3, 0) * 255).round().numpy()
    assert np.abs(frames.astype(np.float64) - written).mean() < 3.0


# ----- training --------------------------------------------------------------------------------------------------
FAST = (
    f"sample.height={HEIGHT}",
    f"sample.width={WIDTH}",
    "sample.num_steps=2",
    "sample.group_size=2",
    "sample.groups_per_step=1",
    "train.samples_per_update=2",
    "eval.max_prompts=1",
    "checkpoint.every_steps=0",
)
RUNS = {
    "tiny:wan": ("tiny_wan_cpu.yaml", ()),
    "tiny:wan22": ("tiny_wan_cpu.yaml", ("model.pretrained=tiny:wan22",)),
    "tiny:wan_i2v": (
        "tiny_wan_i2v_cpu.yaml",
        (
            f"data.train_prompts={ROOT / 'configs/wan/prompts/i2v_train.jsonl'}",
            f"data.eval_prompts={ROOT / 'configs/wan/prompts/i2v_eval.jsonl'}",
        ),
    ),
}


@pytest.mark.parametrize("name", sorted(RUNS))
def test_a_short_run_trains(name, tmp_path, fresh_accelerator):
    config, overrides = RUNS[name]
    records = assert_short_run_trains(ROOT / "configs" / "demo" / config, tmp_path, *FAST, *overrides)
    assert all(math.isfinite(record["reward/mean"]) for record in records if "reward/mean" in record)
    video = read_video(tmp_path / "eval" / "step-000000" / "prompt-00.mp4")  # the evaluation's MP4
    assert video.shape == (TINY_NUM_FRAMES, HEIGHT, WIDTH, 3)


def test_the_trained_experts_key_reaches_the_sampler_and_is_refused_elsewhere():
    from gen_rl.core.config import ConfigError
    from gen_rl.policy import load_sampler, make_trainable
    from gen_rl.trainer_config import ModelConfig

    model = ModelConfig(family="wan", pretrained="tiny:wan22", trained_experts=["low"], lora_rank=2)
    sampler = load_sampler(model, torch.device("cpu"))
    make_trainable(sampler, model)
    low = [n for n, p in sampler.pipeline.transformer_2.named_parameters() if p.requires_grad]
    high = [n for n, p in sampler.pipeline.transformer.named_parameters() if p.requires_grad]
    assert low and not high
    with pytest.raises(ConfigError, match="model.trained_experts applies to two-expert models"):
        load_sampler(
            ModelConfig(family="flux", pretrained="tiny:flux", trained_experts=["low"]), torch.device("cpu")
        )
