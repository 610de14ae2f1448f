"""Samplers: everything that knows a model family. ``SAMPLERS`` maps a family name to its adapter.

Importing this package is torch-free: the family tables (``pipelines.families``) are plain data, and the
samplers (which import torch and diffusers) load on first use of a name below (PEP 562 module ``__getattr__``).
"""

from __future__ import annotations

import importlib
from typing import Any

from pipelines.families import FAMILIES, TINY_MODELS, load_object

_LAZY = {
    "DDIMSampler": "pipelines.base",
    "FlowMatchSampler": "pipelines.base",
    "NoiseGrid": "pipelines.base",
    "Rollout": "pipelines.base",
    "RolloutOptions": "pipelines.base",
    "Sampler": "pipelines.base",
    "StepLogProbs": "pipelines.base",
    "FluxSampler": "pipelines.flux",
    "Flux2KleinSampler": "pipelines.flux2",
    "Flux2Sampler": "pipelines.flux2",
    "FluxKontextSampler": "pipelines.flux_kontext",
    "HunyuanVideo15Sampler": "pipelines.hunyuan_video_15",
    "HunyuanVideoI2VSampler": "pipelines.hunyuan_video",
    "HunyuanVideoSampler": "pipelines.hunyuan_video",
    "QwenImageSampler": "pipelines.qwen_image",
    "ZImageSampler": "pipelines.z_image",
    "SD3Sampler": "pipelines.sd3",
    "SDSampler": "pipelines.sd",
    "SDEPipeline": "pipelines.notebook",
    "SDEPipelineOutput": "pipelines.notebook",
    "SDXLSampler": "pipelines.sdxl",
    "WanSampler": "pipelines.wan",
    "WanI2VSampler": "pipelines.wan",
}


def __getattr__(name: str) -> Any:
    if name == "SAMPLERS":
        return {family: load_object(spec.sampler) for family, spec in FAMILIES.items()}
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'pipelines' has no attribute {name!r}")


def build_sampler(family: str, pretrained: Any, **kwargs: Any) -> Any:
    """Sampler for ``family`` from a local path / hub id (str) or an existing diffusers pipeline object."""
    from gen_rl.core.registry import resolve

    sampler_class = resolve(__getattr__("SAMPLERS"), family, "model family")
    if isinstance(pretrained, str):
        return sampler_class.from_pretrained(pretrained, **kwargs)
    if kwargs:
        raise ValueError(f"loading options {sorted(kwargs)} apply only when loading from a path or hub id")
    return sampler_class(pretrained)


__all__ = [
    "FAMILIES",
    "SDEPipeline",
    "SDEPipelineOutput",
    "SAMPLERS",
    "TINY_MODELS",
    "DDIMSampler",
    "FlowMatchSampler",
    "FluxSampler",
    "Flux2KleinSampler",
    "Flux2Sampler",
    "FluxKontextSampler",
    "HunyuanVideo15Sampler",
    "HunyuanVideoI2VSampler",
    "HunyuanVideoSampler",
    "QwenImageSampler",
    "ZImageSampler",
    "NoiseGrid",
    "Rollout",
    "RolloutOptions",
    "SD3Sampler",
    "SDSampler",
    "SDXLSampler",
    "Sampler",
    "StepLogProbs",
    "WanI2VSampler",
    "WanSampler",
    "build_sampler",
]
