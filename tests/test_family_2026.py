"""The 2026 image families under the family contract: Qwen-Image (``tiny:qwen_image``), FLUX.2 dev
(``tiny:flux2``) and klein (``tiny:flux2_klein``), Z-Image (``tiny:z_image``) and FLUX.1 Kontext editing
(``tiny:flux_kontext``: a prompt plus a source image), plus what is theirs alone: Qwen-Image's norm-rescaled CFG,
Z-Image's ``x0 - noise`` output and ``1 + g`` guidance, klein's refusal of CFG when distilled, FLUX.2's schedule,
and Kontext's source stored in the rollout and used at training time."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from family_contract import (
    assert_batch_independent,
    assert_lora_export_reproduces_policy,
    assert_recomputed_log_probs_equal_stored,
    assert_short_run_trains,
    assert_zero_noise_matches_pipeline,
)
from PIL import Image
from trainer_helpers import ROOT

from gen_rl.core.images import load_condition_image
from gen_rl.core.seeding import make_generators
from pipelines import Rollout, RolloutOptions, build_sampler
from pipelines.families import TINY_MODELS, build_tiny_pipeline
from pipelines.flux_kontext import SOURCE_KEY
from pipelines.tiny_2026 import tiny_flux2_klein_pipeline

PROMPTS = ["a red apple", "a blue sky over green hills"]
OPTIONS = RolloutOptions(num_steps=3, height=16, width=16, noise_level=0.7, max_sequence_length=48)
CFG = {"cfg_scale": 3.0, "negative_prompt": "blurry"}
SOURCES = [Image.new("RGB", (16, 16), (220, 40, 30)), Image.new("RGB", (16, 16), (20, 60, 230))]
MODELS = ["tiny:qwen_image", "tiny:flux2", "tiny:flux2_klein", "tiny:z_image", "tiny:flux_kontext"]
CFG_MODELS = ["tiny:qwen_image", "tiny:z_image", "tiny:flux_kontext", "tiny:flux2_klein-base"]
CONFIGS = ROOT / "configs"
FLUX_DEMO = CONFIGS / "demo" / "tiny_flux_cpu.yaml"
EDIT_PROMPTS = CONFIGS / "editing" / "prompts"


def _pipeline(name: str):
    if name == "tiny:flux2_klein-base":
        pipeline = tiny_flux2_klein_pipeline(is_distilled=False)
    else:
        pipeline = build_tiny_pipeline(name)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def _sampler(name: str):
    family = "flux2_klein" if name == "tiny:flux2_klein-base" else TINY_MODELS[name].family
    return build_sampler(family, _pipeline(name))


def _metadata(name: str) -> list[dict] | None:
    return [{"image": source} for source in SOURCES] if name == "tiny:flux_kontext" else None


def _pipeline_images(sampler):
    """The diffusers pipeline's own call for the rollout's samples (one row per sample, seeds from the record)."""
    family = sampler.family

    def images(rollout, options):
        use_cfg = options.cfg_scale > 1
        negative = [options.negative_prompt] * len(rollout) if use_cfg else None
        kwargs = {}
        if family == "qwen_image":
            kwargs = {"true_cfg_scale": options.cfg_scale, "negative_prompt": negative}
        elif family == "z_image":  # pos + g (pos - neg) with g = cfg_scale - 1
            kwargs = {"guidance_scale": options.cfg_scale - 1, "negative_prompt": negative}
        elif family == "flux2_klein":  # its negative prompt is always ""
            kwargs = {"guidance_scale": options.cfg_scale}
        elif family == "flux_kontext":
            kwargs = {"true_cfg_scale": options.cfg_scale, "negative_prompt": negative, "_auto_resize": False}
            kwargs.update(
                image=[item["image"] for item in rollout.metadata], max_area=options.height * options.width
            )
        return sampler.pipeline(
            prompt=rollout.prompts,
            height=options.height,
            width=options.width,
            num_inference_steps=options.num_steps,
            max_sequence_length=options.max_sequence_length,
            generator=make_generators(rollout.seeds.tolist()),
            output_type="pt",
            **kwargs,
        ).images

    return images


# ----- the contract ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", MODELS)
def test_zero_noise_reproduces_the_diffusers_pipeline(name):
    sampler = _sampler(name)
    assert_zero_noise_matches_pipeline(
        sampler, PROMPTS, OPTIONS, _pipeline_images(sampler), metadata=_metadata(name), atol=1e-5
    )


@pytest.mark.parametrize("name", CFG_MODELS)
def test_zero_noise_with_true_cfg_reproduces_the_diffusers_pipeline(name):
    sampler = _sampler(name)
    options = dataclasses.replace(OPTIONS, **CFG)
    if name == "tiny:flux2_klein-base":
        options = dataclasses.replace(options, negative_prompt="")
    assert_zero_noise_matches_pipeline(
        sampler, PROMPTS, options, _pipeline_images(sampler), metadata=_metadata(name), atol=1e-5
    )


@pytest.mark.parametrize("name", MODELS)
def test_recomputed_log_probs_equal_stored_and_batch_independence(name):
    sampler = _sampler(name)
    options = OPTIONS
    if name in CFG_MODELS:
        options = dataclasses.replace(OPTIONS, **CFG, sde_window=(1, 3))
    assert_recomputed_log_probs_equal_stored(sampler, PROMPTS, options, metadata=_metadata(name))
    assert_batch_independent(sampler, PROMPTS, options, metadata=_metadata(name))


@pytest.mark.parametrize("name", MODELS)
def test_lora_export_loads_with_load_lora_weights_and_reproduces_the_policy(name, tmp_path):
    assert_lora_export_reproduces_policy(
        _sampler(name), lambda: _pipeline(name), PROMPTS, OPTIONS, tmp_path, metadata=_metadata(name)
    )


# ----- a short CPU training run per family -----------------------------------------------------------------------
@pytest.mark.parametrize("name", MODELS)
def test_a_short_run_trains_and_writes_metrics(name, tmp_path):
    overrides = [f"model.family={TINY_MODELS[name].family}", f"model.pretrained={name}", "log.monitors=false"]
    overrides += ["sample.max_sequence_length=32", "sample.num_steps=3", "sample.group_size=2"]
    overrides += ["train.samples_per_update=2", "train.microbatch_size=2", "eval.max_prompts=1"]
    if name == "tiny:flux_kontext":
        overrides += [f"data.train_prompts={EDIT_PROMPTS / 'edit_train.jsonl'}"]
        overrides += [f"data.eval_prompts={EDIT_PROMPTS / 'edit_eval.jsonl'}"]
    assert_short_run_trains(FLUX_DEMO, tmp_path, *overrides)


# ----- what is each family's own ---------------------------------------------------------------------------------
@pytest.mark.parametrize("name", MODELS)
def test_a_static_shift_gives_the_closed_form_grid(name):
    """``sample.shift = s`` replaces the dynamic shift: sigma = s t / (1 + (s - 1) t) on the family's unshifted grid
    t (Z-Image's float32 linspace, the others' float64 one), then Qwen-Image's shift_terminal stretch."""
    sampler = _sampler(name)
    options = dataclasses.replace(OPTIONS, num_steps=4, shift=3.0)
    latents = sampler.initial_latents(make_generators([0]), (16, 16))
    sigmas, timesteps = sampler.grid(options, latents)
    unshifted = np.linspace(1.0, 1 / 4, 4)
    if name == "tiny:z_image":
        unshifted = torch.linspace(1.0, 1 / 4, 4).double().numpy()
    expected = 3 * unshifted / (1 + 2 * unshifted)
    terminal = sampler.scheduler.config.get("shift_terminal")
    if terminal:
        scale = (1 - expected[-1]) / (1 - terminal)
        expected = 1 - (1 - expected) / scale
    torch.testing.assert_close(sigmas[:-1].double(), torch.from_numpy(expected), rtol=0, atol=1e-6)
    assert sigmas[-1] == 0
    torch.testing.assert_close(timesteps, sigmas[:-1] * 1000)


def test_qwen_image_cfg_is_rescaled_to_the_conditional_norm():
    """Qwen-Image's true CFG: the guided velocity points along v_neg + w (v_pos - v_neg) and has, per token, the
    conditional velocity's norm (QwenImagePipeline's true_cfg_scale)."""
    sampler = _sampler("tiny:qwen_image")
    options = dataclasses.replace(OPTIONS, **CFG)
    conditioning = sampler.encode_prompts(PROMPTS, options, 1)
    latents = sampler.initial_latents(make_generators([0, 1]), (16, 16))
    timesteps = torch.full((2,), 700.0)
    guided = sampler.predict(latents, timesteps, conditioning, 3.0, (16, 16))
    positive = sampler.model_output(latents, timesteps, conditioning, (16, 16))
    negative = {
        key.removeprefix("negative_"): value for key, value in conditioning.items() if "negative_" in key
    }
    unconditional = sampler.model_output(latents, timesteps, negative, (16, 16))
    plain = unconditional + 3.0 * (positive - unconditional)
    torch.testing.assert_close(guided.norm(dim=-1), positive.norm(dim=-1))
    cosine = torch.nn.functional.cosine_similarity(guided, plain, dim=-1)
    torch.testing.assert_close(cosine, torch.ones_like(cosine))
    assert (guided.norm(dim=-1) - plain.norm(dim=-1)).abs().max() > 1e-3  # the rescaling did something


def test_z_image_velocity_is_the_negated_transformer_output():
    """Z-Image's transformer predicts x0 - noise at time (1000 - t) / 1000 on per-sample lists: the velocity the
    flow step uses is its negation."""
    sampler = _sampler("tiny:z_image")
    conditioning = sampler.encode_prompts(PROMPTS, OPTIONS, 1)
    latents = sampler.initial_latents(make_generators([0, 1]), (16, 16))
    timesteps = torch.tensor([900.0, 250.0])
    velocity = sampler.model_output(latents, timesteps, conditioning, (16, 16))
    for row, length in enumerate(conditioning["prompt_lengths"].tolist()):
        caption = conditioning["prompt_embeds"][row, :length]
        (alone,) = sampler.denoiser(
            [latents[row, :, None]], (1000 - timesteps[row : row + 1]) / 1000, [caption]
        )[0]
        torch.testing.assert_close(velocity[row], -alone[:, 0].float())


@pytest.mark.parametrize(
    ("name", "changes", "message"),
    [
        ("tiny:flux2_klein", {"cfg_scale": 3.0}, "step-distilled"),
        ("tiny:flux2_klein", {"guidance": 4.0}, "no guidance embedding"),
        ("tiny:flux2", {"cfg_scale": 3.0}, "guidance-distilled"),
        ("tiny:qwen_image", {"guidance": 4.0}, "no guidance embedding"),
        ("tiny:z_image", {"guidance": 4.0}, "no guidance embedding"),
    ],
)
def test_settings_a_family_would_ignore_are_refused(name, changes, message):
    with pytest.raises(ValueError, match=message):
        _sampler(name).rollout(PROMPTS, dataclasses.replace(OPTIONS, **changes), metadata=_metadata(name))


@pytest.mark.parametrize("name", ["tiny:qwen_image", "tiny:z_image", "tiny:flux2_klein"])
def test_rollouts_of_prompts_of_different_lengths_concatenate_and_recompute(name):
    """Prompt embeddings are stored padded to max_sequence_length, so rollouts of short and long prompts
    concatenate (as the trainer concatenates its rollout calls) and still recompute their log-probs exactly."""
    sampler = _sampler(name)
    short = sampler.rollout(["a"], OPTIONS)
    long = sampler.rollout(["a red apple on a wooden table in the sun"], OPTIONS)
    both = Rollout.cat([short, long])
    assert both.conditioning["prompt_embeds"].shape[1] == OPTIONS.max_sequence_length
    assert sampler.check_log_probs(both, atol=1e-5) <= 1e-5
    assert not torch.equal(short.conditioning["prompt_embeds"], long.conditioning["prompt_embeds"])


def test_qwen_image_template_drop_lands_on_the_prompt():
    """The tiny tokenizer splits Qwen-Image's system turn into the 34 tokens the pipeline drops, so the prompt
    embeddings start at the prompt (with more or fewer, every prompt would start with template text)."""
    pipeline = _pipeline("tiny:qwen_image")
    ids = pipeline.tokenizer(pipeline.prompt_template_encode.format("xq")).input_ids
    start = pipeline.prompt_template_encode_start_idx
    assert pipeline.tokenizer.convert_ids_to_tokens(ids[start : start + 2]) == ["x", "q"]


def test_kontext_stores_the_encoded_source_and_trains_on_it():
    """The source enters the rollout as its VAE-mode packed latents (one row per sample), and the recomputed
    log-probs depend on that stored source: with the two prompts' sources swapped they fail the ratio-1 check."""
    sampler = _sampler("tiny:flux_kontext")
    rollout = sampler.rollout(PROMPTS, OPTIONS, group_size=2, metadata=_metadata("tiny:flux_kontext"))
    stored = rollout.conditioning[SOURCE_KEY]
    sources = torch.stack([load_condition_image(source, 16, 16) for source in SOURCES])
    with torch.no_grad():
        expected = sampler.encode(sources).repeat_interleave(2, dim=0)
    torch.testing.assert_close(stored, expected)
    assert sampler.check_log_probs(rollout, atol=1e-5) <= 1e-5
    swapped = dataclasses.replace(rollout, conditioning={**rollout.conditioning, SOURCE_KEY: stored.flip(0)})
    recomputed, _ = sampler.recompute_log_probs(swapped)
    assert (recomputed - rollout.log_probs).abs().max() > 1e-5


def test_kontext_refuses_a_prompt_without_a_source_image():
    with pytest.raises(ValueError, match="'image'"):
        _sampler("tiny:flux_kontext").rollout(PROMPTS, OPTIONS, metadata=[{"image": SOURCES[0]}, {}])


@pytest.mark.parametrize("name", MODELS)
def test_every_lora_target_names_a_linear_layer_of_the_denoiser(name):
    """A misspelt target would leave that projection untrained without any error from peft (others match)."""
    sampler = _sampler(name)
    linear_names = [
        key for key, module in sampler.denoiser.named_modules() if isinstance(module, torch.nn.Linear)
    ]
    for target in sampler.lora_target_modules:
        assert any(key == target or key.endswith("." + target) for key in linear_names), target


def test_qwen_image_encode_is_the_img2img_pipelines_encoding_packed():
    """``encode`` (clean latents for forward-process algorithms) is QwenImageImg2ImgPipeline's own VAE encoding
    (same generator, same sample) with its latent normalisation, packed like the rollout's latents."""
    from diffusers import QwenImageImg2ImgPipeline

    sampler = _sampler("tiny:qwen_image")
    pixels = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        encoded = sampler.encode(pixels, torch.Generator().manual_seed(3))
        img2img = QwenImageImg2ImgPipeline(**sampler.pipeline.components)
        images = img2img.image_processor.normalize(pixels)[:, :, None]
        reference = img2img._encode_vae_image(images, torch.Generator().manual_seed(3))[:, :, 0]
    expected = img2img._pack_latents(reference, 2, reference.shape[1], 4, 4)
    torch.testing.assert_close(encoded, expected)


@pytest.mark.parametrize("name", MODELS)
def test_encode_gives_the_rollout_latent_layout(name):
    """Pixels encode to the layout the rollout stores (packed tokens, patchified tokens or [C, h, w])."""
    sampler = _sampler(name)
    metadata = _metadata(name)
    rollout = sampler.rollout(PROMPTS, OPTIONS, metadata=metadata)
    with torch.no_grad():
        encoded = sampler.encode(rollout.pixels)
    assert encoded.shape == rollout.latents[:, -1].shape and encoded.dtype == rollout.latents.dtype
