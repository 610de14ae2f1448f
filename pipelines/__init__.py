"""Samplers: everything that knows a model family. ``SAMPLERS`` maps a family name to its adapter."""

from __future__ import annotations

from typing import Any

from gen_rl.core.registry import resolve
from pipelines.base import FlowMatchSampler, Rollout, RolloutOptions, StepLogProbs
from pipelines.flux import FluxSampler
from pipelines.sd3 import SD3Sampler

SAMPLERS: dict[str, type[FlowMatchSampler]] = {"flux": FluxSampler, "sd3": SD3Sampler}


def build_sampler(family: str, pretrained: Any, **kwargs: Any) -> FlowMatchSampler:
    """Sampler for ``family`` from a local path / hub id (str) or an existing diffusers pipeline object."""
    sampler_class = resolve(SAMPLERS, family, "model family")
    if isinstance(pretrained, str):
        return sampler_class.from_pretrained(pretrained, **kwargs)
    if kwargs:
        raise ValueError(f"loading options {sorted(kwargs)} apply only when loading from a path or hub id")
    return sampler_class(pretrained)


__all__ = [
    "SAMPLERS",
    "FlowMatchSampler",
    "FluxSampler",
    "Rollout",
    "RolloutOptions",
    "SD3Sampler",
    "StepLogProbs",
]
__all__ += ["build_sampler"]
