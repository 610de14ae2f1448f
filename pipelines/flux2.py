"""FLUX.2 over diffusers' ``Flux2Pipeline`` (dev) and ``Flux2KleinPipeline`` (klein).

Both compose the pipeline's own ``encode_prompt`` (stacked hidden states of fixed text-encoder layers),
``prepare_latents`` (2x2-patchified latents, packed to tokens), ``_prepare_text_ids`` / ``_prepare_latent_ids``
(4-axis RoPE positions), ``_unpack_latents_with_ids``, ``_unpatchify_latents``, ``_encode_vae_image`` and the
FLUX.2 schedule (``linspace(1, 1/S)`` shifted by the empirical mu of the image tokens *and* the step count); the
sampling loop is ``Sampler.rollout``.

Two families, because the two pipeline classes load different checkpoints and condition differently:
``flux2`` (dev: Mistral 3 text encoder, embedded guidance, no true CFG) and ``flux2_klein`` (Qwen3 text encoder,
no guidance embedding; true CFG with a negative prompt for the base model, none for the step-distilled 4-step
model, whose pipeline config says ``is_distilled``). Everything else (latents, grid, denoiser call, VAE) is shared.
"""

from __future__ import annotations

import torch
from diffusers import Flux2KleinPipeline, Flux2Pipeline
from diffusers.pipelines.flux2.pipeline_flux2 import compute_empirical_mu
from torch import Tensor

from pipelines.base import ATTENTION_LORA_TARGETS, NEGATIVE_PREFIX, FlowMatchSampler, RolloutOptions
from pipelines.flux import check_packed_image_size, draw_packed_latents, linear_sigmas, shifted_flow_grid
from pipelines.qwen_image import refuse_embedded_guidance

DEFAULT_GUIDANCE = 4.0  # Flux2Pipeline.__call__'s guidance_scale


class Flux2Sampler(FlowMatchSampler):
    """SDE sampler for FLUX.2-dev (embedded guidance ``sample.guidance``; no negative-prompt CFG)."""

    family = "flux2"
    pipeline_class = Flux2Pipeline
    required_components = ("transformer", "vae", "text_encoder", "tokenizer")
    default_max_sequence_length = 512
    # The double-stream blocks' joint attention and feed-forwards, and the single-stream blocks' fused
    # QKV+MLP input and output projections (the targets of diffusers' FLUX.2 LoRA tests and trainers).
    lora_target_modules = (
        *ATTENTION_LORA_TARGETS,
        "ff.linear_in",
        "ff.linear_out",
        "ff_context.linear_in",
        "ff_context.linear_out",
        "attn.to_qkv_mlp_proj",
    )

    def __init__(self, pipeline: Flux2Pipeline) -> None:
        super().__init__(pipeline)
        self._position_cache: dict[tuple, tuple[Tensor, Tensor]] = {}

    def encode_prompts(
        self, prompts: list[str], options: RolloutOptions, num_per_prompt: int
    ) -> dict[str, Tensor]:
        """Stacked text-encoder hidden states ``[B, L, 3 * width]`` and the embedded guidance ``[B]``."""
        if options.cfg_scale > 1.0:
            raise ValueError(
                "FLUX.2-dev is guidance-distilled and has no negative-prompt CFG; set sample.cfg_scale to 1 and "
                "use sample.guidance for its embedded guidance"
            )
        conditioning = self._encode(prompts, options, num_per_prompt)
        guidance = DEFAULT_GUIDANCE if options.guidance is None else options.guidance
        batch = len(prompts) * num_per_prompt
        conditioning["guidance"] = torch.full((batch,), guidance, dtype=torch.float32, device=self.device)
        return conditioning

    def _encode(self, prompts: list[str], options: RolloutOptions, num_per_prompt: int) -> dict[str, Tensor]:
        prompt_embeds, _ = self.pipeline.encode_prompt(
            prompt=prompts,
            device=self.device,
            num_images_per_prompt=num_per_prompt,
            max_sequence_length=self._max_sequence_length(options),
        )
        return {"prompt_embeds": prompt_embeds}

    def initial_latents(
        self, generators: list[torch.Generator], image_size: tuple[int, int], num_frames: int | None = None
    ) -> Tensor:
        """Packed patchified latents ``[B, tokens, 4 * latent_channels]`` drawn as the FLUX.2 pipelines draw them."""
        return draw_packed_latents(self, generators, image_size)

    def grid(self, options: RolloutOptions, latents: Tensor) -> tuple[Tensor, Tensor]:
        """FLUX.2's schedule: linspace(1, 1/S) shifted by ``compute_empirical_mu(tokens, S)``, or a static
        ``shift``."""
        mu = compute_empirical_mu(image_seq_len=latents.shape[1], num_steps=options.num_steps)
        sigmas = linear_sigmas(options.num_steps)
        return shifted_flow_grid(self.scheduler.config, options, self.device, sigmas, mu)

    def model_output(
        self, latents: Tensor, timesteps: Tensor, conditioning: dict[str, Tensor], image_size: tuple[int, int]
    ) -> Tensor:
        """One FLUX.2 transformer call; timesteps cast to the latent dtype and divided by 1000 as diffusers does."""
        prompt_embeds = conditioning["prompt_embeds"]
        image_ids, text_ids = self._position_ids(image_size, prompt_embeds, latents.device)
        return self.active_denoiser(
            hidden_states=latents,
            timestep=timesteps.to(latents.dtype) / 1000,
            guidance=conditioning.get("guidance"),
            encoder_hidden_states=prompt_embeds,
            txt_ids=text_ids,
            img_ids=image_ids,
            return_dict=False,
        )[0]

    def decode(self, latents: Tensor, image_size: tuple[int, int]) -> Tensor:
        """Unpack the tokens, undo the VAE's batch-norm statistics, unpatchify, decode, post-process to [0, 1]."""
        vae = self.pipeline.vae
        image_ids, _ = self._position_ids(image_size, latents[:, :1], latents.device)
        latents = self.pipeline._unpack_latents_with_ids(latents, image_ids)
        mean, std = self._batch_norm_statistics(latents)
        latents = self.pipeline._unpatchify_latents(latents * std + mean)
        images = vae.decode(latents.to(vae.dtype), return_dict=False)[0]
        return self.pipeline.image_processor.postprocess(images, output_type="pt").float()

    def encode(self, pixels: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Pixels ``[B, 3, H, W]`` in [0, 1] to packed normalised latents (the pipeline's ``_encode_vae_image``,
        the VAE mode; the inverse of ``decode``)."""
        if generator is not None:
            raise ValueError("FLUX.2 encodes with the VAE mode (the pipeline's 'argmax'); pass no generator")
        vae = self.pipeline.vae
        images = self.pipeline.image_processor.normalize(pixels.to(self.device, vae.dtype))
        latents = self.pipeline._encode_vae_image(images, generator=None).to(self.dtype)
        return self.pipeline._pack_latents(latents)

    def _batch_norm_statistics(self, latents: Tensor) -> tuple[Tensor, Tensor]:
        vae = self.pipeline.vae
        mean = vae.bn.running_mean.view(1, -1, 1, 1).to(latents.device, latents.dtype)
        variance = vae.bn.running_var.view(1, -1, 1, 1) + vae.config.batch_norm_eps
        return mean, variance.sqrt().to(latents.device, latents.dtype)

    def _position_ids(
        self, image_size: tuple[int, int], prompt_embeds: Tensor, device: torch.device
    ) -> tuple[Tensor, Tensor]:
        """The pipeline's 4-axis position ids of the image tokens and text tokens, cached per shape and device."""
        key = (image_size, tuple(prompt_embeds.shape[:2]), device)
        if key not in self._position_cache:
            factor = self.pipeline.vae_scale_factor * 2
            batch = prompt_embeds.shape[0]
            grid = torch.empty(batch, 1, image_size[0] // factor, image_size[1] // factor, device="meta")
            image_ids = self.pipeline._prepare_latent_ids(grid).to(device)
            text_ids = self.pipeline._prepare_text_ids(prompt_embeds[:, :, :1].to("meta")).to(device)
            self._position_cache = {key: (image_ids, text_ids)}
        return self._position_cache[key]

    def _image_size(self, options: RolloutOptions) -> tuple[int, int]:
        return check_packed_image_size("FLUX.2", super()._image_size(options), self.pipeline.vae_scale_factor)


class Flux2KleinSampler(Flux2Sampler):
    """SDE sampler for FLUX.2-klein: the 4-step distilled model (no CFG) or the base model (true CFG)."""

    family = "flux2_klein"
    pipeline_class = Flux2KleinPipeline

    def encode_prompts(
        self, prompts: list[str], options: RolloutOptions, num_per_prompt: int
    ) -> dict[str, Tensor]:
        """Qwen3 hidden states ``[B, L, 3 * width]``; the negative prompt's too when ``cfg_scale > 1`` (base
        model only: the step-distilled pipeline ignores CFG, so a ``cfg_scale > 1`` is refused there)."""
        refuse_embedded_guidance(self.family, options)
        conditioning = self._encode(prompts, options, num_per_prompt)
        if options.cfg_scale > 1.0:
            if self.pipeline.config.get("is_distilled", False):
                raise ValueError(
                    "this FLUX.2-klein checkpoint is step-distilled (is_distilled) and runs without CFG; set "
                    "sample.cfg_scale to 1"
                )
            negative = self._encode([options.negative_prompt] * len(prompts), options, num_per_prompt)
            conditioning.update({NEGATIVE_PREFIX + key: value for key, value in negative.items()})
        return conditioning
