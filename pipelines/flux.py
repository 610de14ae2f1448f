"""FLUX.1 (dev with guidance embedding, schnell without) over diffusers' ``FluxPipeline``.

Composes the pipeline's own ``encode_prompt``, ``prepare_latents`` (packed 2x2 latents), schedule
(``calculate_shift`` + ``retrieve_timesteps``), ``_unpack_latents`` and VAE; the sampling loop is
``Sampler.rollout``.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline
from diffusers.pipelines.flux.pipeline_flux import calculate_shift, retrieve_timesteps
from torch import Tensor

from pipelines.base import ATTENTION_LORA_TARGETS, NEGATIVE_PREFIX, FlowMatchSampler, RolloutOptions

DEFAULT_GUIDANCE = 3.5


class FluxSampler(FlowMatchSampler):
    """SDE sampler for FLUX.1-dev / FLUX.1-schnell (true CFG optional, embedded guidance for dev)."""

    family = "flux"
    pipeline_class = FluxPipeline
    required_components = ("transformer", "vae", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2")
    default_max_sequence_length = 512
    # Double-stream attention (image and text projections), single-stream attention, the double blocks'
    # feed-forwards and the single blocks' MLP in / fused out. "proj_out" also matches the final output
    # projection, as in common FLUX LoRA recipes (SimpleTuner "all+ffs", ai-toolkit).
    lora_target_modules = (
        *ATTENTION_LORA_TARGETS,
        "ff.net.0.proj",
        "ff.net.2",
        "ff_context.net.0.proj",
        "ff_context.net.2",
        "proj_mlp",
        "proj_out",
    )

    def __init__(self, pipeline: FluxPipeline) -> None:
        super().__init__(pipeline)
        self._position_cache: dict[tuple, tuple[Tensor, Tensor]] = {}

    def encode_prompts(
        self, prompts: list[str], options: RolloutOptions, num_per_prompt: int
    ) -> dict[str, Tensor]:
        """T5 sequence + pooled CLIP embeddings (and the negative prompt's for CFG), plus guidance [B]."""
        conditioning = self._encode(prompts, options, num_per_prompt)
        if options.cfg_scale > 1.0:
            negative = self._encode([options.negative_prompt] * len(prompts), options, num_per_prompt)
            conditioning.update({NEGATIVE_PREFIX + key: value for key, value in negative.items()})
        batch = len(prompts) * num_per_prompt
        if self.denoiser.config.guidance_embeds:
            guidance = DEFAULT_GUIDANCE if options.guidance is None else options.guidance
            conditioning["guidance"] = torch.full((batch,), guidance, dtype=torch.float32, device=self.device)
        elif options.guidance is not None:
            raise ValueError(
                "guidance was set but this FLUX transformer has no guidance embedding (FLUX.1-schnell style); "
                "set sample.guidance to null, or use cfg_scale for true classifier-free guidance"
            )
        return conditioning

    def _encode(self, prompts: list[str], options: RolloutOptions, num_per_prompt: int) -> dict[str, Tensor]:
        prompt_embeds, pooled_prompt_embeds, _ = self.pipeline.encode_prompt(
            prompt=prompts,
            prompt_2=None,
            device=self.device,
            num_images_per_prompt=num_per_prompt,
            max_sequence_length=self._max_sequence_length(options),
        )
        return {"prompt_embeds": prompt_embeds, "pooled_prompt_embeds": pooled_prompt_embeds}

    def initial_latents(
        self, generators: list[torch.Generator], image_size: tuple[int, int], num_frames: int | None = None
    ) -> Tensor:
        """Packed latents ``[B, tokens, 4 * latent_channels]`` drawn exactly as ``FluxPipeline`` draws them."""
        return draw_packed_latents(self, generators, image_size)

    def grid(self, options: RolloutOptions, latents: Tensor) -> tuple[Tensor, Tensor]:
        """FluxPipeline's schedule: linspace(1, 1/S) shifted by mu(image tokens), or a static ``shift``."""
        config = self.scheduler.config
        mu = sequence_length_shift(config, latents.shape[1])
        return shifted_flow_grid(config, options, self.device, linear_sigmas(options.num_steps), mu)

    def model_output(
        self, latents: Tensor, timesteps: Tensor, conditioning: dict[str, Tensor], image_size: tuple[int, int]
    ) -> Tensor:
        """One FLUX transformer call; timesteps are cast to the latent dtype and divided by 1000 as diffusers does."""
        prompt_embeds = conditioning["prompt_embeds"]
        image_ids, text_ids = self._position_ids(image_size, prompt_embeds.shape[1], latents)
        return self.active_denoiser(
            hidden_states=latents,
            timestep=timesteps.to(latents.dtype) / 1000,
            guidance=conditioning.get("guidance"),
            pooled_projections=conditioning["pooled_prompt_embeds"],
            encoder_hidden_states=prompt_embeds,
            txt_ids=text_ids,
            img_ids=image_ids,
            return_dict=False,
        )[0]

    def decode(self, latents: Tensor, image_size: tuple[int, int]) -> Tensor:
        """Unpack, undo the VAE scaling/shift, decode and post-process to [0, 1]."""
        height, width = image_size
        latents = self.pipeline._unpack_latents(latents, height, width, self.pipeline.vae_scale_factor)
        return self._vae_decode(latents)

    def encode(self, pixels: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Pixels ``[B, 3, H, W]`` in [0, 1] to packed latents ``[B, tokens, 4 * C]`` (the inverse of ``decode``)."""
        latents = self._vae_encode(pixels, generator)
        batch, channels, height, width = latents.shape
        return self.pipeline._pack_latents(latents, batch, channels, height, width)

    def _position_ids(
        self, image_size: tuple[int, int], text_length: int, latents: Tensor
    ) -> tuple[Tensor, Tensor]:
        """FLUX's RoPE position ids for image tokens and (all-zero) text tokens, cached per size and device."""
        key = (image_size, text_length, latents.device, latents.dtype)
        if key not in self._position_cache:
            height, width = self._latent_size(image_size)
            image_ids = self.pipeline._prepare_latent_image_ids(
                None, height // 2, width // 2, latents.device, latents.dtype
            )
            text_ids = torch.zeros(text_length, 3, device=latents.device, dtype=latents.dtype)
            self._position_cache = {key: (image_ids, text_ids)}
        return self._position_cache[key]

    def _latent_size(self, image_size: tuple[int, int]) -> tuple[int, int]:
        factor = self.pipeline.vae_scale_factor * 2
        height, width = image_size
        return 2 * (height // factor), 2 * (width // factor)

    def _image_size(self, options: RolloutOptions) -> tuple[int, int]:
        return check_packed_image_size("FLUX", super()._image_size(options), self.pipeline.vae_scale_factor)


def draw_packed_latents(
    sampler: FlowMatchSampler, generators: list[torch.Generator], image_size: tuple[int, int], *leading: Any
) -> Tensor:
    """Initial packed latents from the pipeline's own ``prepare_latents`` (its ``randn_tensor`` draw, one generator
    per sample; FLUX.1, FLUX.2, Qwen-Image, Kontext). ``leading``: arguments a pipeline takes first (Kontext's
    source image, None here); the tuple some pipelines return (latents, ids, ...) gives its latents."""
    height, width = image_size
    channels = sampler.denoiser.config.in_channels // 4
    drawn = sampler.pipeline.prepare_latents(
        *leading, len(generators), channels, height, width, sampler.dtype, sampler.device, generators
    )
    return drawn[0] if isinstance(drawn, tuple) else drawn


def check_packed_image_size(name: str, image_size: tuple[int, int], vae_scale_factor: int) -> tuple[int, int]:
    """``image_size`` when both sides are multiples of the VAE scale x 2 (2x2 latent packing), else a clear error."""
    height, width = image_size
    multiple = vae_scale_factor * 2
    if height % multiple or width % multiple:
        raise ValueError(
            f"{name} image height and width must be multiples of {multiple}; got {height}x{width}"
        )
    return height, width


def linear_sigmas(num_steps: int) -> np.ndarray:
    """The unshifted grid ``linspace(1, 1/S, S)`` the FLUX-style pipelines pass as ``sigmas``."""
    return np.linspace(1.0, 1 / num_steps, num_steps)


def sequence_length_shift(config: Any, image_seq_len: int) -> float:
    """FLUX's resolution-dependent shift mu: linear in the number of image tokens between the config's
    ``(base_image_seq_len, base_shift)`` and ``(max_image_seq_len, max_shift)`` (FLUX.1, Qwen-Image, Z-Image)."""
    return calculate_shift(
        image_seq_len,
        config.get("base_image_seq_len", 256),
        config.get("max_image_seq_len", 4096),
        config.get("base_shift", 0.5),
        config.get("max_shift", 1.15),
    )


def shifted_flow_grid(
    config: Any, options: RolloutOptions, device: torch.device, sigmas: Any, mu: float | None
) -> tuple[Tensor, Tensor]:
    """The grid ``[S+1]`` and timesteps ``[S]`` (float32) of a FLUX-style pipeline: its ``sigmas`` shifted by ``mu``
    through ``retrieve_timesteps``, or by a static ``options.shift`` when set (then ``mu`` is unused)."""
    if options.shift is None:
        scheduler = FlowMatchEulerDiscreteScheduler.from_config(config)
    else:
        scheduler = FlowMatchEulerDiscreteScheduler.from_config(
            config, shift=options.shift, use_dynamic_shifting=False
        )
        mu = None
    if config.get("use_flow_sigmas", False):
        sigmas = None
    timesteps, _ = retrieve_timesteps(scheduler, options.num_steps, device, sigmas=sigmas, mu=mu)
    return scheduler.sigmas.to(device, torch.float32), timesteps.to(torch.float32)
