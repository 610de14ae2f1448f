"""Diffusers-style pipeline objects for notebooks: ``from_pretrained``, ``load_lora_weights``, ``__call__``.

    pipe = SDEPipeline.from_pretrained("black-forest-labs/FLUX.1-dev", dtype=torch.bfloat16).to("cuda")
    pipe.load_lora_weights("outputs/run/checkpoints/checkpoint-000300/lora")
    out = pipe("a cat in a hat", num_inference_steps=16, noise_level=0.7, return_trajectory=True)
    out.images[0]        # a PIL image (video families: out.frames[0], a list of PIL frames)
    out.log_probs        # [B, S] per-step log-probabilities of the SDE sample (NaN on ODE steps)
    out.rollout          # the whole record: latents at every step, noise grid, conditioning

One class serves every family: ``from_pretrained`` reads the checkpoint's ``model_index.json`` to pick the family's
sampler (``family=`` overrides it; ``tiny:<name>`` builds a tiny model in code). The call is the family's
sampler rollout (the diffusers pipeline's own encode / latents / VAE, the SDE step of ``sde_type``), so the
samples are exactly what training sees; ``noise_level=0`` (the default) is the deterministic sampler.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from pipelines.base import Rollout, RolloutOptions, Sampler
from pipelines.families import FAMILIES, TINY_MODELS, build_tiny_pipeline, load_object


@dataclass
class SDEPipelineOutput:
    """What a call returns: PIL ``images`` (image families) or ``frames`` (video: one list of PIL frames per
    sample), and with ``return_trajectory=True`` the per-step ``log_probs`` ``[B, S]`` and the ``rollout``."""

    images: list[Any] | None = None
    frames: list[list[Any]] | None = None
    log_probs: torch.Tensor | None = None
    rollout: Rollout | None = None


def family_of(path_or_id: str) -> str:
    """The family whose diffusers pipeline class a local checkpoint's ``model_index.json`` names."""
    if path_or_id in TINY_MODELS:
        return TINY_MODELS[path_or_id].family
    index = Path(path_or_id) / "model_index.json"
    if not index.is_file():
        raise ValueError(
            f"cannot tell the family of {path_or_id!r} (no local model_index.json); pass family=, one of "
            f"{', '.join(FAMILIES)}"
        )
    class_name = json.loads(index.read_text())["_class_name"]
    for family, spec in FAMILIES.items():
        if load_object(spec.sampler).pipeline_class.__name__ == class_name:
            return family
    raise ValueError(
        f"{path_or_id} holds a {class_name}, which no family samples; pass family= to choose one"
    )


class SDEPipeline:
    """A family's sampler behind a diffusers-like interface (see the module docstring)."""

    def __init__(self, sampler: Sampler) -> None:
        self.sampler = sampler

    @classmethod
    def from_pretrained(cls, path_or_id: str, family: str | None = None, **kwargs: Any) -> SDEPipeline:
        """Load a local folder, a hub id (with ``family=``) or ``tiny:<name>``; ``kwargs`` go to diffusers'
        ``from_pretrained`` (e.g. ``dtype=torch.bfloat16``)."""
        from pipelines import build_sampler

        family = family or family_of(path_or_id)
        if path_or_id in TINY_MODELS:
            return cls(build_sampler(family, build_tiny_pipeline(path_or_id, family)))
        return cls(build_sampler(family, path_or_id, **kwargs))

    @property
    def pipeline(self) -> Any:
        """The wrapped diffusers pipeline."""
        return self.sampler.pipeline

    def to(self, device: str | torch.device) -> SDEPipeline:
        """Move every component (as ``DiffusionPipeline.to``); returns self."""
        self.sampler.pipeline.to(device)
        return self

    def load_lora_weights(self, path: str | Path, **kwargs: Any) -> None:
        """Load a LoRA in diffusers' format (what gen-rl checkpoints hold) with diffusers' own loader."""
        self.sampler.pipeline.load_lora_weights(path, **kwargs)

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str],
        num_inference_steps: int = 20,
        height: int | None = None,
        width: int | None = None,
        num_frames: int | None = None,
        guidance_scale: float = 1.0,
        negative_prompt: str = "",
        noise_level: float = 0.0,
        sde_type: str | None = None,
        num_images_per_prompt: int = 1,
        seed: int = 0,
        image: Any = None,
        return_trajectory: bool = False,
        **options: Any,
    ) -> SDEPipelineOutput:
        """Sample ``num_images_per_prompt`` per prompt (true CFG when ``guidance_scale > 1``; ``image``: the source
        of image-to-video / editing families); other ``RolloutOptions`` fields may be passed by name."""
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        metadata = [{"image": image} for _ in prompts] if image is not None else None
        rollout_options = RolloutOptions(
            num_steps=num_inference_steps,
            height=height,
            width=width,
            num_frames=num_frames,
            cfg_scale=guidance_scale,
            negative_prompt=negative_prompt,
            noise_level=noise_level,
            sde_type=sde_type or self.sampler.step_kinds[0],
            seed=seed,
            **options,
        )
        rollout = self.sampler.rollout(
            prompts, rollout_options, group_size=num_images_per_prompt, metadata=metadata
        )
        output = SDEPipelineOutput()
        if rollout.pixels.ndim == 5:
            output.frames = [[_pil(frame) for frame in sample.unbind(1)] for sample in rollout.pixels]
        else:
            output.images = [_pil(sample) for sample in rollout.pixels]
        if return_trajectory:
            output.rollout, output.log_probs = rollout, rollout.log_probs
        return output


def _pil(pixels: torch.Tensor) -> Any:
    from PIL import Image

    array = (pixels.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
    return Image.fromarray(array)
