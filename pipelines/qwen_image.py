"""Qwen-Image over diffusers' ``QwenImagePipeline``.

Composes the pipeline's own ``encode_prompt`` (Qwen2.5-VL hidden states of the templated prompt, with its padding
mask), ``prepare_latents`` (2x2-packed latents of the video-shaped VAE), ``_unpack_latents`` and the FLUX-style
schedule (``linspace(1, 1/S)`` shifted by mu of the image tokens); the sampling loop is ``Sampler.rollout``.

Prompt embeddings are stored padded to ``max_sequence_length`` with their mask (every rollout record has the
same shape, so rollouts concatenate); each denoiser call trims them to the longest prompt of its batch, as the
pipeline pads them. True CFG is the pipeline's: the conditional and unconditional calls are separate, and the
guided velocity is rescaled per token to the conditional velocity's norm (Qwen-Image's ``true_cfg_scale``).
"""

from __future__ import annotations

import torch
from diffusers import QwenImagePipeline
from torch import Tensor

from pipelines.base import ATTENTION_LORA_TARGETS, NEGATIVE_PREFIX, FlowMatchSampler, RolloutOptions
from pipelines.flux import FluxSampler, check_packed_image_size, draw_packed_latents

MASK_KEY = "prompt_embeds_mask"


def refuse_embedded_guidance(family: str, options: RolloutOptions) -> None:
    """A clear error for ``sample.guidance`` on a family without a guidance embedding (it would be ignored)."""
    if options.guidance is not None:
        raise ValueError(
            f"the {family} family has no guidance embedding; set sample.guidance to null and use "
            "sample.cfg_scale for true classifier-free guidance"
        )


def pad_sequence_to(embeds: Tensor, mask: Tensor | None, length: int) -> tuple[Tensor, Tensor]:
    """``[B, L, D]`` embeddings and their ``[B, L]`` mask (None: all valid) zero-padded to ``length`` tokens."""
    batch, current, width = embeds.shape
    if mask is None:
        mask = torch.ones(batch, current, dtype=torch.long, device=embeds.device)
    if current > length:
        raise ValueError(f"prompt embeddings have {current} tokens, more than max_sequence_length={length}")
    padded = embeds.new_zeros(batch, length, width)
    padded[:, :current] = embeds
    padded_mask = mask.new_zeros(batch, length)
    padded_mask[:, :current] = mask
    return padded, padded_mask


def trim_to_longest(embeds: Tensor, mask: Tensor) -> tuple[Tensor, Tensor | None]:
    """Drop the padding columns beyond the batch's longest prompt (one host sync); the mask becomes None when
    every row is then fully valid, as the pipeline's ``encode_prompt`` returns it."""
    lengths = mask.sum(dim=1)
    longest, shortest = torch.stack([lengths.max(), lengths.min()]).tolist()
    trimmed_mask = None if shortest == longest else mask[:, :longest]
    return embeds[:, :longest], trimmed_mask


class QwenImageSampler(FlowMatchSampler):
    """SDE sampler for Qwen-Image (20B MMDiT; true CFG with a negative prompt and norm rescaling)."""

    family = "qwen_image"
    pipeline_class = QwenImagePipeline
    required_components = ("transformer", "vae", "text_encoder", "tokenizer")
    default_max_sequence_length = 512  # QwenImagePipeline.__call__'s default
    # The dual-stream blocks' joint attention (image and text projections) and both streams' MLPs: the targets
    # of DiffSynth-Studio's and diffusers' Qwen-Image LoRA trainers.
    lora_target_modules = (
        *ATTENTION_LORA_TARGETS,
        "img_mlp.net.0.proj",
        "img_mlp.net.2",
        "txt_mlp.net.0.proj",
        "txt_mlp.net.2",
    )

    def encode_prompts(
        self, prompts: list[str], options: RolloutOptions, num_per_prompt: int
    ) -> dict[str, Tensor]:
        """Qwen2.5-VL prompt embeddings and mask, padded to ``max_sequence_length``; ``negative_*`` with CFG."""
        refuse_embedded_guidance(self.family, options)
        conditioning = self._encode(prompts, options, num_per_prompt)
        if options.cfg_scale > 1.0:
            negative = self._encode([options.negative_prompt] * len(prompts), options, num_per_prompt)
            conditioning.update({NEGATIVE_PREFIX + key: value for key, value in negative.items()})
        return conditioning

    def _encode(self, prompts: list[str], options: RolloutOptions, num_per_prompt: int) -> dict[str, Tensor]:
        length = self._max_sequence_length(options)
        embeds, mask = self.pipeline.encode_prompt(
            prompt=prompts,
            device=self.device,
            num_images_per_prompt=num_per_prompt,
            max_sequence_length=length,
        )
        embeds, mask = pad_sequence_to(embeds, mask, length)
        return {"prompt_embeds": embeds, MASK_KEY: mask}

    def initial_latents(
        self, generators: list[torch.Generator], image_size: tuple[int, int], num_frames: int | None = None
    ) -> Tensor:
        """Packed latents ``[B, tokens, 4 * z_dim]`` drawn exactly as ``QwenImagePipeline`` draws them."""
        return draw_packed_latents(self, generators, image_size)

    # QwenImagePipeline's schedule is FluxPipeline's: linspace(1, 1/S) shifted by mu(image tokens)
    grid = FluxSampler.grid

    def model_output(
        self, latents: Tensor, timesteps: Tensor, conditioning: dict[str, Tensor], image_size: tuple[int, int]
    ) -> Tensor:
        """One Qwen-Image transformer call; timesteps cast to the latent dtype and divided by 1000 as diffusers does."""
        embeds, mask = trim_to_longest(conditioning["prompt_embeds"], conditioning[MASK_KEY])
        height, width = self._token_grid(image_size)
        return self.active_denoiser(
            hidden_states=latents,
            timestep=timesteps.to(latents.dtype) / 1000,
            encoder_hidden_states=embeds,
            encoder_hidden_states_mask=mask,
            img_shapes=[[(1, height, width)]] * latents.shape[0],
            return_dict=False,
        )[0]

    def predict(
        self,
        latents: Tensor,
        timesteps: Tensor,
        conditioning: dict[str, Tensor],
        cfg_scale: float,
        image_size: tuple[int, int],
    ) -> Tensor:
        """Qwen-Image's true CFG: ``v = v_neg + w (v_pos - v_neg)`` rescaled per token to ``|v_pos|`` (last dim),
        the conditional and unconditional branches in two calls as the pipeline makes them."""
        positive = {key: value for key, value in conditioning.items() if not key.startswith(NEGATIVE_PREFIX)}
        velocity = self.model_output(latents, timesteps, positive, image_size)
        if cfg_scale <= 1.0:
            return velocity
        negative = {
            key[len(NEGATIVE_PREFIX) :]: value
            for key, value in conditioning.items()
            if key.startswith(NEGATIVE_PREFIX)
        }
        negative_velocity = self.model_output(latents, timesteps, negative, image_size)
        guided = negative_velocity + cfg_scale * (velocity - negative_velocity)
        return guided * (velocity.norm(dim=-1, keepdim=True) / guided.norm(dim=-1, keepdim=True))

    def decode(self, latents: Tensor, image_size: tuple[int, int]) -> Tensor:
        """Unpack to ``[B, z, 1, h, w]``, undo the per-channel latent normalisation, decode the single frame."""
        height, width = image_size
        vae = self.pipeline.vae
        latents = self.pipeline._unpack_latents(latents, height, width, self.pipeline.vae_scale_factor)
        mean, std = self._latent_statistics(latents)
        images = vae.decode((latents * std + mean).to(vae.dtype), return_dict=False)[0][:, :, 0]
        return self.pipeline.image_processor.postprocess(images, output_type="pt").float()

    def encode(self, pixels: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Pixels ``[B, 3, H, W]`` in [0, 1] to packed normalised latents (the inverse of ``decode``)."""
        vae = self.pipeline.vae
        images = self.pipeline.image_processor.normalize(pixels.to(self.device, vae.dtype))[:, :, None]
        distribution = vae.encode(images).latent_dist
        latents = distribution.mode() if generator is None else distribution.sample(generator)
        mean, std = self._latent_statistics(latents)
        latents = ((latents - mean) / std)[:, :, 0].to(self.dtype)
        batch, channels, height, width = latents.shape
        return self.pipeline._pack_latents(latents, batch, channels, height, width)

    def _latent_statistics(self, latents: Tensor) -> tuple[Tensor, Tensor]:
        config = self.pipeline.vae.config
        shape = (1, config.z_dim, 1, 1, 1)
        mean = torch.tensor(config.latents_mean).view(shape).to(latents.device, latents.dtype)
        std = torch.tensor(config.latents_std).view(shape).to(latents.device, latents.dtype)
        return mean, std

    def _token_grid(self, image_size: tuple[int, int]) -> tuple[int, int]:
        factor = self.pipeline.vae_scale_factor * 2
        return image_size[0] // factor, image_size[1] // factor

    def _image_size(self, options: RolloutOptions) -> tuple[int, int]:
        return check_packed_image_size(
            "Qwen-Image", super()._image_size(options), self.pipeline.vae_scale_factor
        )
