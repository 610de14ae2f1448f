"""Stable Diffusion XL (epsilon or v-prediction UNet with two text encoders) over diffusers'
``StableDiffusionXLPipeline``.

Composes the pipeline's own ``encode_prompt`` (both CLIP encoders, penultimate hidden states concatenated, the
pooled projection of the second; SDXL's zero unconditional embeddings for an empty negative prompt), its
``_get_add_time_ids`` (the micro-conditioning of Podell et al., 2023, sec. 2.2: original size, crop top-left,
target size), diffusers' ``randn_tensor`` draw of ``prepare_latents`` and the VAE; the noise grid is the sampler's
own ``DDIMScheduler`` built from the shipped config (SDXL base ships Euler with ``leading`` spacing). Everything the
UNet is conditioned on sits in ``rollout.conditioning`` (``negative_*`` keys for the CFG branch), so training
recomputes each step with exactly the sampled conditioning.
"""

from __future__ import annotations

import torch
from diffusers import StableDiffusionXLPipeline
from torch import Tensor

from pipelines.base import NEGATIVE_PREFIX, DDIMSampler, RolloutOptions
from pipelines.sd import UNET_ATTENTION_LORA_TARGETS, UNetLatentsMixin


class SDXLSampler(UNetLatentsMixin, DDIMSampler):
    """DDIM-SDE sampler for SDXL base (and SDXL-architecture fine-tunes), true CFG with a negative prompt.

    ``original_size`` / ``target_size`` (height, width; None: the rollout's image size) and
    ``crops_coords_top_left`` are SDXL's size and crop conditioning, as the pipeline's arguments of those names;
    the CFG branch uses the same time ids (the pipeline's default without ``negative_original_size``).
    """

    family = "sdxl"
    pipeline_class = StableDiffusionXLPipeline
    required_components = ("unet", "vae", "text_encoder_2", "tokenizer_2")
    denoiser_component = "unet"
    lora_target_modules = UNET_ATTENTION_LORA_TARGETS

    def __init__(
        self,
        pipeline: StableDiffusionXLPipeline,
        *,
        original_size: tuple[int, int] | None = None,
        crops_coords_top_left: tuple[int, int] = (0, 0),
        target_size: tuple[int, int] | None = None,
    ) -> None:
        super().__init__(pipeline)
        self._refuse_embedded_guidance()
        if self.denoiser.config.get("addition_embed_type") != "text_time":
            raise ValueError(
                "the sdxl sampler needs an SDXL UNet (addition_embed_type 'text_time': pooled text embeds and "
                f"time ids); this UNet has {self.denoiser.config.get('addition_embed_type')!r}. Use family sd for "
                "SD 1.x / 2.x checkpoints"
            )
        self.original_size = None if original_size is None else tuple(original_size)
        self.crops_coords_top_left = tuple(crops_coords_top_left)
        self.target_size = None if target_size is None else tuple(target_size)

    def encode_prompts(
        self, prompts: list[str], options: RolloutOptions, num_per_prompt: int
    ) -> dict[str, Tensor]:
        """Both encoders' penultimate states ``[B, 77, D1 + D2]``, the pooled projection ``[B, P]`` and the
        ``add_time_ids`` ``[B, 6]``; ``negative_prompt_embeds`` / ``negative_pooled_prompt_embeds`` when
        ``cfg_scale > 1``. An empty ``negative_prompt`` gives zero unconditional embeddings when the pipeline's
        ``force_zeros_for_empty_prompt`` is set (SDXL base), as the pipeline called without a negative prompt."""
        use_cfg = options.cfg_scale > 1.0
        zeros_for_empty = self.pipeline.config.get("force_zeros_for_empty_prompt", False)
        negative = None
        if use_cfg and not (options.negative_prompt == "" and zeros_for_empty):
            negative = [options.negative_prompt] * len(prompts)
        prompt_embeds, negative_embeds, pooled_embeds, negative_pooled = self.pipeline.encode_prompt(
            prompt=prompts,
            device=self.device,
            num_images_per_prompt=num_per_prompt,
            do_classifier_free_guidance=use_cfg,
            negative_prompt=negative,
        )
        conditioning = {
            "prompt_embeds": prompt_embeds,
            "pooled_prompt_embeds": pooled_embeds,
            "add_time_ids": self.add_time_ids(
                self._image_size(options), prompt_embeds.dtype, len(prompt_embeds)
            ),
        }
        if use_cfg:
            conditioning[NEGATIVE_PREFIX + "prompt_embeds"] = negative_embeds
            conditioning[NEGATIVE_PREFIX + "pooled_prompt_embeds"] = negative_pooled
        return conditioning

    def add_time_ids(self, image_size: tuple[int, int], dtype: torch.dtype, batch: int) -> Tensor:
        """SDXL's micro-conditioning ``[batch, 6]``: (original size, crop top-left, target size) through the
        pipeline's ``_get_add_time_ids`` (which checks them against the UNet's added-embedding width)."""
        text_encoder_2 = self.pipeline.text_encoder_2
        time_ids = self.pipeline._get_add_time_ids(
            self.original_size or image_size,
            self.crops_coords_top_left,
            self.target_size or image_size,
            dtype=dtype,
            text_encoder_projection_dim=int(text_encoder_2.config.projection_dim),
        )
        return time_ids.to(self.device).repeat(batch, 1)

    def model_output(
        self, latents: Tensor, timesteps: Tensor, conditioning: dict[str, Tensor], image_size: tuple[int, int]
    ) -> Tensor:
        """One UNet call at per-sample timesteps with SDXL's added conditioning (pooled text, time ids)."""
        return self.active_denoiser(
            latents,
            timesteps,
            encoder_hidden_states=conditioning["prompt_embeds"],
            added_cond_kwargs={
                "text_embeds": conditioning["pooled_prompt_embeds"],
                "time_ids": conditioning["add_time_ids"],
            },
            return_dict=False,
        )[0]

    def encode(self, pixels: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Pixels ``[B, 3, H, W]`` in [0, 1] to latents, the inverse of :meth:`decode` (``latents_mean`` /
        ``latents_std`` when the VAE config has them)."""
        vae = self.pipeline.vae
        mean, std = vae.config.get("latents_mean"), vae.config.get("latents_std")
        if mean is None or std is None:
            return self._vae_encode(pixels, generator)
        images = self.pipeline.image_processor.normalize(pixels.to(self.device, vae.dtype))
        distribution = vae.encode(images).latent_dist
        latents = distribution.mode() if generator is None else distribution.sample(generator)
        shape = (1, -1) + (1,) * (latents.ndim - 2)
        mean = torch.tensor(mean).view(shape).to(latents.device, latents.dtype)
        std = torch.tensor(std).view(shape).to(latents.device, latents.dtype)
        return ((latents - mean) * vae.config.scaling_factor / std).to(self.dtype)

    def decode(self, latents: Tensor, image_size: tuple[int, int]) -> Tensor:
        """Latents to pixels ``[B, 3, H, W]`` in [0, 1] as the pipeline decodes them: ``latents_mean`` /
        ``latents_std`` when the VAE config has them (SDXL fine-tunes such as Playground v2.5), and the float16
        VAE upcast to float32 when its config says ``force_upcast`` (SDXL's VAE overflows in float16)."""
        vae = self.pipeline.vae
        mean, std = vae.config.get("latents_mean"), vae.config.get("latents_std")
        upcast = vae.dtype == torch.float16 and vae.config.get("force_upcast", False)
        if mean is None and std is None and not upcast:
            return self._vae_decode(latents)
        if mean is not None and std is not None:
            shape = (1, -1) + (1,) * (latents.ndim - 2)
            mean = torch.tensor(mean).view(shape).to(latents.device, latents.dtype)
            std = torch.tensor(std).view(shape).to(latents.device, latents.dtype)
            latents = latents * std / vae.config.scaling_factor + mean
        else:
            latents = latents / vae.config.scaling_factor
        if upcast:
            vae.to(torch.float32)
        try:
            images = vae.decode(latents.to(vae.dtype), return_dict=False)[0]
        finally:
            if upcast:
                vae.to(torch.float16)
        return self.pipeline.image_processor.postprocess(images, output_type="pt").float()
