"""Wan 2.1 / 2.2 text-to-video and image-to-video over diffusers' ``WanPipeline`` / ``WanImageToVideoPipeline``.

Composes the pipeline's own ``encode_prompt`` (UMT5, padded to ``max_sequence_length``), ``prepare_latents``
(the ``randn_tensor`` draw; image-to-video: the VAE condition latents and frame mask), ``encode_image`` (CLIP
image embeddings of Wan 2.1 I2V), the shipped scheduler's own sigma grid and the VAE with its per-channel
latent mean / std; the sampling loop is ``Sampler.rollout``. Latents stay float32 as in the pipeline, and each
denoiser call gets them cast to the transformer's dtype.

Wan 2.2 A14B has two experts: ``transformer`` (high noise) runs while the scheduler timestep
``t >= boundary_ratio * num_train_timesteps``, ``transformer_2`` (low noise) below, exactly as ``WanPipeline``
switches. The choice is made per sample from the stored timestep, so a grid point calls the same expert at
rollout and at log-prob recomputation. Which experts train is ``sampler.trained_experts`` (``("high", "low")``
by default on a two-expert model): ``sampler.denoisers`` lists their raw transformers, and ``sampler.denoiser``
is that transformer when one expert trains, else a :class:`WanExperts` module holding both (the module a LoRA
attaches to and a trainer wraps). Wan's LoRA files hold one expert each: ``pipe.load_lora_weights(folder)``
loads into the high-noise expert, ``load_lora_weights(folder, load_into_transformer_2=True)`` into the low-noise
one; :meth:`WanSampler.lora_export_parts` splits a two-expert adapter into those two files' tensors.
"""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np
import torch
from diffusers import WanImageToVideoPipeline, WanPipeline
from diffusers.utils.torch_utils import randn_tensor
from PIL import Image
from torch import Tensor

from gen_rl.core.images import load_condition_image
from pipelines.base import NEGATIVE_PREFIX, FlowMatchSampler, RolloutOptions

# Self-attention, cross-attention and feed-forward of every Wan block (the layers Wan LoRAs usually train).
WAN_LORA_TARGETS = (
    "attn1.to_q",
    "attn1.to_k",
    "attn1.to_v",
    "attn1.to_out.0",
    "attn2.to_q",
    "attn2.to_k",
    "attn2.to_v",
    "attn2.to_out.0",
    "ffn.net.0.proj",
    "ffn.net.2",
)
EXPERTS = ("high", "low")  # WanPipeline's transformer (t >= boundary) and transformer_2 (t < boundary)
EXPERT_COMPONENTS = {"high": "transformer", "low": "transformer_2"}
# sub-folders of a two-expert LoRA export (the high / low noise file naming of released Wan 2.2 LoRAs)
EXPERT_EXPORT_FOLDERS = {"high": "high_noise", "low": "low_noise"}
UNIPC_START_OFFSET = 1e-6  # UniPC's flow grid starts at 1 - 1e-6
DEFAULT_NUM_FRAMES = 81  # WanPipeline's default
DEFAULT_IMAGE_SIZE = (480, 832)  # WanPipeline's default (height, width)


class WanExperts(torch.nn.Module):
    """Both Wan 2.2 experts as one trainable module: children ``high`` and ``low`` are the pipeline's own
    transformers (not copies). ``forward(expert, **kwargs)`` calls one of them.

    It offers the adapter methods a trainer uses on a denoiser (``add_adapter``, ``enable_adapters`` /
    ``disable_adapters``, ``peft_config``, ``enable_gradient_checkpointing``), applied to both experts. In a
    training forward the other expert's trainable parameters enter the output times zero, so every trained
    parameter gets a (zero) gradient and DDP never waits for an unused one.
    """

    def __init__(self, high: torch.nn.Module, low: torch.nn.Module) -> None:
        super().__init__()
        self.high = high
        self.low = low

    def forward(self, expert: str, **kwargs: Any) -> Any:
        """The output of expert ``expert`` ("high" or "low") called with ``kwargs`` (``return_dict=False``)."""
        output = self._expert(expert)(**kwargs)
        if not torch.is_grad_enabled():  # sampling: nothing to keep in the graph
            return output
        other = self._expert("low" if expert == "high" else "high")
        unused = [param for param in other.parameters() if param.requires_grad]
        if unused:
            zero = sum(param.sum() for param in unused) * 0.0
            output = (output[0] + zero.to(output[0].dtype), *output[1:])
        return output

    def _expert(self, expert: str) -> torch.nn.Module:
        if expert not in EXPERTS:
            raise ValueError(f"unknown Wan expert {expert!r}; use one of {EXPERTS}")
        return self.high if expert == "high" else self.low

    @property
    def dtype(self) -> torch.dtype:
        return self.high.dtype

    @property
    def peft_config(self) -> dict[str, Any]:
        return getattr(self.high, "peft_config", {})

    def add_adapter(self, adapter_config: Any, adapter_name: str = "default") -> None:
        """The same LoRA config attached to both experts (each gets its own weights)."""
        for expert in (self.high, self.low):
            expert.add_adapter(adapter_config, adapter_name=adapter_name)

    def enable_adapters(self) -> None:
        for expert in (self.high, self.low):
            expert.enable_adapters()

    def disable_adapters(self) -> None:
        for expert in (self.high, self.low):
            expert.disable_adapters()

    def enable_gradient_checkpointing(self) -> None:
        for expert in (self.high, self.low):
            expert.enable_gradient_checkpointing()


class WanSampler(FlowMatchSampler):
    """SDE sampler for Wan 2.1 / 2.2 text-to-video (one transformer, or Wan 2.2's two experts); true CFG."""

    family = "wan"
    pipeline_class = WanPipeline
    required_components = ("vae", "text_encoder", "tokenizer")
    default_max_sequence_length = 512  # WanPipeline's default
    lora_target_modules = WAN_LORA_TARGETS
    video = True
    default_num_frames: ClassVar[int] = DEFAULT_NUM_FRAMES

    def __init__(self, pipeline: WanPipeline, trained_experts: tuple[str, ...] | None = None) -> None:
        super().__init__(pipeline)
        if pipeline.config.get("expand_timesteps", False):
            raise ValueError(
                "this Wan pipeline has expand_timesteps=True (Wan 2.2 TI2V-5B: per-token timesteps), which the wan "
                "samplers do not support; use a Wan 2.1 or Wan 2.2 A14B checkpoint"
            )
        self.experts = self._present_experts(pipeline)
        self._container: WanExperts | None = None
        self._trained: tuple[str, ...] = self.experts
        self.trained_experts = self.experts if trained_experts is None else tuple(trained_experts)

    @staticmethod
    def _present_experts(pipeline: Any) -> tuple[str, ...]:
        """The experts a rollout calls: ``high`` alone without a boundary, both with one."""
        boundary = pipeline.config.get("boundary_ratio")
        needed = ("high",) if boundary is None else EXPERTS
        missing = [
            EXPERT_COMPONENTS[e] for e in needed if getattr(pipeline, EXPERT_COMPONENTS[e], None) is None
        ]
        if missing:
            raise ValueError(
                f"the Wan pipeline (boundary_ratio={boundary}) needs {missing}, which it lacks; load the full "
                "checkpoint (Wan 2.2 A14B ships transformer and transformer_2)"
            )
        return needed

    # ----- experts ---------------------------------------------------------------------------------------------
    @property
    def trained_experts(self) -> tuple[str, ...]:
        """The experts whose weights train (``high`` / ``low``); set it before a LoRA is attached."""
        return self._trained

    @trained_experts.setter
    def trained_experts(self, experts: tuple[str, ...]) -> None:
        experts = tuple(experts)
        unknown = [e for e in experts if e not in self.experts]
        if not experts or unknown or len(set(experts)) != len(experts):
            raise ValueError(
                f"trained Wan experts must be a non-empty subset of {list(self.experts)} (this model's experts); "
                f"got {list(experts)}"
            )
        if self.forward_module is not None and experts != self._trained:
            raise ValueError("cannot change the trained Wan experts after a trainer wrapped the denoiser")
        self._trained = tuple(e for e in EXPERTS if e in experts)
        self._container = None

    @property
    def denoisers(self) -> list[torch.nn.Module]:
        """The raw transformers that train, high-noise expert first."""
        return [getattr(self.pipeline, EXPERT_COMPONENTS[e]) for e in self._trained]

    @property
    def denoiser(self) -> torch.nn.Module:
        """The trained transformer, or a :class:`WanExperts` holding both when both experts train."""
        if len(self._trained) == 1:
            return self.denoisers[0]
        if self._container is None:
            self._container = WanExperts(*self.denoisers)
        return self._container

    def expert_module(self, expert: str) -> torch.nn.Module:
        """The pipeline's raw transformer of ``expert`` ("high": ``transformer``, "low": ``transformer_2``)."""
        return getattr(self.pipeline, EXPERT_COMPONENTS[expert])

    @property
    def boundary_timestep(self) -> float | None:
        """``boundary_ratio * num_train_timesteps`` of a two-expert model (WanPipeline's switch), else None."""
        ratio = self.pipeline.config.get("boundary_ratio")
        if ratio is None:
            return None
        return ratio * self.pipeline.scheduler.config.num_train_timesteps

    def experts_at(self, timesteps: Tensor) -> list[str]:
        """The expert WanPipeline calls at each of the scheduler ``timesteps`` (high while ``t >= boundary``)."""
        boundary = self.boundary_timestep
        if boundary is None:
            return ["high"] * len(timesteps)
        return ["high" if bool(t >= boundary) else "low" for t in timesteps]

    def lora_export_parts(self, state_dict: dict[str, Tensor]) -> dict[str, dict[str, Tensor]]:
        """A LoRA state dict of ``denoiser`` as one file's tensors per trained expert: ``{"": state_dict}`` for one
        expert, ``{"high_noise": ..., "low_noise": ...}`` (keys relative to each transformer) for both, to be
        saved in those sub-folders and loaded with ``load_lora_weights(folder)`` /
        ``load_lora_weights(folder, load_into_transformer_2=True)``."""
        if len(self._trained) == 1:
            return {"": dict(state_dict)}
        parts: dict[str, dict[str, Tensor]] = {}
        for expert in self._trained:
            prefix = expert + "."
            parts[EXPERT_EXPORT_FOLDERS[expert]] = {
                key[len(prefix) :]: value for key, value in state_dict.items() if key.startswith(prefix)
            }
        stray = [key for key in state_dict if not key.startswith(tuple(e + "." for e in self._trained))]
        if stray:
            raise ValueError(f"LoRA tensors outside the Wan experts: {stray[:3]}")
        return parts

    # ----- hooks -----------------------------------------------------------------------------------------------
    def encode_prompts(
        self, prompts: list[str], options: RolloutOptions, num_per_prompt: int
    ) -> dict[str, Tensor]:
        """UMT5 embeddings ``[B, L, D]`` (zero-padded to L = max_sequence_length); ``negative_*`` with CFG."""
        use_cfg = options.cfg_scale > 1.0
        prompt_embeds, negative_embeds = self.pipeline.encode_prompt(
            prompt=prompts,
            negative_prompt=options.negative_prompt if use_cfg else None,
            do_classifier_free_guidance=use_cfg,
            num_videos_per_prompt=num_per_prompt,
            max_sequence_length=self._max_sequence_length(options),
            device=self.device,
            dtype=self.dtype,
        )
        conditioning = {"prompt_embeds": prompt_embeds}
        if use_cfg:
            conditioning[NEGATIVE_PREFIX + "prompt_embeds"] = negative_embeds
        return conditioning

    def initial_latents(
        self, generators: list[torch.Generator], image_size: tuple[int, int], num_frames: int | None = None
    ) -> Tensor:
        """Float32 latents ``[B, C, 1 + (T - 1) / 4, H / 8, W / 8]`` drawn as ``WanPipeline.prepare_latents`` does."""
        height, width = image_size
        return self.pipeline.prepare_latents(
            len(generators),
            self._latent_channels(),
            height,
            width,
            num_frames,
            torch.float32,
            self.device,
            generators,
        )

    def grid(self, options: RolloutOptions, latents: Tensor) -> tuple[Tensor, Tensor]:
        """The shipped scheduler's own grid (``set_timesteps`` of a fresh copy: UniPC's flow sigmas for released
        Wan checkpoints, FlowMatchEuler's for others), with ``options.shift`` replacing its (flow) shift; a
        first sigma of UniPC's ``1 - 1e-6`` is taken as 1."""
        shipped = self.pipeline.scheduler
        overrides = {}
        if options.shift is not None:
            overrides["flow_shift" if "flow_shift" in shipped.config else "shift"] = options.shift
        scheduler = type(shipped).from_config(shipped.config, **overrides)
        if scheduler.config.get("use_dynamic_shifting", False):
            raise ValueError(
                f"the Wan pipeline's {type(shipped).__name__} uses dynamic shifting, which Wan checkpoints do not; "
                "restore the checkpoint's scheduler or set sample.shift"
            )
        scheduler.set_timesteps(options.num_steps, device=self.device)
        sigmas = scheduler.sigmas.to(self.device, torch.float32)
        if abs(float(sigmas[0]) - 1.0) < UNIPC_START_OFFSET * 10:
            # UniPC starts at 1 - 1e-6 (its log-SNR is infinite at 1). The SDE steps treat s = 1 as the start
            # (Flow-GRPO's g = a sqrt(s / (1 - s)) would give a first-step std of ~700 a at 1 - 1e-6); the model
            # still gets the scheduler's own timestep (999).
            sigmas[0] = 1.0
        timesteps = scheduler.timesteps.to(self.device, torch.float32)
        if sigmas.shape[0] != timesteps.shape[0] + 1 or timesteps.shape[0] != options.num_steps:
            raise ValueError(
                f"the {type(shipped).__name__} grid has {timesteps.shape[0]} timesteps and {sigmas.shape[0]} sigmas "
                f"for {options.num_steps} steps; a single-step solver config is needed (solver order does not "
                "change the grid)"
            )
        return sigmas, timesteps

    def model_output(
        self, latents: Tensor, timesteps: Tensor, conditioning: dict[str, Tensor], image_size: tuple[int, int]
    ) -> Tensor:
        """Velocity from the expert WanPipeline calls at each sample's timestep (rows split across experts when
        they differ); inputs cast to the transformer dtype, timesteps fed as given (sigma * 1000)."""
        hidden_states = self._model_input(latents, conditioning)
        inputs = {
            "encoder_hidden_states": conditioning["prompt_embeds"],
            "encoder_hidden_states_image": conditioning.get("image_embeds"),
        }
        boundary = self.boundary_timestep
        if boundary is None:
            return self._call_expert("high", hidden_states, timesteps, inputs)
        high = timesteps >= boundary
        if bool(high.all()):
            return self._call_expert("high", hidden_states, timesteps, inputs)
        if not bool(high.any()):
            return self._call_expert("low", hidden_states, timesteps, inputs)
        output = None
        for expert, rows in (("high", high.nonzero().flatten()), ("low", (~high).nonzero().flatten())):
            part = self._call_expert(
                expert,
                hidden_states[rows],
                timesteps[rows],
                {key: None if value is None else value[rows] for key, value in inputs.items()},
            )
            if output is None:
                output = part.new_zeros((len(timesteps), *part.shape[1:]))
            output = output.index_put((rows,), part)
        return output

    def _call_expert(
        self, expert: str, hidden_states: Tensor, timesteps: Tensor, inputs: dict[str, Tensor | None]
    ) -> Tensor:
        kwargs = {"hidden_states": hidden_states, "timestep": timesteps, "return_dict": False, **inputs}
        if expert not in self._trained:  # a frozen expert: the pipeline's module, never the trainer's wrapper
            return self.expert_module(expert)(**kwargs)[0]
        if len(self._trained) > 1:
            return self.active_denoiser(expert, **kwargs)[0]
        return self.active_denoiser(**kwargs)[0]

    def _model_input(self, latents: Tensor, conditioning: dict[str, Tensor]) -> Tensor:
        return latents.to(self.dtype)

    def decode(self, latents: Tensor, image_size: tuple[int, int]) -> Tensor:
        """Latents to video ``[B, 3, T, H, W]`` in [0, 1]: undo the per-channel latent mean / std as WanPipeline
        does, decode, post-process."""
        vae = self.pipeline.vae
        latents = latents.to(vae.dtype)
        mean, inverse_std = self._latent_statistics(latents)
        video = vae.decode(latents / inverse_std + mean, return_dict=False)[0]
        frames = self.pipeline.video_processor.postprocess_video(video, output_type="pt")  # [B, T, 3, H, W]
        return frames.permute(0, 2, 1, 3, 4).float()

    def encode(self, pixels: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Video ``[B, 3, T, H, W]`` in [0, 1] to normalised latents ``(z - mean) / std`` (the inverse of
        ``decode``): the VAE mean, or a sample with ``generator``."""
        if pixels.ndim != 5 or pixels.shape[1] != 3:
            raise ValueError(
                f"Wan encode expects video pixels [B, 3, T, H, W] in [0, 1]; got {tuple(pixels.shape)}"
            )
        vae = self.pipeline.vae
        video = self.pipeline.video_processor.normalize(pixels.to(self.device, vae.dtype))
        distribution = vae.encode(video).latent_dist
        latents = distribution.mode() if generator is None else distribution.sample(generator)
        mean, inverse_std = self._latent_statistics(latents)
        return ((latents - mean) * inverse_std).float()

    def _latent_statistics(self, latents: Tensor) -> tuple[Tensor, Tensor]:
        config = self.pipeline.vae.config
        shape = (1, config.z_dim, 1, 1, 1)
        mean = torch.tensor(config.latents_mean).view(shape).to(latents.device, latents.dtype)
        inverse_std = (1.0 / torch.tensor(config.latents_std)).view(shape).to(latents.device, latents.dtype)
        return mean, inverse_std

    def _latent_channels(self) -> int:
        return self.expert_module(self.experts[0]).config.in_channels

    def default_image_size(self) -> tuple[int, int]:
        """WanPipeline's default (height, width): 480 x 832."""
        return DEFAULT_IMAGE_SIZE

    def _image_size(self, options: RolloutOptions) -> tuple[int, int]:
        height, width = super()._image_size(options)
        patch = self.expert_module(self.experts[0]).config.patch_size
        multiple = self.pipeline.vae_scale_factor_spatial * patch[1]
        if height % multiple or width % multiple:
            raise ValueError(
                f"Wan video height and width must be multiples of {multiple} (VAE scale x patch); got "
                f"{height}x{width}"
            )
        return height, width

    def _num_frames(self, options: RolloutOptions) -> int:
        """``options.num_frames``, else the pipeline's ``default_num_frames`` (tiny builders set one), else 81;
        it must be ``4k + 1`` (the VAE's temporal compression)."""
        frames = options.num_frames or getattr(self.pipeline, "default_num_frames", self.default_num_frames)
        temporal = self.pipeline.vae_scale_factor_temporal
        if frames < 1 or (frames - 1) % temporal:
            raise ValueError(
                f"Wan num_frames must be {temporal}k + 1 (e.g. {temporal + 1}, {4 * temporal + 1}, 81); got {frames}"
            )
        return frames


class WanI2VSampler(WanSampler):
    """Image-to-video (Wan 2.1 I2V with CLIP image embeddings, Wan 2.2 I2V A14B without): each prompt's
    ``metadata["image"]`` is the first frame. ``encode_conditions`` stores the VAE condition latents (frame mask
    + encoded first frame, ``WanImageToVideoPipeline.prepare_latents``) and the image embeddings."""

    family = "wan_i2v"
    pipeline_class = WanImageToVideoPipeline
    conditions = ("image",)

    def encode_conditions(
        self,
        metadata: list[dict[str, Any]],
        options: RolloutOptions,
        num_per_prompt: int,
        image_size: tuple[int, int],
        num_frames: int | None,
    ) -> dict[str, Tensor]:
        """Per prompt: ``condition`` ``[G, 4 + C, T', h, w]`` (mask and first-frame latents) and, for Wan 2.1
        I2V, ``image_embeds`` ``[G, L, D]`` (CLIP penultimate hidden states)."""
        height, width = image_size
        conditions, sources = [], []
        for record in metadata:
            source = load_condition_image(record["image"], height, width)
            sources.append(source)
            image = self.pipeline.video_processor.preprocess(source[None], height=height, width=width)
            image = image.to(self.device, torch.float32)
            placeholder = torch.zeros(
                (num_per_prompt, self.pipeline.vae.config.z_dim, *self._latent_grid(image_size, num_frames)),
                device=self.device,
            )
            _, condition = self.pipeline.prepare_latents(
                image,
                num_per_prompt,
                self.pipeline.vae.config.z_dim,
                height,
                width,
                num_frames,
                torch.float32,
                self.device,
                None,
                placeholder,  # given latents: no draw, only the condition latents are computed
            )
            conditions.append(condition.to(self.dtype))
        encoded = {"condition": torch.cat(conditions)}
        if self._uses_image_embeddings():  # one CLIP call for every prompt's source
            images = [
                Image.fromarray(np.asarray((s * 255).round().byte().permute(1, 2, 0).cpu())) for s in sources
            ]
            embeds = self.pipeline.encode_image(images, self.device)
            encoded["image_embeds"] = embeds.to(self.dtype).repeat_interleave(num_per_prompt, dim=0)
        return encoded

    def _uses_image_embeddings(self) -> bool:
        transformer = self.pipeline.transformer
        return transformer is not None and transformer.config.image_dim is not None

    def _latent_grid(self, image_size: tuple[int, int], num_frames: int) -> tuple[int, int, int]:
        height, width = image_size
        spatial, temporal = self.pipeline.vae_scale_factor_spatial, self.pipeline.vae_scale_factor_temporal
        return (num_frames - 1) // temporal + 1, height // spatial, width // spatial

    def initial_latents(
        self, generators: list[torch.Generator], image_size: tuple[int, int], num_frames: int | None = None
    ) -> Tensor:
        """Float32 noise ``[B, z_dim, T', h, w]``: the ``randn_tensor`` draw of the I2V ``prepare_latents``."""
        shape = (len(generators), self.pipeline.vae.config.z_dim, *self._latent_grid(image_size, num_frames))
        return randn_tensor(shape, generator=generators, device=self.device, dtype=torch.float32)

    def _model_input(self, latents: Tensor, conditioning: dict[str, Tensor]) -> Tensor:
        return torch.cat([latents, conditioning["condition"].to(latents.dtype)], dim=1).to(self.dtype)
