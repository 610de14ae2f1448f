"""HunyuanVideo over diffusers: text-to-video (``HunyuanVideoPipeline``) and SkyReels-style image-to-video
(``HunyuanSkyreelsImageToVideoPipeline``, the SkyReels-V1-Hunyuan-I2V model DanceGRPO trained).

Composes each pipeline's own ``encode_prompt`` (Llama hidden states with the prompt template + pooled CLIP),
``prepare_latents``' ``randn_tensor`` draw, its flow-match grid (``linspace(1, 0, S + 1)[:-1]`` through
``retrieve_timesteps``, the scheduler's shift or ``options.shift``), the embedded guidance (``guidance * 1000``)
and the causal 3D VAE; the sampling loop is ``Sampler.rollout``. Latents are ``[B, C, T', H/8, W/8]`` in float32
(as the pipelines keep them); pixels come back as ``[B, 3, T, H, W]`` in [0, 1].

HunyuanVideo 1.5 lives in ``pipelines/hunyuan_video_15.py``; it shares ``VideoFlowSampler`` below.
"""

from __future__ import annotations

import inspect
from typing import Any

import numpy as np
import torch
from diffusers import (
    FlowMatchEulerDiscreteScheduler,
    HunyuanSkyreelsImageToVideoPipeline,
    HunyuanVideoPipeline,
)
from diffusers.pipelines.hunyuan_video.pipeline_hunyuan_video import (
    DEFAULT_PROMPT_TEMPLATE,
    retrieve_timesteps,
)
from diffusers.utils.torch_utils import randn_tensor
from torch import Tensor

from gen_rl.core.images import load_condition_image
from pipelines.base import ATTENTION_LORA_TARGETS, NEGATIVE_PREFIX, FlowMatchSampler, RolloutOptions


class VideoFlowSampler(FlowMatchSampler):
    """What the HunyuanVideo pipelines share: frame counts, the flow-match grid, the default size and the VAE.

    A pipeline may carry ``default_num_frames`` (the tiny pipelines do); otherwise the frames default to the
    pipeline's own ``__call__`` default (HunyuanVideo 129, SkyReels 97, HunyuanVideo 1.5 121).
    """

    video = True

    # ----- sizes --------------------------------------------------------------------------------------------
    def default_num_frames(self) -> int:
        """Frames drawn when ``options.num_frames`` is None: the pipeline's ``default_num_frames`` or its
        ``__call__`` default."""
        frames = getattr(self.pipeline, "default_num_frames", None)
        return int(frames) if frames else int(_call_default(self.pipeline, "num_frames"))

    def _num_frames(self, options: RolloutOptions) -> int:
        frames = self.default_num_frames() if options.num_frames is None else int(options.num_frames)
        temporal = self.pipeline.vae_scale_factor_temporal
        if frames < 1 or (frames - 1) % temporal:
            raise ValueError(
                f"{self.family}: num_frames={frames} does not fit the VAE's {temporal}x temporal compression; "
                f"use 1 + a multiple of {temporal} (e.g. {1 + temporal * max(1, (frames - 1) // temporal)})"
            )
        return frames

    def default_image_size(self) -> tuple[int, int]:
        """The pipeline's ``__call__`` default (height, width) in pixels."""
        return int(_call_default(self.pipeline, "height")), int(_call_default(self.pipeline, "width"))

    def _image_size(self, options: RolloutOptions) -> tuple[int, int]:
        height, width = super()._image_size(options)
        multiple = self.pipeline.vae_scale_factor_spatial * self.denoiser.config.patch_size
        if height % multiple or width % multiple:
            raise ValueError(
                f"{self.family} height and width must be multiples of {multiple} (VAE x patch); got {height}x{width}"
            )
        return height, width

    def _latent_frames(self, num_frames: int) -> int:
        return (num_frames - 1) // self.pipeline.vae_scale_factor_temporal + 1

    def _latent_size(self, image_size: tuple[int, int]) -> tuple[int, int]:
        factor = self.pipeline.vae_scale_factor_spatial
        return image_size[0] // factor, image_size[1] // factor

    @staticmethod
    def _model_dtype(conditioning: dict[str, Tensor]) -> torch.dtype:
        """The transformer's dtype, read off the stored prompt embeddings (``encode_prompts`` casts them to it): the
        model's own ``.dtype`` walks every parameter, a cost paid at each denoising step otherwise."""
        return conditioning["prompt_embeds"].dtype

    # ----- schedule -----------------------------------------------------------------------------------------
    def grid(self, options: RolloutOptions, latents: Tensor) -> tuple[Tensor, Tensor]:
        """The pipelines' grid: ``linspace(1, 0, S + 1)[:-1]`` shifted by the scheduler's static shift
        (``sigma' = s sigma / (1 + (s - 1) sigma)``, SD3 eq. 23; ``options.shift`` overrides it), then 0."""
        overrides = {} if options.shift is None else {"shift": options.shift, "use_dynamic_shifting": False}
        scheduler = FlowMatchEulerDiscreteScheduler.from_config(self.scheduler.config, **overrides)
        sigmas = np.linspace(1.0, 0.0, options.num_steps + 1)[:-1]
        timesteps, _ = retrieve_timesteps(scheduler, options.num_steps, self.device, sigmas=sigmas)
        return scheduler.sigmas.to(self.device, torch.float32), timesteps.to(torch.float32)

    # ----- VAE ----------------------------------------------------------------------------------------------
    def latent_dtype(self) -> torch.dtype:
        """The dtype the pipeline keeps its latents in (HunyuanVideo: float32)."""
        return torch.float32

    def decode(self, latents: Tensor, image_size: tuple[int, int]) -> Tensor:
        """Latents ``[B, C, T', h, w]`` to video ``[B, 3, T, H, W]`` float32 in [0, 1], as the pipeline decodes
        (divide by the VAE scaling factor, decode, ``postprocess_video``)."""
        vae = self.pipeline.vae
        video = vae.decode(latents.to(vae.dtype) / vae.config.scaling_factor, return_dict=False)[0]
        frames = self.pipeline.video_processor.postprocess_video(video, output_type="pt")  # [B, T, 3, H, W]
        return frames.permute(0, 2, 1, 3, 4).float()

    def encode(self, pixels: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Video ``[B, 3, T, H, W]`` (or images ``[B, 3, H, W]``, one frame) in [0, 1] to scaled latents:
        the VAE posterior's mode (or a sample with ``generator``) times the scaling factor."""
        if pixels.ndim == 4:
            pixels = pixels.unsqueeze(2)
        if pixels.ndim != 5 or pixels.shape[1] != 3:
            raise ValueError(
                f"encode expects video [B, 3, T, H, W] or images [B, 3, H, W] in [0, 1]; got {tuple(pixels.shape)}"
            )
        vae = self.pipeline.vae
        distribution = vae.encode(pixels.to(self.device, vae.dtype) * 2 - 1).latent_dist
        latents = distribution.mode() if generator is None else distribution.sample(generator)
        return (latents * vae.config.scaling_factor).to(self.latent_dtype())


class HunyuanVideoSampler(VideoFlowSampler):
    """SDE sampler for HunyuanVideo text-to-video (embedded guidance; true CFG optional)."""

    family = "hunyuan_video"
    pipeline_class = HunyuanVideoPipeline
    required_components = ("transformer", "vae", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2")
    default_max_sequence_length = 256  # Llama tokens after the template's system prompt
    # Attention projections of the dual-stream blocks (image and text), the single-stream blocks and the token
    # refiner (diffusers' HunyuanVideo LoRA recipes train to_q / to_k / to_v / to_out.0).
    lora_target_modules = ATTENTION_LORA_TARGETS
    default_guidance = (
        6.0  # HunyuanVideoPipeline's guidance_scale default (DanceGRPO passes 6018 = 6.018 * 1000)
    )

    @property
    def prompt_template(self) -> dict[str, Any]:
        """The Llama prompt template (the pipeline's ``prompt_template`` attribute, else diffusers' default)."""
        return getattr(self.pipeline, "prompt_template", None) or DEFAULT_PROMPT_TEMPLATE

    def encode_prompts(
        self, prompts: list[str], options: RolloutOptions, num_per_prompt: int
    ) -> dict[str, Tensor]:
        """Llama sequence + mask and pooled CLIP embeddings (``negative_*`` for CFG), plus the embedded guidance
        ``[B]`` (``guidance * 1000``, as the pipeline feeds it)."""
        dtype = self.dtype  # looked up once: a model's .dtype walks its parameters
        conditioning = self._encode(prompts, options, num_per_prompt, dtype)
        if options.cfg_scale > 1.0:
            negative = self._encode([options.negative_prompt] * len(prompts), options, num_per_prompt, dtype)
            conditioning.update({NEGATIVE_PREFIX + key: value for key, value in negative.items()})
        guidance = self.default_guidance if options.guidance is None else options.guidance
        if self.denoiser.config.guidance_embeds:
            batch = len(prompts) * num_per_prompt
            conditioning["guidance"] = torch.full((batch,), guidance * 1000.0, device=self.device).to(dtype)
        elif options.guidance is not None:
            raise ValueError(
                f"guidance was set but this {self.family} transformer has no guidance embedding; set "
                "sample.guidance to null, or use cfg_scale for true classifier-free guidance"
            )
        return conditioning

    def _encode(
        self, prompts: list[str], options: RolloutOptions, num_per_prompt: int, dtype: torch.dtype
    ) -> dict[str, Tensor]:
        prompt_embeds, pooled_embeds, attention_mask = self.pipeline.encode_prompt(
            prompt=prompts,
            prompt_template=self.prompt_template,
            num_videos_per_prompt=num_per_prompt,
            device=self.device,
            max_sequence_length=self._max_sequence_length(options),
        )
        return {
            "prompt_embeds": prompt_embeds.to(dtype),
            "prompt_attention_mask": attention_mask.to(dtype),
            "pooled_prompt_embeds": pooled_embeds.to(dtype),
        }

    def initial_latents(
        self, generators: list[torch.Generator], image_size: tuple[int, int], num_frames: int | None = None
    ) -> Tensor:
        """Latents ``[B, C, T', h, w]`` float32 drawn exactly as ``HunyuanVideoPipeline.prepare_latents``."""
        height, width = image_size
        return self.pipeline.prepare_latents(
            len(generators),
            self.denoiser.config.in_channels,
            height,
            width,
            num_frames,
            torch.float32,
            self.device,
            generators,
        )

    def model_output(
        self, latents: Tensor, timesteps: Tensor, conditioning: dict[str, Tensor], image_size: tuple[int, int]
    ) -> Tensor:
        """One HunyuanVideo transformer call (velocity) at per-sample timesteps ``sigma * 1000``."""
        return self._transformer_call(latents.to(self._model_dtype(conditioning)), timesteps, conditioning)

    def _transformer_call(
        self, hidden_states: Tensor, timesteps: Tensor, conditioning: dict[str, Tensor]
    ) -> Tensor:
        return self.active_denoiser(
            hidden_states=hidden_states,
            timestep=timesteps,
            encoder_hidden_states=conditioning["prompt_embeds"],
            encoder_attention_mask=conditioning["prompt_attention_mask"],
            pooled_projections=conditioning["pooled_prompt_embeds"],
            guidance=conditioning.get("guidance"),
            return_dict=False,
        )[0]


class HunyuanVideoI2VSampler(HunyuanVideoSampler):
    """SDE sampler for SkyReels-V1-style HunyuanVideo image-to-video (DanceGRPO's SkyReels-I2V setting).

    The transformer reads ``[noise latents, source latents]`` concatenated on channels; the source latents are
    the first frame's VAE latents followed by zeros for the other latent frames. Each prompt's metadata carries
    its source ``image``; ``encode_conditions`` encodes it once per prompt (the posterior mode, shared by the
    group, as DanceGRPO encodes one source per prompt) into ``rollout.conditioning["image_latents"]``, so the
    training forward sees exactly the stored source. The pipeline's default is true CFG 6 with guidance 1.
    """

    family = "hunyuan_video_i2v"
    pipeline_class = HunyuanSkyreelsImageToVideoPipeline
    conditions = ("image",)
    default_guidance = (
        1.0  # HunyuanSkyreelsImageToVideoPipeline's guidance_scale default (DanceGRPO: 1000 = 1 * 1000)
    )

    def encode_conditions(
        self,
        metadata: list[dict[str, Any]],
        options: RolloutOptions,
        num_per_prompt: int,
        image_size: tuple[int, int],
        num_frames: int | None,
    ) -> dict[str, Tensor]:
        """Source latents ``[B, C, T', h, w]``: each prompt's image (path, PIL or tensor) resized to the video
        size, preprocessed and encoded as the pipeline's ``prepare_latents`` does (one image per VAE call),
        times the scaling factor, zero-padded over the later latent frames, repeated for the group."""
        height, width = image_size
        vae = self.pipeline.vae
        vae_dtype = vae.dtype
        sources = []
        for item in metadata:
            image = load_condition_image(item["image"], height, width)[None]
            image = self.pipeline.video_processor.preprocess(image, height=height, width=width)
            posterior = vae.encode(image.to(self.device, vae_dtype).unsqueeze(2)).latent_dist
            sources.append(posterior.mode().to(torch.float32) * self.pipeline.vae_scaling_factor)
        first_frame = torch.cat(sources)
        padding = first_frame.new_zeros(
            (
                first_frame.shape[0],
                first_frame.shape[1],
                self._latent_frames(num_frames) - 1,
                *first_frame.shape[3:],
            )
        )
        image_latents = torch.cat([first_frame, padding], dim=2).to(self.dtype)
        return {"image_latents": image_latents.repeat_interleave(num_per_prompt, dim=0)}

    def initial_latents(
        self, generators: list[torch.Generator], image_size: tuple[int, int], num_frames: int | None = None
    ) -> Tensor:
        """Noise ``[B, C, T', h, w]`` float32 as ``HunyuanSkyreelsImageToVideoPipeline.prepare_latents`` draws it:
        that pipeline first samples each source's VAE posterior with the sample's generator, then draws the noise
        with the same generator; the posterior draw (its shape and the VAE dtype) is taken here too, so a seed
        gives the pipeline's noise."""
        height, width = self._latent_size(image_size)
        vae = self.pipeline.vae
        posterior_shape, vae_dtype = (1, vae.config.latent_channels, 1, height, width), vae.dtype
        for generator in generators:
            randn_tensor(posterior_shape, generator=generator, device=self.device, dtype=vae_dtype)
        channels = self.denoiser.config.in_channels // 2
        shape = (len(generators), channels, self._latent_frames(num_frames), height, width)
        return randn_tensor(shape, generator=generators, device=self.device, dtype=torch.float32)

    def model_output(
        self, latents: Tensor, timesteps: Tensor, conditioning: dict[str, Tensor], image_size: tuple[int, int]
    ) -> Tensor:
        """One transformer call on ``[latents, source latents]`` (channel concat), as the SkyReels pipeline."""
        hidden_states = torch.cat(
            [latents.to(self._model_dtype(conditioning)), conditioning["image_latents"]], dim=1
        )
        return self._transformer_call(hidden_states, timesteps, conditioning)


def _call_default(pipeline: Any, name: str) -> Any:
    """The default of argument ``name`` of the pipeline's ``__call__``."""
    return inspect.signature(type(pipeline).__call__).parameters[name].default
