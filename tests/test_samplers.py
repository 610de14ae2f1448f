"""Sampler contract for the SD3 and FLUX adapters on tiny models loaded from disk."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from diffusers import DDIMScheduler

from gen_rl.core.seeding import make_generators
from pipelines import FluxSampler, Rollout, RolloutOptions, SD3Sampler, build_sampler

FAMILIES = ["flux", "flux_schnell", "sd3"]
PROMPTS = ["a red apple", "a blue sky"]
BASE = RolloutOptions(num_steps=5, height=32, width=32, max_sequence_length=24, noise_level=0.7)


def _options(**changes) -> RolloutOptions:
    return dataclasses.replace(BASE, **changes)


def _pipeline_images(sampler, rollout: Rollout, options: RolloutOptions) -> torch.Tensor:
    """The diffusers pipeline's own output for the rollout's prompts and initial-noise seeds."""
    kwargs = {}
    if isinstance(sampler, FluxSampler):
        kwargs["guidance_scale"] = 3.5
        if options.cfg_scale > 1:
            kwargs.update(true_cfg_scale=options.cfg_scale, negative_prompt=options.negative_prompt)
    else:
        kwargs.update(guidance_scale=options.cfg_scale, negative_prompt=options.negative_prompt)
    return sampler.pipeline(
        rollout.prompts,
        num_inference_steps=options.num_steps,
        height=options.height,
        width=options.width,
        generator=make_generators(rollout.seeds.tolist()),
        output_type="pt",
        max_sequence_length=options.max_sequence_length,
        **kwargs,
    ).images


@pytest.mark.parametrize("family", FAMILIES)
def test_rollout_shapes_and_grid(samplers, family):
    sampler = samplers[family]
    rollout = sampler.rollout(PROMPTS, BASE, group_size=3)
    batch, steps = 6, BASE.num_steps
    assert rollout.latents.shape[:2] == (batch, steps + 1)
    assert rollout.latents.dtype == sampler.dtype
    assert rollout.sigmas.shape == (batch, steps + 1) and rollout.timesteps.shape == (batch, steps)
    assert rollout.sigmas[:, 0].eq(1).all() and rollout.sigmas[:, -1].eq(0).all()
    assert (rollout.sigmas[:, 1:] < rollout.sigmas[:, :-1]).all()
    assert rollout.log_probs.shape == (batch, steps) and torch.isfinite(rollout.log_probs).all()
    assert rollout.stochastic.all()
    assert rollout.pixels.shape == (batch, 3, 32, 32)
    assert rollout.pixels.min() >= 0 and rollout.pixels.max() <= 1
    assert rollout.prompts == [PROMPTS[0]] * 3 + [PROMPTS[1]] * 3
    assert rollout.group_ids.tolist() == [0, 0, 0, 1, 1, 1]
    assert rollout.members.tolist() == [0, 1, 2, 0, 1, 2]
    assert all(value.shape[0] == batch for value in rollout.conditioning.values())


@pytest.mark.parametrize("family", FAMILIES)
def test_same_seed_same_result_and_seeds_vary(samplers, family):
    sampler = samplers[family]
    first = sampler.rollout(PROMPTS, BASE, group_size=2)
    again = sampler.rollout(PROMPTS, BASE, group_size=2)
    assert torch.equal(first.latents, again.latents) and torch.equal(first.log_probs, again.log_probs)
    next_epoch = sampler.rollout(PROMPTS, BASE, group_size=2, epoch=1)
    other_seed = sampler.rollout(PROMPTS, _options(seed=1), group_size=2)
    for other in (next_epoch, other_seed):
        assert not torch.allclose(first.latents[:, 0], other.latents[:, 0])
    assert len(set(first.seeds.tolist())) == 4


def test_noise_depends_on_prompt_and_member_not_on_batch(samplers):
    sampler = samplers["flux"]
    pair = sampler.rollout(PROMPTS, BASE, group_size=2)
    alone = sampler.rollout(PROMPTS[1:], BASE, group_size=2)
    torch.testing.assert_close(alone.latents, pair.latents[2:], atol=1e-5, rtol=1e-5)
    keyed = sampler.rollout(PROMPTS[1:], BASE, group_size=2, prompt_keys=["prompt-7"])
    assert not torch.allclose(keyed.latents[:, 0], alone.latents[:, 0])


def test_shared_initial_noise_within_group(samplers):
    sampler = samplers["sd3"]
    shared = sampler.rollout(PROMPTS, _options(share_initial_noise=True), group_size=3)
    assert torch.equal(shared.latents[0, 0], shared.latents[2, 0])
    assert not torch.equal(shared.latents[0, 0], shared.latents[3, 0])
    assert not torch.allclose(shared.latents[0, -1], shared.latents[1, -1])
    independent = sampler.rollout(PROMPTS, BASE, group_size=3)
    assert not torch.equal(independent.latents[0, 0], independent.latents[1, 0])


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("cfg_scale", [1.0, 2.5])
def test_zero_noise_reproduces_the_diffusers_pipeline(samplers, family, cfg_scale):
    sampler = samplers[family]
    options = _options(noise_level=0.0, cfg_scale=cfg_scale, negative_prompt="blurry")
    rollout = sampler.rollout(PROMPTS, options, group_size=2)
    reference = _pipeline_images(sampler, rollout, options)
    torch.testing.assert_close(rollout.pixels, reference, atol=1e-5, rtol=0)
    assert not rollout.stochastic.any() and rollout.log_probs.isnan().all()


@pytest.mark.parametrize("family", FAMILIES)
def test_sde_moves_away_from_the_ode(samplers, family):
    sampler = samplers[family]
    ode = sampler.rollout(PROMPTS, _options(noise_level=0.0))
    sde = sampler.rollout(PROMPTS, BASE)
    assert torch.equal(ode.latents[:, 0], sde.latents[:, 0])
    assert (ode.latents[:, -1].float() - sde.latents[:, -1].float()).abs().mean() > 1e-2


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize(
    "changes",
    [
        {},
        {"cfg_scale": 3.0, "negative_prompt": "blurry"},
        {"sde_window": (1, 3)},
        {"sde_type": "dance_grpo", "noise_level": 0.4},
        {"sde_type": "cps", "noise_level": 0.8, "cfg_scale": 2.0},
    ],
    ids=["flow_grpo", "cfg", "window", "dance_grpo", "cps_cfg"],
)
def test_recomputed_log_probs_equal_stored(samplers, family, changes):
    sampler = samplers[family]
    rollout = sampler.rollout(PROMPTS, _options(**changes), group_size=2)
    assert sampler.check_log_probs(rollout, atol=1e-4) <= 1e-4
    steps = rollout.stochastic[0].nonzero().flatten().tolist()
    recomputed = sampler.log_prob(rollout, steps)
    torch.testing.assert_close(recomputed.log_probs, rollout.log_probs[:, steps], atol=1e-4, rtol=0)
    assert recomputed.means.shape[:2] == (4, len(steps)) and (recomputed.stds > 0).all()


def test_window_and_cps_mark_deterministic_steps(samplers):
    sampler = samplers["flux"]
    window = sampler.rollout(PROMPTS, _options(sde_window=(1, 3)))
    assert window.stochastic[0].tolist() == [False, True, True, False, False]
    assert window.log_probs[:, [0, 3, 4]].isnan().all() and window.log_probs[:, 1:3].isfinite().all()
    cps = sampler.rollout(PROMPTS, _options(sde_type="cps"))
    assert cps.stochastic[0].tolist() == [
        True,
        True,
        True,
        True,
        False,
    ]  # the last CPS step lands on s=0 exactly
    with pytest.raises(ValueError, match="deterministic"):
        sampler.log_prob(window, [0])


def test_per_sample_step_indices(samplers):
    sampler = samplers["sd3"]
    rollout = sampler.rollout(PROMPTS, BASE, group_size=2)
    generator = torch.Generator().manual_seed(0)
    indices = torch.stack([torch.randperm(BASE.num_steps, generator=generator)[:3] for _ in range(4)])
    recomputed = sampler.log_prob(rollout, indices)
    torch.testing.assert_close(recomputed.log_probs, rollout.log_probs.gather(1, indices), atol=1e-4, rtol=0)


def test_log_prob_has_gradients_and_changes_with_weights(samplers, saved_pipelines):
    sampler = build_sampler("flux", str(saved_pipelines["flux"]))
    rollout = sampler.rollout(PROMPTS, BASE)
    out = sampler.log_prob(rollout, [0, 2])
    out.log_probs.sum().backward()
    grads = [p.grad for p in sampler.transformer.parameters() if p.grad is not None]
    assert grads and sum(float(g.abs().sum()) for g in grads) > 0
    with torch.no_grad():
        for parameter in sampler.transformer.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    assert (sampler.log_prob(rollout, [0, 2]).log_probs - out.log_probs).abs().max() > 1e-4


def test_ratio_check_fails_loudly_when_the_model_is_not_reproducible(saved_pipelines):
    sampler = build_sampler("sd3", str(saved_pipelines["sd3"]))
    rollout = sampler.rollout(PROMPTS, BASE)
    with torch.no_grad():
        sampler.transformer.proj_out.bias.add_(0.3)  # the policy that sampled is not the one being checked
    with pytest.raises(RuntimeError, match=r"step \d+:.*torch.float32"):  # the worst step is named
        sampler.check_log_probs(rollout)


def test_rollout_select_and_cat_round_trip(samplers):
    rollout = samplers["flux"].rollout(
        PROMPTS, BASE, group_size=2, metadata=[{"colour": "red"}, {"colour": "blue"}]
    )
    head, tail = rollout.select([0, 1]), rollout.select([2, 3])
    assert head.metadata == [{"colour": "red"}] * 2 and tail.prompts == [PROMPTS[1]] * 2
    merged = Rollout.cat([head, tail])
    for name in ("latents", "log_probs", "sigmas", "pixels", "group_ids", "seeds"):
        assert torch.equal(getattr(merged, name), getattr(rollout, name))
    assert torch.equal(merged.conditioning["prompt_embeds"], rollout.conditioning["prompt_embeds"])


def test_static_shift_option_changes_the_grid(samplers):
    sampler = samplers["sd3"]
    default = sampler.rollout(PROMPTS[:1], _options(decode=False))
    shifted = sampler.rollout(PROMPTS[:1], _options(shift=1.0, decode=False))
    assert not torch.allclose(default.sigmas, shifted.sigmas)
    assert shifted.pixels is None
    # shift 1 leaves the scheduler's linear grid from sigma_max = 1 to sigma_min = 1/1000 unshifted
    torch.testing.assert_close(shifted.sigmas[0, :-1], torch.linspace(1, 0.001, 5), atol=1e-6, rtol=0)


def test_clear_errors(samplers, saved_pipelines, tmp_path):
    flux = samplers["flux"]
    with pytest.raises(ValueError, match="unknown model family 'fluxx'.*Did you mean 'flux'"):
        build_sampler("fluxx", str(saved_pipelines["flux"]))
    with pytest.raises(ValueError, match=r"sde_window \(2, 9\) is outside the schedule of 5 steps"):
        flux.rollout(PROMPTS, _options(sde_window=(2, 9)))
    with pytest.raises(ValueError, match="group_size must be >= 1"):
        flux.rollout(PROMPTS, BASE, group_size=0)
    with pytest.raises(ValueError, match="2 metadata records for 1 prompts"):
        flux.rollout(PROMPTS[:1], BASE, metadata=[{}, {}])
    with pytest.raises(ValueError, match="at least one prompt"):
        flux.rollout([], BASE)
    with pytest.raises(ValueError, match="sde_type|unknown"):
        flux.rollout(PROMPTS, _options(sde_type="ddpm"))
    with pytest.raises(ValueError, match="no guidance embedding"):
        samplers["flux_schnell"].rollout(PROMPTS, _options(guidance=3.5))
    with pytest.raises(ValueError, match="multiples of 2"):
        flux.rollout(PROMPTS, _options(height=33))
    with pytest.raises(FileNotFoundError, match="model_index.json"):
        SD3Sampler.from_pretrained(str(tmp_path / "missing"))


def test_pipeline_without_expected_components_is_refused(saved_pipelines):
    from diffusers import FluxPipeline

    pipeline = FluxPipeline.from_pretrained(saved_pipelines["flux"])
    pipeline.transformer = None
    with pytest.raises(ValueError, match=r"lacks \['transformer'\]"):
        FluxSampler(pipeline)
    pipeline = FluxPipeline.from_pretrained(saved_pipelines["flux"])
    pipeline.scheduler = DDIMScheduler()
    with pytest.raises(
        ValueError, match="rectified-flow scheduler config .* DDIMScheduler predicts 'epsilon'"
    ):
        FluxSampler(pipeline)


def test_a_checkpoint_shipping_another_flow_scheduler_class_loads(saved_pipelines, tmp_path):
    """Wan ships UniPC with flow sigmas: the sampler builds its own FlowMatchEuler grid from that config (its
    flow_shift as the shift) instead of refusing; the grid equals the one of FlowMatchEuler(shift=flow_shift)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline, UniPCMultistepScheduler

    pipeline = StableDiffusion3Pipeline.from_pretrained(saved_pipelines["sd3"])
    pipeline.scheduler = UniPCMultistepScheduler(
        prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0
    )
    pipeline.save_pretrained(tmp_path / "unipc")
    sampler = build_sampler("sd3", str(tmp_path / "unipc"))
    assert type(sampler.pipeline.scheduler).__name__ == "UniPCMultistepScheduler"
    assert (
        isinstance(sampler.scheduler, FlowMatchEulerDiscreteScheduler)
        and sampler.scheduler.config.shift == 3.0
    )
    rollout = sampler.rollout(PROMPTS[:1], _options(decode=False))
    reference = FlowMatchEulerDiscreteScheduler(shift=3.0)
    reference.set_timesteps(BASE.num_steps)
    torch.testing.assert_close(rollout.sigmas[0], reference.sigmas, atol=0, rtol=0)
    unshifted = sampler.rollout(PROMPTS[:1], _options(decode=False, shift=1.0))
    assert not torch.allclose(unshifted.sigmas, rollout.sigmas)


def test_bfloat16_rollout_keeps_ratio_one(saved_pipelines):
    """Latents are stored in the model dtype and the log-prob is taken of the stored (rounded) value."""
    sampler = build_sampler("flux", str(saved_pipelines["flux"]), dtype=torch.bfloat16)
    rollout = sampler.rollout(PROMPTS, BASE, group_size=2)
    assert rollout.latents.dtype == torch.bfloat16 and rollout.log_probs.dtype == torch.float32
    assert sampler.check_log_probs(rollout, atol=1e-6) <= 1e-6
    recomputed = sampler.log_prob(rollout, [0, 4]).log_probs
    torch.testing.assert_close(recomputed, rollout.log_probs[:, [0, 4]], atol=1e-6, rtol=0)
