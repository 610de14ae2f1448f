"""Stable Diffusion 1.x / 2.x (epsilon or v-prediction UNet) over diffusers' ``StableDiffusionPipeline``.

Composes the pipeline's own ``encode_prompt`` (negative prompt for CFG), diffusers' ``randn_tensor`` draw of
``prepare_latents``, the VAE and image processor; the noise grid is the sampler's own ``DDIMScheduler`` built
from the shipped scheduler config (SD 1.5 ships PNDM, SD 2.1 ships DDIM with ``prediction_type: v_prediction``);
the sampling loop is ``Sampler.rollout`` with the DDIM step of DDPO (``pipelines.sde.ddim_step`` /
``ddim_v_step``, ``eta = noise_level``). SD 2.x needs nothing of its own: what the UNet predicts comes from the
scheduler config (``DDIMSampler.prediction_type``) and its layout (linear projections, per-block heads, upcast
attention) lives inside diffusers' ``UNet2DConditionModel``.
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers import StableDiffusionPipeline
from diffusers.utils.torch_utils import randn_tensor
from torch import Tensor

from pipelines.base import NEGATIVE_PREFIX, DDIMSampler, RolloutOptions

# The UNet's attention projections (self- and cross-attention), as in DDPO and diffusers'
# train_text_to_image_lora.py / train_text_to_image_lora_sdxl.py.
UNET_ATTENTION_LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")


class UNetLatentsMixin:
    """What every latent-diffusion UNet family shares (SD 1.x / 2.x, SDXL): the LCM refusal, the initial draw,
    the default size and the side check. Mixed in before ``DDIMSampler``."""

    family: str
    pipeline: Any
    scheduler: Any
    denoiser: torch.nn.Module
    device: torch.device
    dtype: torch.dtype

    def _refuse_embedded_guidance(self) -> None:
        if self.denoiser.config.get("time_cond_proj_dim") is not None:
            raise ValueError(
                f"this UNet embeds the guidance scale (time_cond_proj_dim: an LCM-distilled model), which the "
                f"{self.family} sampler does not feed; use a plain (not LCM-distilled) checkpoint"
            )

    def initial_latents(
        self, generators: list[torch.Generator], image_size: tuple[int, int], num_frames: int | None = None
    ) -> Tensor:
        """Latents ``[B, C, H / f, W / f]`` drawn as the pipeline's ``prepare_latents`` draws them, scaled by this
        sampler's scheduler's ``init_noise_sigma`` (1 for DDIM; the shipped scheduler may be Euler, whose
        ``init_noise_sigma`` is not the DDIM one)."""
        height, width = image_size
        factor = self.pipeline.vae_scale_factor
        shape = (len(generators), self.denoiser.config.in_channels, height // factor, width // factor)
        latents = randn_tensor(shape, generator=generators, device=self.device, dtype=self.dtype)
        return latents * self.scheduler.init_noise_sigma

    def default_image_size(self) -> tuple[int, int]:
        """The UNet's sample size times the VAE scale (512 px for SD 1.5, 768 for SD 2.1, 1024 for SDXL)."""
        size = self.denoiser.config.sample_size * self.pipeline.vae_scale_factor
        return size, size

    def _image_size(self, options: RolloutOptions) -> tuple[int, int]:
        height, width = super()._image_size(options)  # type: ignore[misc]
        multiple = self.pipeline.vae_scale_factor
        if height % multiple or width % multiple:
            raise ValueError(
                f"{self.family} image height and width must be multiples of {multiple}; got {height}x{width}"
            )
        return height, width


class SDSampler(UNetLatentsMixin, DDIMSampler):
    """DDIM-SDE sampler for Stable Diffusion 1.5 / 2.x (epsilon or v-prediction), true CFG with a negative prompt."""

    family = "sd"
    pipeline_class = StableDiffusionPipeline
    required_components = ("unet", "vae", "text_encoder", "tokenizer")
    denoiser_component = "unet"
    lora_target_modules = UNET_ATTENTION_LORA_TARGETS

    def __init__(self, pipeline: StableDiffusionPipeline) -> None:
        super().__init__(pipeline)
        self._refuse_embedded_guidance()

    def encode_prompts(
        self, prompts: list[str], options: RolloutOptions, num_per_prompt: int
    ) -> dict[str, Tensor]:
        """CLIP text embeddings ``[B, 77, D]``; ``negative_prompt_embeds`` too when ``cfg_scale > 1``."""
        use_cfg = options.cfg_scale > 1.0
        prompt_embeds, negative_embeds = self.pipeline.encode_prompt(
            prompts,
            self.device,
            num_per_prompt,
            use_cfg,
            negative_prompt=[options.negative_prompt] * len(prompts) if use_cfg else None,
        )
        conditioning = {"prompt_embeds": prompt_embeds}
        if use_cfg:
            conditioning[NEGATIVE_PREFIX + "prompt_embeds"] = negative_embeds
        return conditioning

    def model_output(
        self, latents: Tensor, timesteps: Tensor, conditioning: dict[str, Tensor], image_size: tuple[int, int]
    ) -> Tensor:
        """One UNet call at per-sample timesteps: epsilon or v, per the scheduler's ``prediction_type``."""
        return self.active_denoiser(
            latents,
            timesteps,
            encoder_hidden_states=conditioning["prompt_embeds"],
            return_dict=False,
        )[0]
