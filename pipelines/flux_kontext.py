"""Image editing with FLUX.1 Kontext over diffusers' ``FluxKontextPipeline``: a prompt plus a source image.

Kontext is FLUX.1-dev with in-context image conditioning: the source image's packed VAE latents are appended to
the noisy image tokens (position ids with first axis 1 instead of 0) and the output keeps the noisy tokens only.
So this adapter is ``FluxSampler`` (its prompt encoding, packing, schedule, VAE) plus ``encode_conditions``: each
prompt's metadata ``image`` is loaded at the output size, encoded with the VAE mode exactly as the pipeline's
``_encode_vae_image`` (``sample_mode="argmax"``), packed, and stored in ``rollout.conditioning["image_latents"]``,
so training recomputes every step with exactly the stored source (and both CFG branches share it).
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers import FluxKontextPipeline
from torch import Tensor

from gen_rl.core.images import load_condition_image
from pipelines.base import RolloutOptions
from pipelines.flux import FluxSampler, draw_packed_latents

SOURCE_KEY = "image_latents"


class FluxKontextSampler(FluxSampler):
    """SDE sampler for FLUX.1 Kontext [dev]: text-guided editing of one source image per prompt."""

    family = "flux_kontext"
    pipeline_class = FluxKontextPipeline
    conditions = ("image",)

    def encode_conditions(
        self,
        metadata: list[dict[str, Any]],
        options: RolloutOptions,
        num_per_prompt: int,
        image_size: tuple[int, int],
        num_frames: int | None,
    ) -> dict[str, Tensor]:
        """Each prompt's source image (metadata ``image``: path, PIL image or ``[3, H, W]`` tensor in [0, 1]),
        resized to the output size, as packed VAE-mode latents ``[B, tokens, 4 * C]`` (one row per sample)."""
        height, width = image_size
        pixels = torch.stack([load_condition_image(item["image"], height, width) for item in metadata])
        source = self.encode(pixels)
        return {SOURCE_KEY: source.repeat_interleave(num_per_prompt, dim=0)}

    def initial_latents(
        self, generators: list[torch.Generator], image_size: tuple[int, int], num_frames: int | None = None
    ) -> Tensor:
        """Packed latents drawn exactly as ``FluxKontextPipeline.prepare_latents`` draws them (no source there:
        the source is encoded by ``encode_conditions``)."""
        return draw_packed_latents(self, generators, image_size, None)

    def model_output(
        self, latents: Tensor, timesteps: Tensor, conditioning: dict[str, Tensor], image_size: tuple[int, int]
    ) -> Tensor:
        """One Kontext call: noisy tokens then source tokens (ids with first axis 1); the noisy tokens' output."""
        source = conditioning[SOURCE_KEY]
        prompt_embeds = conditioning["prompt_embeds"]
        image_ids, text_ids = self._position_ids(image_size, prompt_embeds.shape[1], latents)
        source_ids = image_ids.clone()
        source_ids[:, 0] = 1
        output = self.active_denoiser(
            hidden_states=torch.cat([latents, source.to(latents.dtype)], dim=1),
            timestep=timesteps.to(latents.dtype) / 1000,
            guidance=conditioning.get("guidance"),
            pooled_projections=conditioning["pooled_prompt_embeds"],
            encoder_hidden_states=prompt_embeds,
            txt_ids=text_ids,
            img_ids=torch.cat([image_ids, source_ids]),
            return_dict=False,
        )[0]
        return output[:, : latents.shape[1]]
