"""Z-Image (Turbo and base) over diffusers' ``ZImagePipeline``.

Composes the pipeline's own ``encode_prompt`` (the second-to-last Qwen3 hidden states of the chat-templated
prompt, one variable-length tensor per prompt), ``prepare_latents`` (float32 latents ``[B, C, h, w]``), its default
sigmas ``get_default_z_image_sigmas`` shifted by mu of the image tokens, and the VAE (scaling and shift); the
sampling loop is ``Sampler.rollout``.

Z-Image's transformer takes lists (one ``[C, 1, h, w]`` latent and one ``[L_i, D]`` caption per sample), a time
``(1000 - t) / 1000`` running 0 -> 1, and predicts ``x0 - noise``: ``model_output`` hands it the per-sample lists
and returns the negated stack, the velocity ``noise - x0`` the flow steps expect. Captions are stored padded to
``max_sequence_length`` with their lengths (every rollout record has the same shape).

CFG: the pipeline's ``guidance_scale`` g forms ``pos + g (pos - neg)``, which is ``neg + (1 + g)(pos - neg)``:
``sample.cfg_scale = 1 + g`` (Z-Image-Turbo runs with g = 0, i.e. ``cfg_scale: 1``). The pipeline's optional CFG
renormalisation and truncation are not modelled (their defaults are off).
"""

from __future__ import annotations

import torch
from diffusers import ZImagePipeline
from diffusers.pipelines.z_image.pipeline_z_image import get_default_z_image_sigmas
from torch import Tensor

from pipelines.base import NEGATIVE_PREFIX, FlowMatchSampler, RolloutOptions
from pipelines.flux import check_packed_image_size, sequence_length_shift, shifted_flow_grid
from pipelines.qwen_image import refuse_embedded_guidance

DEFAULT_IMAGE_SIDE = 1024  # ZImagePipeline.__call__'s default height and width
LENGTHS_KEY = "prompt_lengths"


class ZImageSampler(FlowMatchSampler):
    """SDE sampler for Z-Image (6B single-stream DiT; true CFG with a negative prompt for the base model)."""

    family = "z_image"
    pipeline_class = ZImagePipeline
    required_components = ("transformer", "vae", "text_encoder", "tokenizer")
    default_max_sequence_length = 512  # ZImagePipeline.__call__'s default
    # Every block's attention and SwiGLU feed-forward (main layers and the noise / context refiners).
    lora_target_modules = (
        "attention.to_q",
        "attention.to_k",
        "attention.to_v",
        "attention.to_out.0",
        "feed_forward.w1",
        "feed_forward.w2",
        "feed_forward.w3",
    )

    def encode_prompts(
        self, prompts: list[str], options: RolloutOptions, num_per_prompt: int
    ) -> dict[str, Tensor]:
        """Caption features ``[B, max_sequence_length, D]`` (zero-padded) and their lengths ``[B]``;
        ``negative_*`` too when ``cfg_scale > 1``."""
        refuse_embedded_guidance(self.family, options)
        use_cfg = options.cfg_scale > 1.0
        length = self._max_sequence_length(options)
        positive, negative = self.pipeline.encode_prompt(
            prompt=list(prompts),  # encode_prompt writes the chat template into the list it is given
            device=self.device,
            do_classifier_free_guidance=use_cfg,
            negative_prompt=[options.negative_prompt] * len(prompts) if use_cfg else None,
            max_sequence_length=length,
        )
        conditioning = _padded_captions(positive, length, num_per_prompt)
        if use_cfg:
            negative_conditioning = _padded_captions(negative, length, num_per_prompt)
            conditioning.update(
                {NEGATIVE_PREFIX + key: value for key, value in negative_conditioning.items()}
            )
        return conditioning

    def initial_latents(
        self, generators: list[torch.Generator], image_size: tuple[int, int], num_frames: int | None = None
    ) -> Tensor:
        """Latents ``[B, C, h, w]`` in float32, drawn exactly as ``ZImagePipeline`` draws them."""
        height, width = image_size
        return self.pipeline.prepare_latents(
            len(generators),
            self.denoiser.config.in_channels,
            height,
            width,
            torch.float32,
            self.device,
            generators,
        )

    def grid(self, options: RolloutOptions, latents: Tensor) -> tuple[Tensor, Tensor]:
        """ZImagePipeline's schedule: its default sigmas shifted by mu of the 2x2-patch tokens, or a static
        ``shift``."""
        config = self.scheduler.config
        mu = sequence_length_shift(config, (latents.shape[2] // 2) * (latents.shape[3] // 2))
        sigmas = get_default_z_image_sigmas(options.num_steps)
        return shifted_flow_grid(config, options, self.device, sigmas, mu)

    def model_output(
        self, latents: Tensor, timesteps: Tensor, conditioning: dict[str, Tensor], image_size: tuple[int, int]
    ) -> Tensor:
        """One Z-Image transformer call on per-sample lists; returns the velocity ``-(model output)`` in float32."""
        captions = conditioning["prompt_embeds"]
        lengths = conditioning[LENGTHS_KEY].tolist()
        caption_list = [caption[:length] for caption, length in zip(captions, lengths, strict=True)]
        latent_list = list(latents.to(self.dtype).unsqueeze(2).unbind(dim=0))
        outputs = self.active_denoiser(
            latent_list, (1000 - timesteps) / 1000, caption_list, return_dict=False
        )[0]
        return -torch.stack([output.float() for output in outputs]).squeeze(2)

    def default_image_size(self) -> tuple[int, int]:
        return DEFAULT_IMAGE_SIDE, DEFAULT_IMAGE_SIDE

    def _image_size(self, options: RolloutOptions) -> tuple[int, int]:
        return check_packed_image_size(
            "Z-Image", super()._image_size(options), self.pipeline.vae_scale_factor
        )


def _padded_captions(captions: list[Tensor], length: int, num_per_prompt: int) -> dict[str, Tensor]:
    """Variable-length caption features ``[L_i, D]`` as ``prompt_embeds`` ``[B, length, D]`` (zero-padded) and
    ``prompt_lengths`` ``[B]`` int64 on the CPU (read without a device sync), each repeated ``num_per_prompt``."""
    width = captions[0].shape[-1]
    padded = captions[0].new_zeros(len(captions), length, width)
    for row, caption in enumerate(captions):
        padded[row, : caption.shape[0]] = caption
    lengths = torch.tensor([caption.shape[0] for caption in captions], dtype=torch.long)
    return {
        "prompt_embeds": padded.repeat_interleave(num_per_prompt, dim=0),
        LENGTHS_KEY: lengths.repeat_interleave(num_per_prompt),
    }
