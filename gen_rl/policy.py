"""Build the trained generator from a config: load the sampler, freeze it, attach LoRA (or unfreeze)."""

from __future__ import annotations

import torch
from peft import LoraConfig

from gen_rl.core.config import ConfigError
from gen_rl.core.dtypes import DTYPES
from gen_rl.trainer_config import ModelConfig
from pipelines import TINY_MODELS as _TINY_MODEL_TABLE
from pipelines import Sampler, build_sampler
from pipelines.families import build_tiny_pipeline

TINY_MODELS = tuple(_TINY_MODEL_TABLE)  # the names of pipelines.families.TINY_MODELS


def load_sampler(model: ModelConfig, device: torch.device) -> Sampler:
    """The family's sampler from a path / hub id, or a tiny model built in code (``tiny:*``), on ``device``."""
    dtype = DTYPES[model.dtype]
    if model.pretrained.startswith("tiny:"):
        sampler = build_sampler(model.family, build_tiny_pipeline(model.pretrained, model.family))
        if dtype != torch.float32:  # built in float32
            sampler.pipeline.to(dtype=dtype)
    else:
        sampler = build_sampler(model.family, model.pretrained, dtype=dtype)
    sampler.pipeline.to(device)
    if model.trained_experts:
        if not hasattr(sampler, "trained_experts"):
            raise ConfigError(
                f"model.trained_experts applies to two-expert models (the wan families); the {model.family} "
                "sampler has one denoiser. Remove the key."
            )
        try:
            sampler.trained_experts = tuple(model.trained_experts)
        except ValueError as error:
            raise ConfigError(f"model.trained_experts: {error}") from error
    vae = getattr(sampler.pipeline, "vae", None)
    if model.vae_tiling:
        vae.enable_tiling()  # decode / encode in tiles: less memory for large images and videos
    if model.vae_slicing:
        vae.enable_slicing()  # one sample at a time
    for component in sampler.pipeline.components.values():
        if isinstance(component, torch.nn.Module):
            component.requires_grad_(False)
            component.eval()
    return sampler


def make_trainable(sampler: Sampler, model: ModelConfig) -> list[torch.nn.Parameter]:
    """Attach a LoRA adapter (B = 0, so the policy starts equal to the reference) or unfreeze the denoiser.

    The LoRA targets default to the family's ``Sampler.lora_target_modules``. Trainable parameters are kept in
    float32 whatever the frozen weights' dtype. Returns them.
    """
    denoiser = sampler.denoiser
    if model.lora:
        targets = model.lora_target_modules or list(sampler.lora_target_modules)
        if not targets:
            raise ValueError(
                f"the {sampler.family} sampler declares no default LoRA target modules; set "
                "model.lora_target_modules (module-name suffixes of its denoiser)"
            )
        denoiser.add_adapter(
            LoraConfig(
                r=model.lora_rank, lora_alpha=model.lora_alpha, target_modules=targets, init_lora_weights=True
            )
        )
    else:
        denoiser.requires_grad_(True)
    parameters = [param for param in denoiser.parameters() if param.requires_grad]
    for param in parameters:
        param.data = param.data.float()
    if model.gradient_checkpointing:
        denoiser.enable_gradient_checkpointing()
    return parameters
