"""Build the trained generator from a config: load the sampler, freeze it, attach LoRA (or unfreeze)."""

from __future__ import annotations

import torch
from peft import LoraConfig

from gen_rl.core.dtypes import DTYPES
from gen_rl.export import lora_target_modules
from gen_rl.trainer_config import ModelConfig
from pipelines import FlowMatchSampler, build_sampler

TINY_MODELS = ("tiny:flux", "tiny:flux-pixel", "tiny:sd3")


def load_sampler(model: ModelConfig, device: torch.device) -> FlowMatchSampler:
    """The family's sampler from a path / hub id, or a tiny model built in code (``tiny:*``), on ``device``."""
    dtype = DTYPES[model.dtype]
    if model.pretrained.startswith("tiny:"):
        sampler = build_sampler(model.family, _tiny_pipeline(model.pretrained, model.family))
        if dtype != torch.float32:  # built in float32
            sampler.pipeline.to(dtype=dtype)
    else:
        sampler = build_sampler(model.family, model.pretrained, dtype=dtype)
    sampler.pipeline.to(device)
    for component in sampler.pipeline.components.values():
        if isinstance(component, torch.nn.Module):
            component.requires_grad_(False)
            component.eval()
    return sampler


def _tiny_pipeline(name: str, family: str):
    from pipelines.tiny import tiny_flux_pipeline, tiny_sd3_pipeline

    expected = {"tiny:flux": "flux", "tiny:flux-pixel": "flux", "tiny:sd3": "sd3"}
    if name not in expected:
        raise ValueError(f"unknown tiny model {name!r}; use one of {', '.join(TINY_MODELS)}")
    if expected[name] != family:
        raise ValueError(f"model.pretrained={name!r} is a {expected[name]} model but model.family={family!r}")
    if name == "tiny:sd3":
        return tiny_sd3_pipeline(seed=0)
    return tiny_flux_pipeline(seed=0, pixel_decoder=name == "tiny:flux-pixel")


def make_trainable(sampler: FlowMatchSampler, model: ModelConfig) -> list[torch.nn.Parameter]:
    """Attach a LoRA adapter (B = 0, so the policy starts equal to the reference) or unfreeze the transformer.

    Trainable parameters are kept in float32 whatever the frozen weights' dtype. Returns them.
    """
    transformer = sampler.transformer
    if model.lora:
        targets = model.lora_target_modules or lora_target_modules(sampler.family)
        transformer.add_adapter(
            LoraConfig(
                r=model.lora_rank, lora_alpha=model.lora_alpha, target_modules=targets, init_lora_weights=True
            )
        )
    else:
        transformer.requires_grad_(True)
    parameters = [param for param in transformer.parameters() if param.requires_grad]
    for param in parameters:
        param.data = param.data.float()
    if model.gradient_checkpointing:
        transformer.enable_gradient_checkpointing()
    return parameters
