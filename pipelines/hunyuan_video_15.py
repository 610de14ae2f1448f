"""HunyuanVideo 1.5 text-to-video over diffusers' ``HunyuanVideo15Pipeline``.

Composes the pipeline's own ``encode_prompt`` (Qwen2.5-VL hidden states through its chat template + ByT5 glyph
embeddings of quoted text), ``prepare_latents`` (drawn in the transformer dtype, as the pipeline draws them),
its conditioning inputs for text-to-video (zero source latents and mask from ``prepare_cond_latents_and_mask``,
zero image embeddings) and the grid / VAE of ``VideoFlowSampler``. No embedded guidance: the checkpoint's
guider is classifier-free guidance, here ``sample.cfg_scale`` with the negative prompt.
"""

from __future__ import annotations

import torch
from diffusers import HunyuanVideo15Pipeline
from diffusers.loaders import HunyuanVideoLoraLoaderMixin
from torch import Tensor

from pipelines.base import ATTENTION_LORA_TARGETS, NEGATIVE_PREFIX, RolloutOptions
from pipelines.hunyuan_video import VideoFlowSampler


class HunyuanVideo15LoraPipeline(HunyuanVideo15Pipeline, HunyuanVideoLoraLoaderMixin):
    """``HunyuanVideo15Pipeline`` with diffusers' HunyuanVideo LoRA loader (``load_lora_weights`` /
    ``save_lora_weights``), which diffusers 0.42.1 does not give the 1.5 pipeline. The files are diffusers' usual
    ``transformer.``-prefixed LoRA; a stock ``HunyuanVideo15Pipeline`` loads them with ``pipe.transformer.
    load_lora_adapter(folder, prefix="transformer", weight_name="pytorch_lora_weights.safetensors")``.
    """


class HunyuanVideo15Sampler(VideoFlowSampler):
    """SDE sampler for HunyuanVideo 1.5 text-to-video (true CFG optional). ``from_pretrained`` loads the checkpoint
    as ``HunyuanVideo15LoraPipeline`` so that LoRA export and ``load_lora_weights`` work."""

    family = "hunyuan_video_15"
    pipeline_class = HunyuanVideo15LoraPipeline
    required_components = ("transformer", "vae", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2")
    # The dual-stream blocks' and the token refiner's attention projections.
    lora_target_modules = ATTENTION_LORA_TARGETS

    def encode_prompts(
        self, prompts: list[str], options: RolloutOptions, num_per_prompt: int
    ) -> dict[str, Tensor]:
        """Qwen sequence + mask and ByT5 glyph sequence + mask (``negative_*`` too when ``cfg_scale > 1``)."""
        if options.guidance is not None:
            raise ValueError(
                "guidance was set but HunyuanVideo 1.5 has no embedded guidance; set sample.guidance to null and "
                "use sample.cfg_scale (classifier-free guidance with the negative prompt)"
            )
        conditioning = self._encode(prompts, num_per_prompt)
        if options.cfg_scale > 1.0:
            negative = self._encode([options.negative_prompt] * len(prompts), num_per_prompt)
            conditioning.update({NEGATIVE_PREFIX + key: value for key, value in negative.items()})
        return conditioning

    def _encode(self, prompts: list[str], num_per_prompt: int) -> dict[str, Tensor]:
        """One row per prompt, then repeated per member here: diffusers 0.42's ``encode_prompt`` repeats the 2-D
        masks with ``repeat(1, n, 1)``, which pairs prompt i's embeddings with another prompt's mask when
        ``num_videos_per_prompt > 1``."""
        embeds, mask, glyph_embeds, glyph_mask = self.pipeline.encode_prompt(
            prompt=prompts,
            device=self.device,
            dtype=self.dtype,
            batch_size=len(prompts),
            num_videos_per_prompt=1,
        )
        encoded = {
            "prompt_embeds": embeds,
            "prompt_embeds_mask": mask,
            "prompt_embeds_2": glyph_embeds,
            "prompt_embeds_mask_2": glyph_mask,
        }
        return {key: value.repeat_interleave(num_per_prompt, dim=0) for key, value in encoded.items()}

    def initial_latents(
        self, generators: list[torch.Generator], image_size: tuple[int, int], num_frames: int | None = None
    ) -> Tensor:
        """Latents ``[B, C, T', h, w]`` in the transformer dtype, drawn as ``HunyuanVideo15Pipeline`` draws them."""
        height, width = image_size
        return self.pipeline.prepare_latents(
            len(generators),
            self.pipeline.num_channels_latents,
            height,
            width,
            num_frames,
            self.dtype,
            self.device,
            generators,
        )

    def latent_dtype(self) -> torch.dtype:
        return self.dtype

    def decode(self, latents: Tensor, image_size: tuple[int, int]) -> Tensor:
        """As ``VideoFlowSampler.decode``, one sample per VAE call: diffusers 0.42's HunyuanVideo 1.5 VAE builds its
        causal attention mask for batch 1 only (a batch of 2 fails to broadcast), which is what ``vae.enable_slicing``
        does too."""
        return torch.cat(
            [super(HunyuanVideo15Sampler, self).decode(row, image_size) for row in latents.split(1)]
        )

    def default_image_size(self) -> tuple[int, int]:
        """The pipeline's default: its 16:9 aspect ratio at the transformer's ``target_size``."""
        width_ratio, height_ratio = self.pipeline.default_aspect_ratio
        return self.pipeline.video_processor.calculate_default_height_width(
            height_ratio, width_ratio, self.pipeline.target_size
        )

    def model_output(
        self, latents: Tensor, timesteps: Tensor, conditioning: dict[str, Tensor], image_size: tuple[int, int]
    ) -> Tensor:
        """One transformer call on ``[latents, zero source latents, zero mask]`` with zero image embeddings (the
        pipeline's text-to-video inputs), timesteps ``sigma * 1000`` in the latent dtype."""
        dtype = self._model_dtype(conditioning)
        latents = latents.to(dtype)
        source, mask = self.pipeline.prepare_cond_latents_and_mask(latents, dtype, latents.device)
        image_embeds = latents.new_zeros(
            (latents.shape[0], self.pipeline.vision_num_semantic_tokens, self.pipeline.vision_states_dim)
        )
        return self.active_denoiser(
            hidden_states=torch.cat([latents, source, mask], dim=1),
            image_embeds=image_embeds,
            timestep=timesteps.to(latents.dtype),
            encoder_hidden_states=conditioning["prompt_embeds"],
            encoder_attention_mask=conditioning["prompt_embeds_mask"],
            encoder_hidden_states_2=conditioning["prompt_embeds_2"],
            encoder_attention_mask_2=conditioning["prompt_embeds_mask_2"],
            return_dict=False,
        )[0]
