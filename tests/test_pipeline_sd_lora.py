"""SD family LoRA: the trainer's make_trainable attaches the family's UNet targets, and save_lora writes
``unet.*`` keys that diffusers' ``StableDiffusionPipeline.load_lora_weights`` reads back to the same model."""

from __future__ import annotations

import torch
from peft.tuners.lora import LoraLayer
from safetensors.torch import load_file

from gen_rl.export import LORA_WEIGHT_NAME, merge_lora, save_lora
from gen_rl.policy import make_trainable
from gen_rl.trainer_config import ModelConfig
from pipelines import build_sampler
from pipelines.tiny import tiny_sd_pipeline

RANK, ALPHA = 4, 8  # scale 2: an export that dropped the scale would not reproduce the model


def _latents(pipeline) -> torch.Tensor:
    pipeline.set_progress_bar_config(disable=True)
    return pipeline(
        "a red apple",
        num_inference_steps=2,
        height=32,
        width=32,
        output_type="latent",
        generator=torch.Generator().manual_seed(0),
    ).images


def _trained_sampler():
    sampler = build_sampler("sd", tiny_sd_pipeline(seed=0))
    model = ModelConfig(family="sd", pretrained="tiny:sd", lora_rank=RANK, lora_alpha=ALPHA)
    parameters = make_trainable(sampler, model)
    assert parameters and all(parameter.dtype == torch.float32 for parameter in parameters)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, parameter in sampler.denoiser.named_parameters():
            if "lora_B" in name:  # B starts at zero (policy == reference); make the adapter do something
                parameter.copy_(0.3 * torch.randn(parameter.shape, generator=generator))
    return sampler


def test_make_trainable_targets_the_unet_attention_projections():
    sampler = _trained_sampler()
    targets = ("to_q", "to_k", "to_v", "to_out.0")
    assert sampler.lora_target_modules == targets
    layers = [name for name, module in sampler.denoiser.named_modules() if isinstance(module, LoraLayer)]
    assert all(name.endswith(tuple("." + target for target in targets)) for name in layers)
    assert all(any(name.endswith("." + target) for name in layers) for target in targets)
    assert any(".attn1." in name for name in layers) and any(".attn2." in name for name in layers)


def test_saved_sd_lora_loads_into_a_fresh_pipeline(tmp_path):
    sampler = _trained_sampler()
    trained = _latents(sampler.pipeline)
    folder = save_lora(sampler, tmp_path / "lora")
    keys = load_file(folder / LORA_WEIGHT_NAME)
    assert keys and all(key.startswith("unet.") for key in keys)
    fresh = tiny_sd_pipeline(seed=0)
    untrained = _latents(fresh)
    fresh.load_lora_weights(folder)
    torch.testing.assert_close(_latents(fresh), trained, rtol=0, atol=1e-6)
    assert (untrained - trained).abs().max() > 1e-2
    merge_lora(sampler)
    assert not any(isinstance(module, LoraLayer) for module in sampler.denoiser.modules())
    torch.testing.assert_close(_latents(sampler.pipeline), trained, rtol=0, atol=1e-5)
