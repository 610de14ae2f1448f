"""What the start-up checks need to know about each model family and tiny model, importable without torch.

``gen_rl/inputs.py`` reads these tables before torch is imported (``tests/test_inputs.py`` checks that), so
this module imports nothing but the standard library; the samplers and tiny builders load on demand.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Family:
    """A model family: its sampler class (``module:Class``) and how its image sides are constrained."""

    sampler: str
    image_multiple: int  # sides must be multiples of this when the checkpoint's config files are not at hand
    patch_size: int | None  # latent patch side (FLUX packs 2x2, SD's UNet 1); None: transformer/config.json
    step_kinds: tuple[str, ...] = (
        "flow_grpo",
        "dance_grpo",
        "cps",
    )  # the sample.sde_type values it steps with


@dataclass(frozen=True)
class TinyModel:
    """A tiny randomly initialised pipeline built in code (tests, CPU demo, benchmarks): ``tiny:<name>``."""

    family: str
    image_multiple: int  # the tiny pipeline's VAE scale x latent patch
    builder: str  # ``module:function`` in pipelines.tiny
    kwargs: dict[str, Any] = field(default_factory=dict)


FAMILIES: dict[str, Family] = {
    "flux": Family("pipelines.flux:FluxSampler", image_multiple=16, patch_size=2),
    "sd3": Family("pipelines.sd3:SD3Sampler", image_multiple=16, patch_size=None),
    "sd": Family("pipelines.sd:SDSampler", image_multiple=8, patch_size=1, step_kinds=("ddim",)),
    "sdxl": Family("pipelines.sdxl:SDXLSampler", image_multiple=8, patch_size=1, step_kinds=("ddim",)),
    "wan": Family("pipelines.wan:WanSampler", image_multiple=16, patch_size=2),
    "wan_i2v": Family("pipelines.wan:WanI2VSampler", image_multiple=16, patch_size=2),
    "qwen_image": Family("pipelines.qwen_image:QwenImageSampler", image_multiple=16, patch_size=2),
    "flux2": Family("pipelines.flux2:Flux2Sampler", image_multiple=16, patch_size=2),
    "flux2_klein": Family("pipelines.flux2:Flux2KleinSampler", image_multiple=16, patch_size=2),
    "z_image": Family("pipelines.z_image:ZImageSampler", image_multiple=16, patch_size=2),
    "flux_kontext": Family("pipelines.flux_kontext:FluxKontextSampler", image_multiple=16, patch_size=2),
    "hunyuan_video": Family(
        "pipelines.hunyuan_video:HunyuanVideoSampler", image_multiple=16, patch_size=None
    ),
    "hunyuan_video_i2v": Family(
        "pipelines.hunyuan_video:HunyuanVideoI2VSampler", image_multiple=16, patch_size=None
    ),
    "hunyuan_video_15": Family(
        "pipelines.hunyuan_video_15:HunyuanVideo15Sampler", image_multiple=16, patch_size=None
    ),
}

TINY_MODELS: dict[str, TinyModel] = {
    "tiny:qwen_image": TinyModel(
        "qwen_image", 8, "pipelines.tiny_2026:tiny_qwen_image_pipeline", {"seed": 0}
    ),
    "tiny:flux2": TinyModel("flux2", 2, "pipelines.tiny_2026:tiny_flux2_pipeline", {"seed": 0}),
    "tiny:flux2_klein": TinyModel(
        "flux2_klein", 2, "pipelines.tiny_2026:tiny_flux2_klein_pipeline", {"seed": 0}
    ),
    "tiny:z_image": TinyModel("z_image", 2, "pipelines.tiny_2026:tiny_z_image_pipeline", {"seed": 0}),
    "tiny:flux_kontext": TinyModel(
        "flux_kontext", 2, "pipelines.tiny_2026:tiny_flux_kontext_pipeline", {"seed": 0}
    ),
    "tiny:flux": TinyModel("flux", 2, "pipelines.tiny:tiny_flux_pipeline", {"seed": 0}),
    "tiny:flux-pixel": TinyModel(
        "flux", 2, "pipelines.tiny:tiny_flux_pipeline", {"seed": 0, "pixel_decoder": True}
    ),
    "tiny:sd3": TinyModel("sd3", 1, "pipelines.tiny:tiny_sd3_pipeline", {"seed": 0}),
    "tiny:sd": TinyModel("sd", 2, "pipelines.tiny:tiny_sd_pipeline", {"seed": 0}),
    "tiny:sd-pixel": TinyModel(
        "sd", 1, "pipelines.tiny:tiny_sd_pipeline", {"seed": 0, "pixel_decoder": True}
    ),
    "tiny:sd2": TinyModel("sd", 2, "pipelines.tiny_sdxl:tiny_sd2_pipeline", {"seed": 0}),
    "tiny:sdxl": TinyModel("sdxl", 2, "pipelines.tiny_sdxl:tiny_sdxl_pipeline", {"seed": 0}),
    "tiny:sdxl-pixel": TinyModel(
        "sdxl", 1, "pipelines.tiny_sdxl:tiny_sdxl_pipeline", {"seed": 0, "pixel_decoder": True}
    ),
    "tiny:wan": TinyModel("wan", 16, "pipelines.tiny_wan:tiny_wan_pipeline", {"seed": 0}),
    "tiny:wan22": TinyModel(
        "wan", 16, "pipelines.tiny_wan:tiny_wan_pipeline", {"seed": 0, "two_experts": True}
    ),
    "tiny:wan_i2v": TinyModel("wan_i2v", 16, "pipelines.tiny_wan:tiny_wan_i2v_pipeline", {"seed": 0}),
    "tiny:hunyuan_video": TinyModel(
        "hunyuan_video", 8, "pipelines.tiny_hunyuan:tiny_hunyuan_video_pipeline", {"seed": 0}
    ),
    "tiny:hunyuan_video_i2v": TinyModel(
        "hunyuan_video_i2v", 8, "pipelines.tiny_hunyuan:tiny_hunyuan_video_i2v_pipeline", {"seed": 0}
    ),
    "tiny:hunyuan_video_15": TinyModel(
        "hunyuan_video_15", 4, "pipelines.tiny_hunyuan:tiny_hunyuan_video_15_pipeline", {"seed": 0}
    ),
}


def load_object(path: str) -> Any:
    """The object at ``package.module:name`` (imports the module)."""
    module_name, _, attribute = path.partition(":")
    return getattr(importlib.import_module(module_name), attribute)


def build_tiny_pipeline(name: str, family: str | None = None) -> Any:
    """Build the tiny pipeline ``name`` (``tiny:...``); a clear error when unknown or of another family."""
    if name not in TINY_MODELS:
        raise ValueError(f"unknown tiny model {name!r}; use one of {', '.join(TINY_MODELS)}")
    tiny = TINY_MODELS[name]
    if family is not None and tiny.family != family:
        raise ValueError(f"model.pretrained={name!r} is a {tiny.family} model but model.family={family!r}")
    return load_object(tiny.builder)(**tiny.kwargs)
