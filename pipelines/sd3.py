"""Stable Diffusion 3 / 3.5 over diffusers' ``StableDiffusion3Pipeline``.

Composes the pipeline's own ``encode_prompt`` (two CLIPs + T5, negative prompt for CFG), ``prepare_latents``,
schedule (``retrieve_timesteps``, dynamic shift when the scheduler asks for it) and VAE; the sampling loop is
``Sampler.rollout``.
"""

from __future__ import annotations

import torch
from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline
from diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3 import (
    calculate_shift,
    retrieve_timesteps,
)
from torch import Tensor

from pipelines.base import ATTENTION_LORA_TARGETS, NEGATIVE_PREFIX, FlowMatchSampler, RolloutOptions


class SD3Sampler(FlowMatchSampler):
    """SDE sampler for SD3 / SD3.5 (medium, large, turbo), CFG with a negative prompt."""

    family = "sd3"
    pipeline_class = StableDiffusion3Pipeline
    required_components = (
        "transformer",
        "vae",
        "text_encoder",
        "tokenizer",
        "text_encoder_2",
        "tokenizer_2",
        "text_encoder_3",
        "tokenizer_3",
    )
    default_max_sequence_length = 256
    # The joint-attention projections of every MMDiT block (Flow-GRPO and diffusers' SD3 DreamBooth LoRA).
    # The last block is context-pre-only and has no to_add_out; SD3.5's extra self-attention (attn2) is left out.
    lora_target_modules = ATTENTION_LORA_TARGETS

    def encode_prompts(
        self, prompts: list[str], options: RolloutOptions, num_per_prompt: int
    ) -> dict[str, Tensor]:
        """Joint CLIP+T5 sequence and pooled CLIP embeddings; ``negative_*`` too when ``cfg_scale > 1``."""
        use_cfg = options.cfg_scale > 1.0
        prompt_embeds, negative_embeds, pooled_embeds, negative_pooled = self.pipeline.encode_prompt(
            prompt=prompts,
            prompt_2=None,
            prompt_3=None,
            device=self.device,
            num_images_per_prompt=num_per_prompt,
            do_classifier_free_guidance=use_cfg,
            negative_prompt=options.negative_prompt if use_cfg else None,
            max_sequence_length=self._max_sequence_length(options),
        )
        conditioning = {"prompt_embeds": prompt_embeds, "pooled_prompt_embeds": pooled_embeds}
        if use_cfg:
            conditioning[NEGATIVE_PREFIX + "prompt_embeds"] = negative_embeds
            conditioning[NEGATIVE_PREFIX + "pooled_prompt_embeds"] = negative_pooled
        return conditioning

    def initial_latents(
        self, generators: list[torch.Generator], image_size: tuple[int, int], num_frames: int | None = None
    ) -> Tensor:
        """Latents ``[B, C, h, w]`` drawn exactly as ``StableDiffusion3Pipeline`` draws them."""
        height, width = image_size
        return self.pipeline.prepare_latents(
            len(generators),
            self.denoiser.config.in_channels,
            height,
            width,
            self.dtype,
            self.device,
            generators,
        )

    def grid(self, options: RolloutOptions, latents: Tensor) -> tuple[Tensor, Tensor]:
        """The SD3 pipeline's schedule (static shift from the scheduler config unless ``options.shift``)."""
        config = self.scheduler.config
        overrides = {} if options.shift is None else {"shift": options.shift, "use_dynamic_shifting": False}
        scheduler = FlowMatchEulerDiscreteScheduler.from_config(config, **overrides)
        kwargs = {}
        if scheduler.config.get("use_dynamic_shifting", False):
            patch = self.denoiser.config.patch_size
            kwargs["mu"] = calculate_shift(
                (latents.shape[2] // patch) * (latents.shape[3] // patch),
                config.get("base_image_seq_len", 256),
                config.get("max_image_seq_len", 4096),
                config.get("base_shift", 0.5),
                config.get("max_shift", 1.16),
            )
        timesteps, _ = retrieve_timesteps(scheduler, options.num_steps, self.device, **kwargs)
        return scheduler.sigmas.to(self.device, torch.float32), timesteps.to(torch.float32)

    def model_output(
        self, latents: Tensor, timesteps: Tensor, conditioning: dict[str, Tensor], image_size: tuple[int, int]
    ) -> Tensor:
        """One SD3 transformer call at per-sample timesteps (sigma * 1000)."""
        return self.active_denoiser(
            hidden_states=latents,
            timestep=timesteps,
            encoder_hidden_states=conditioning["prompt_embeds"],
            pooled_projections=conditioning["pooled_prompt_embeds"],
            return_dict=False,
        )[0]
