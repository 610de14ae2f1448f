"""The sampler protocol, the rollout record, and the rollout / log-prob loops written once for every denoiser.

A family adapter (``sd.py``, ``sd3.py``, ``flux.py``, ...) implements a few hooks over a diffusers pipeline:
prompt encoding, initial latents, the noise grid, one denoiser call, VAE encode / decode. ``Sampler`` builds
on them, once for every family:

- ``rollout``: sample groups of images (or videos) with an SDE (or the ODE) and store every latent and per-step
  log-probability (the Gaussian policy of each denoising step, Flow-GRPO eq. 9 / DanceGRPO eq. 6 / DDPO eq. 4);
- ``log_prob``: recompute those log-probs for chosen steps from the ``Rollout`` record alone, with gradients,
  as the policy-gradient loss needs; ``check_log_probs`` is the "ratio == 1 before the first update" check.

The step kind comes from the family: ``FlowMatchSampler`` (rectified flow: ``flow_grpo``, ``dance_grpo``,
``cps``) and ``DDIMSampler`` (epsilon / v-prediction diffusion: ``ddim`` with ``eta = noise_level``).
Each sampler builds its own noise grid from the checkpoint's scheduler *config*, whatever scheduler class the
checkpoint ships (SD ships PNDM, Wan ships UniPC); the pipeline's scheduler object is never stepped.

The denoiser sits behind one name: ``sampler.denoiser`` is the raw module (UNet or transformer, the one a
LoRA attaches to); ``sampler.active_denoiser`` is the module actually called, ``sampler.forward_module`` (a
distributed / autocast wrapper a trainer sets) or else the raw one.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from diffusers import DDIMScheduler, DiffusionPipeline, FlowMatchEulerDiscreteScheduler
from torch import Tensor

from gen_rl.core.seeding import derive_seed, draw_noise, make_generators
from pipelines.sde import (
    DDIM_PREDICTION_TYPES,
    SDE_STEPS,
    StepOutput,
    check_ddim_grid,
    check_flow_grid,
    ddim_step_unchecked,
    flow_euler_unchecked,
    flow_step_unchecked,
    gaussian_log_prob,
)

NEGATIVE_PREFIX = "negative_"
# The joint-attention projections of diffusers' MMDiT / FLUX blocks (image and text streams).
ATTENTION_LORA_TARGETS = (
    "attn.to_q",
    "attn.to_k",
    "attn.to_v",
    "attn.to_out.0",
    "attn.add_q_proj",
    "attn.add_k_proj",
    "attn.add_v_proj",
    "attn.to_add_out",
)


@dataclass
class RolloutOptions:
    """How to sample. Every field can be set from the ``sample`` section of a config."""

    num_steps: int = 10  # denoising steps S
    height: int | None = None  # pixels; None: the pipeline's default size
    width: int | None = None  # pixels; None: the pipeline's default size
    num_frames: int | None = None  # video families: frames; None: the family default (image families: None)
    cfg_scale: float = 1.0  # true classifier-free guidance with the negative prompt; <= 1 disables it
    negative_prompt: str = ""  # the unconditional prompt used when cfg_scale > 1
    guidance: float | None = None  # embedded (distilled) guidance of FLUX.1-dev; None: the family default
    shift: float | None = None  # static schedule shift; None: the scheduler's own (dynamic for FLUX)
    # the stochastic step: flow_grpo | dance_grpo | cps (rectified-flow families), ddim (SD-style families)
    sde_type: str = "flow_grpo"
    noise_level: float = 0.7  # a of Flow-GRPO / CPS, eta of DanceGRPO or of DDIM; 0 gives the ODE
    sde_window: tuple[int, int] | None = None  # [start, end) steps that are stochastic; None: all steps
    share_initial_noise: bool = False  # members of a group start from the same initial noise
    seed: int = 0  # run seed; noise derives from (seed, epoch, prompt key, member)
    max_sequence_length: int | None = None  # T5 tokens; None: the family default (FLUX 512, SD3 256)
    decode: bool = True  # decode the final latents to pixels in [0, 1]


@dataclass(frozen=True)
class NoiseGrid:
    """One rollout's schedule: model timesteps ``[S]`` and noise levels ``[S+1]``, float32, on the model device.

    ``sigmas`` is the noise level the sampler runs on: the rectified-flow sigma (1 -> 0) for flow families,
    ``sqrt(1 - alpha_bar)`` for DDIM families, which also fill ``alpha_bars`` (the cumulative alphas, rising
    towards 1). Step ``i`` goes from grid point ``i`` to ``i + 1``.
    """

    timesteps: Tensor
    sigmas: Tensor
    alpha_bars: Tensor | None = None


@dataclass
class Rollout:
    """Everything needed to recompute each step's log-probability; batch-first tensors, S denoising steps.

    Latents may have any number of trailing dims (``[C, H, W]`` images, ``[C, T, H, W]`` or packed tokens).
    """

    latents: Tensor  # [B, S+1, *latent_shape] in the model dtype, x at every grid point
    sigmas: Tensor  # [B, S+1] float32, the noise level grid actually used (flow: 1 -> 0; DDIM: sqrt(1 - ab))
    timesteps: Tensor  # [B, S] float32, the scheduler timesteps fed to the model at each step
    log_probs: Tensor  # [B, S] float32, log-prob of each transition (mean over latent elements); NaN for ODE
    stochastic: Tensor  # [B, S] bool, steps that were sampled from a Gaussian with std > 0 (trainable)
    conditioning: dict[str, Tensor]  # batch-first prompt embeddings (negative_* for CFG), guidance, ...
    prompts: list[str]  # [B]
    group_ids: Tensor  # [B] int64, index of the prompt within the rollout call; members share it
    members: Tensor  # [B] int64, member index within the group
    seeds: Tensor  # [B] int64, seed of the initial noise
    sde_type: str
    noise_level: float
    cfg_scale: float
    image_size: tuple[int, int]  # (height, width) in pixels
    pixels: Tensor | None = None  # [B, C, H, W] (images) or [B, C, T, H, W] (video) float32 in [0, 1]
    metadata: list[dict[str, Any]] = field(default_factory=list)
    alpha_bars: Tensor | None = None  # [B, S+1] float32 cumulative alphas of the DDIM grid; None for flow
    num_frames: int | None = None  # frames of a video rollout; None for images
    # True once the noise grid was validated (set by ``rollout``; carried by ``select`` / ``cat``), so the
    # log-prob loop skips re-checking it; a hand-built record is checked once per ``log_prob`` call.
    grid_checked: bool = field(default=False, repr=False, compare=False)

    def __len__(self) -> int:
        return self.latents.shape[0]

    @property
    def num_steps(self) -> int:
        return self.timesteps.shape[1]

    def select(self, indices: Tensor | Sequence[int]) -> Rollout:
        """The sub-batch at ``indices`` (e.g. a training minibatch)."""
        index = torch.as_tensor(indices, dtype=torch.long)
        return dataclasses.replace(
            self, **{name: _take(value, index) for name, value in self._batched().items()}
        )

    @staticmethod
    def cat(rollouts: Sequence[Rollout]) -> Rollout:
        """Concatenate rollouts along the batch (same steps, SDE, image size and frames)."""
        first = rollouts[0]
        for other in rollouts[1:]:
            if other._settings() != first._settings():
                raise ValueError("cannot concatenate rollouts sampled with different settings")
        parts = [rollout._batched() for rollout in rollouts]
        merged = {name: _concat([part[name] for part in parts]) for name in parts[0]}
        grid_checked = all(rollout.grid_checked for rollout in rollouts)
        return dataclasses.replace(first, **merged, grid_checked=grid_checked)

    def _settings(self) -> tuple:
        return (
            self.sde_type,
            self.noise_level,
            self.cfg_scale,
            self.image_size,
            self.num_steps,
            self.num_frames,
        )

    def _batched(self) -> dict[str, Any]:
        names = ("latents", "sigmas", "timesteps", "log_probs", "stochastic", "conditioning", "prompts")
        names += ("group_ids", "members", "seeds", "pixels", "metadata", "alpha_bars")
        return {name: getattr(self, name) for name in names}


def _take(value: Any, index: Tensor) -> Any:
    if value is None:
        return None
    if isinstance(value, Tensor):
        return value[index.to(value.device)]
    if isinstance(value, dict):
        return {key: _take(item, index) for key, item in value.items()}
    if isinstance(value, list):
        return [value[i] for i in index.tolist()] if value else []
    raise TypeError(f"cannot index {type(value).__name__}")


def _concat(values: list[Any]) -> Any:
    if values[0] is None:
        return None
    if isinstance(values[0], Tensor):
        return torch.cat(values)
    if isinstance(values[0], dict):
        return {key: _concat([value[key] for value in values]) for key in values[0]}
    return [item for value in values for item in value]


@dataclass(frozen=True)
class StepLogProbs:
    """Recomputed transitions for chosen steps: ``log_probs`` [B, K], ``means`` [B, K, ...], ``stds`` [B, K]."""

    log_probs: Tensor
    means: Tensor
    stds: Tensor


def scheduler_from_config(scheduler_class: type, config: Any, **overrides: Any):
    """``scheduler_class`` built from another scheduler's config, keeping only the keys it accepts.

    (``from_config`` would warn about every key of a foreign class, e.g. PNDM's ``skip_prk_steps``.)
    """
    accepted = set(inspect.signature(scheduler_class.__init__).parameters) - {"self"}
    kept = {key: value for key, value in dict(config).items() if key in accepted}
    kept.update(overrides)
    return scheduler_class(**kept)


def _with_cached_device(method: Callable[..., Any]) -> Callable[..., Any]:
    """Run a sampler method with ``sampler.device`` looked up once (restored after, also on errors)."""

    @functools.wraps(method)
    def wrapper(self: Sampler, *args: Any, **kwargs: Any) -> Any:
        if self._device is not None:  # nested: the outer call holds the cache
            return method(self, *args, **kwargs)
        self._device = self.pipeline._execution_device
        try:
            return method(self, *args, **kwargs)
        finally:
            self._device = None

    return wrapper


class Sampler(ABC):
    """A stochastic sampler over a diffusers pipeline; subclasses implement the model-specific hooks."""

    family: ClassVar[str]
    pipeline_class: ClassVar[type[DiffusionPipeline]]
    required_components: ClassVar[tuple[str, ...]]
    denoiser_component: ClassVar[str] = "transformer"  # the pipeline attribute holding the denoiser
    lora_target_modules: ClassVar[tuple[str, ...]] = ()  # default peft target_modules for this family
    step_kinds: ClassVar[tuple[str, ...]]  # the sde_type values this family steps with
    # what a rollout records (an algorithm's ``needs`` must be among them): every step's log-prob and Gaussian
    # step mean (recomputed by log_prob), the clean final latents and the whole latent trajectory
    records: ClassVar[frozenset[str]] = frozenset({"log_probs", "step_means", "clean_latents", "trajectory"})
    default_max_sequence_length: ClassVar[int | None] = None
    video: ClassVar[bool] = False  # True for families whose samples have frames
    # metadata keys every prompt must carry (("image",) for image-to-video and editing): encode_conditions reads them
    conditions: ClassVar[tuple[str, ...]] = ()

    def __init__(self, pipeline: DiffusionPipeline) -> None:
        missing = [name for name in self.required_components if getattr(pipeline, name, None) is None]
        if missing:
            raise ValueError(
                f"{self.family} sampler needs a pipeline with components {list(self.required_components)}; "
                f"{type(pipeline).__name__} lacks {missing}. Load a full {self.pipeline_class.__name__} checkpoint."
            )
        self.pipeline = pipeline
        self.scheduler = self.build_scheduler(pipeline.scheduler)
        self.forward_module: torch.nn.Module | None = None
        self._device: torch.device | None = None  # the execution device, cached while a rollout runs

    @classmethod
    def from_pretrained(cls, path_or_id: str, dtype: torch.dtype | None = None, **kwargs: Any):
        """Load the family's diffusers pipeline from a local folder or a hub id and wrap it."""
        try:
            pipeline = cls.pipeline_class.from_pretrained(path_or_id, dtype=dtype, **kwargs)
        except (OSError, ValueError) as error:
            raise FileNotFoundError(
                f"could not load a {cls.pipeline_class.__name__} from {path_or_id!r}: {error}\n"
                "Give a local folder in diffusers format (with model_index.json) or a hub id; offline "
                "(HF_HUB_OFFLINE=1) a hub id works only if it is already in the local cache."
            ) from error
        return cls(pipeline)

    @property
    def denoiser(self) -> torch.nn.Module:
        """The raw denoiser (UNet or transformer): the module a LoRA adapter is attached to."""
        return getattr(self.pipeline, self.denoiser_component)

    @property
    def active_denoiser(self) -> torch.nn.Module:
        """The module actually called: ``forward_module`` (a DDP / autocast wrapper a trainer sets so that
        gradients synchronise) when set, else the raw ``denoiser``."""
        return self.denoiser if self.forward_module is None else self.forward_module

    @property
    def transformer(self) -> torch.nn.Module:
        """Deprecated alias of :attr:`denoiser` (kept while callers move to the family-neutral name)."""
        return self.denoiser

    @property
    def device(self) -> torch.device:
        """The device the pipeline executes on (diffusers' ``_execution_device``, which walks every component:
        looked up once per rollout, not once per use)."""
        return self._device if self._device is not None else self.pipeline._execution_device

    @property
    def dtype(self) -> torch.dtype:
        return self.denoiser.dtype

    # ----- model-specific hooks ------------------------------------------------------------------------------
    @classmethod
    @abstractmethod
    def build_scheduler(cls, shipped: Any) -> Any:
        """This sampler's own scheduler, built from the config of the checkpoint's scheduler ``shipped``
        (whatever its class); a clear ValueError when that config belongs to another kind of model."""

    @abstractmethod
    def encode_prompts(
        self, prompts: list[str], options: RolloutOptions, num_per_prompt: int
    ) -> dict[str, Tensor]:
        """Batch-first conditioning for ``len(prompts) * num_per_prompt`` samples (``negative_*`` keys for CFG)."""

    @abstractmethod
    def initial_latents(
        self, generators: list[torch.Generator], image_size: tuple[int, int], num_frames: int | None = None
    ) -> Tensor:
        """x at the start of the grid in the model's input layout, one generator per sample (the pipeline's
        own draw)."""

    @abstractmethod
    def noise_grid(self, options: RolloutOptions, latents: Tensor) -> NoiseGrid:
        """The schedule of one rollout (model timesteps ``[S]``, noise levels ``[S+1]``)."""

    @abstractmethod
    def model_output(
        self, latents: Tensor, timesteps: Tensor, conditioning: dict[str, Tensor], image_size: tuple[int, int]
    ) -> Tensor:
        """One denoiser call (through ``active_denoiser``) at per-sample ``timesteps`` [B]: the raw
        prediction (velocity, epsilon or v, as the family's step expects)."""

    def decode(self, latents: Tensor, image_size: tuple[int, int]) -> Tensor:
        """Final latents to pixels ``[B, 3, H, W]`` (video ``[B, 3, T, H, W]``) float32 in [0, 1].

        Default: unpacked VAE latents (undo scaling / shift, decode); families that pack latents override it."""
        return self._vae_decode(latents)

    def encode(self, pixels: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Pixels ``[B, 3, H, W]`` in [0, 1] to clean latents in the model's layout (the inverse of ``decode``):
        VAE mean (or a sample with ``generator``), the family's scaling / shift and packing.

        Default: unpacked VAE latents; families that pack latents override it."""
        return self._vae_encode(pixels, generator)

    def encode_conditions(
        self,
        metadata: list[dict[str, Any]],
        options: RolloutOptions,
        num_per_prompt: int,
        image_size: tuple[int, int],
        num_frames: int | None,
    ) -> dict[str, Tensor]:
        """Batch-first conditioning from each prompt's metadata (``len(metadata) * num_per_prompt`` rows): the
        source image of image-to-video or editing, encoded once at sampling and stored in
        ``rollout.conditioning``, so training recomputes each step with exactly the stored source.

        Default: none (text-only families). Families with ``conditions`` override it."""
        return {}

    # step kinds: what one transition is for this family
    @abstractmethod
    def _levels(self, sigmas: Tensor, alpha_bars: Tensor | None) -> Tensor:
        """The ``[..., S+1]`` grid this family's step runs on (flow sigmas or DDIM alpha-bars)."""

    @abstractmethod
    def _check_levels(self, levels: Tensor) -> None:
        """Validate a whole ``_levels`` grid once (one host sync)."""

    @abstractmethod
    def _transition(
        self,
        sde_type: str,
        latents: Tensor,
        model_output: Tensor,
        level: Tensor,
        level_next: Tensor,
        noise_level: float,
        noise: Tensor | None,
        next_sample: Tensor | None,
    ) -> StepOutput:
        """One stochastic step of kind ``sde_type`` between per-sample levels ``[B]`` (grid already checked)."""

    @abstractmethod
    def _deterministic_transition(
        self, latents: Tensor, model_output: Tensor, level: Tensor, level_next: Tensor
    ) -> StepOutput:
        """The family's ODE step (outside ``sde_window``)."""

    def _check_noise_level(self, sde_type: str, noise_level: float) -> None:
        if not noise_level >= 0:
            raise ValueError(f"noise_level must be >= 0; got {noise_level}")

    def default_image_size(self) -> tuple[int, int]:
        """The pipeline's default (height, width) in pixels."""
        size = self.pipeline.default_sample_size * self.pipeline.vae_scale_factor
        return size, size

    # ----- shared VAE helpers --------------------------------------------------------------------------------
    def _vae_encode(self, pixels: Tensor, generator: torch.Generator | None) -> Tensor:
        """``[B, 3, ...]`` pixels in [0, 1] to scaled VAE latents ``(z - shift) * scale`` (the LDM convention)."""
        vae = self.pipeline.vae
        if pixels.shape[1] != 3:
            raise ValueError(f"encode expects pixels [B, 3, H, W] in [0, 1]; got shape {tuple(pixels.shape)}")
        images = self.pipeline.image_processor.normalize(pixels.to(self.device, vae.dtype))
        distribution = vae.encode(images).latent_dist
        latents = distribution.mode() if generator is None else distribution.sample(generator)
        shift = vae.config.get("shift_factor") or 0.0
        return ((latents - shift) * vae.config.scaling_factor).to(self.dtype)

    def _vae_decode(self, latents: Tensor) -> Tensor:
        """Scaled VAE latents to pixels in [0, 1] (undo scaling / shift, decode, post-process)."""
        vae = self.pipeline.vae
        shift = vae.config.get("shift_factor") or 0.0
        latents = latents / vae.config.scaling_factor + shift
        images = vae.decode(latents.to(vae.dtype), return_dict=False)[0]
        return self.pipeline.image_processor.postprocess(images, output_type="pt").float()

    # ----- written once --------------------------------------------------------------------------------------
    def predict(
        self,
        latents: Tensor,
        timesteps: Tensor,
        conditioning: dict[str, Tensor],
        cfg_scale: float,
        image_size: tuple[int, int],
    ) -> Tensor:
        """Model output with true classifier-free guidance ``out_neg + w (out_pos - out_neg)`` when
        ``cfg_scale > 1`` (Ho & Salimans, 2022, eq. 6; both branches in one batched call)."""
        positive = {key: value for key, value in conditioning.items() if not key.startswith(NEGATIVE_PREFIX)}
        if cfg_scale <= 1.0:
            return self.model_output(latents, timesteps, positive, image_size)
        negative = dict(positive)
        negative.update(
            {
                key[len(NEGATIVE_PREFIX) :]: value
                for key, value in conditioning.items()
                if key.startswith(NEGATIVE_PREFIX)
            }
        )
        both = {key: torch.cat([negative[key], positive[key]]) for key in positive}
        output = self.model_output(
            torch.cat([latents, latents]), torch.cat([timesteps, timesteps]), both, image_size
        )
        output_negative, output_positive = output.chunk(2)
        return output_negative + cfg_scale * (output_positive - output_negative)

    @torch.no_grad()
    @_with_cached_device
    def rollout(
        self,
        prompts: Sequence[str],
        options: RolloutOptions,
        *,
        group_size: int = 1,
        epoch: int = 0,
        prompt_keys: Sequence[str] | None = None,
        metadata: Sequence[dict[str, Any]] | None = None,
    ) -> Rollout:
        """Sample ``group_size`` members for each prompt along the SDE and record every transition.

        Noise seeds derive from ``(options.seed, epoch, prompt key, member)``; the prompt key defaults to the
        prompt text. Each sample's SDE noise comes from its own generator on the model's device, so a sample
        does not depend on the batch it is drawn in. Steps inside ``options.sde_window`` follow
        ``options.sde_type``; the others are the family's ODE steps, recorded as deterministic (``stochastic``
        False, ``log_probs`` NaN). The grid is validated once; the loop itself never syncs with the host.
        """
        prompts = list(prompts)
        prompt_keys = list(prompts if prompt_keys is None else prompt_keys)
        self._validate_rollout_request(prompts, options, group_size, prompt_keys, metadata)
        image_size = self._image_size(options)
        num_frames = self._num_frames(options)
        batch = len(prompts) * group_size
        members = [member for _ in prompts for member in range(group_size)]
        keys = [key for key in prompt_keys for _ in range(group_size)]

        def stream_seeds(stream: str, shared_within_group: bool) -> list[int]:
            return [
                derive_seed(options.seed, epoch, key, 0 if shared_within_group else member, stream)
                for key, member in zip(keys, members, strict=True)
            ]

        initial_seeds = stream_seeds("initial", options.share_initial_noise)
        conditioning = self.encode_prompts(prompts, options, group_size)
        if self.conditions:
            conditioning.update(
                self.encode_conditions(list(metadata or []), options, group_size, image_size, num_frames)
            )
        latents = self.initial_latents(make_generators(initial_seeds), image_size, num_frames)
        latent_dtype, device = latents.dtype, latents.device
        sde_generators = make_generators(stream_seeds("sde", shared_within_group=False), device)
        grid = self.noise_grid(options, latents)
        sigmas = grid.sigmas.to(device, torch.float32).expand(batch, -1).clone()
        timesteps = grid.timesteps.to(device, torch.float32).expand(batch, -1).clone()
        alpha_bars = None
        if grid.alpha_bars is not None:
            alpha_bars = grid.alpha_bars.to(device, torch.float32).expand(batch, -1).clone()
        levels = self._levels(sigmas, alpha_bars)
        self._check_levels(levels[:1])
        num_steps = timesteps.shape[1]
        window = self._window(options.sde_window, num_steps)

        trajectory = [latents]
        log_probs = torch.full((batch, num_steps), float("nan"), device=device)
        stds = torch.zeros((batch, num_steps), device=device)
        for index in range(num_steps):
            output = self.predict(latents, timesteps[:, index], conditioning, options.cfg_scale, image_size)
            level, level_next = levels[:, index], levels[:, index + 1]
            if window[0] <= index < window[1]:
                noise = draw_noise(sde_generators, tuple(latents.shape[1:]))
                out = self._transition(
                    options.sde_type, latents, output, level, level_next, options.noise_level, noise, None
                )
                latents = out.next_sample.to(latent_dtype)
                log_probs[:, index] = _log_prob_of_stored(latents, out)
                stds[:, index] = out.std
            else:
                latents = self._deterministic_transition(latents, output, level, level_next).next_sample
                latents = latents.to(latent_dtype)
            trajectory.append(latents)

        pixels = self.decode(latents, image_size) if options.decode else None
        return Rollout(
            latents=torch.stack(trajectory, dim=1),
            sigmas=sigmas,
            timesteps=timesteps,
            log_probs=log_probs,
            stochastic=stds > 0,
            conditioning=conditioning,
            prompts=[prompt for prompt in prompts for _ in range(group_size)],
            group_ids=torch.arange(len(prompts)).repeat_interleave(group_size),
            members=torch.tensor(members),
            seeds=torch.tensor(initial_seeds),
            sde_type=options.sde_type,
            noise_level=options.noise_level,
            cfg_scale=options.cfg_scale,
            image_size=image_size,
            pixels=pixels,
            metadata=[dict(item) for item in metadata for _ in range(group_size)] if metadata else [],
            alpha_bars=alpha_bars,
            num_frames=num_frames,
            grid_checked=True,
        )

    def log_prob(self, rollout: Rollout, step_indices: Sequence[int] | Tensor) -> StepLogProbs:
        """Recompute the transitions at ``step_indices`` (``[K]`` shared or ``[B, K]`` per sample) with grad.

        Each sample may sit at its own step: the model is called once per column k with per-sample levels.
        """
        self._check_step_kind(rollout.sde_type)
        indices = self._step_index_matrix(rollout, step_indices)
        levels = self._levels(rollout.sigmas, rollout.alpha_bars).float()
        if not rollout.grid_checked:
            self._check_levels(levels)
            self._check_noise_level(rollout.sde_type, rollout.noise_level)
        rows = torch.arange(len(rollout), device=indices.device)
        log_probs, means, stds = [], [], []
        for column in indices.unbind(dim=1):
            latents = rollout.latents[rows, column]
            output = self.predict(
                latents,
                rollout.timesteps[rows, column],
                rollout.conditioning,
                rollout.cfg_scale,
                rollout.image_size,
            )
            level_rows, level_columns = rows.to(levels.device), column.to(levels.device)
            out = self._transition(
                rollout.sde_type,
                latents,
                output,
                levels[level_rows, level_columns],
                levels[level_rows, level_columns + 1],
                rollout.noise_level,
                None,
                rollout.latents[rows, column + 1],
            )
            log_probs.append(out.log_prob)
            means.append(out.mean)
            stds.append(out.std)
        return StepLogProbs(torch.stack(log_probs, 1), torch.stack(means, 1), torch.stack(stds, 1))

    @torch.no_grad()
    def recompute_log_probs(
        self, rollout: Rollout, microbatch_size: int | None = None
    ) -> tuple[Tensor, Tensor]:
        """Every stochastic step's log-prob recomputed as training recomputes it, and the step stds.

        Rows are recomputed ``microbatch_size`` at a time (default: all at once), one step per call, so the
        denoiser sees the batch shapes of the training forward (GPU kernels may differ with the batch size).
        Returns ``log_probs`` and ``stds``, both ``[B, S]`` float32, NaN on deterministic steps.
        """
        size = microbatch_size or len(rollout)
        log_probs = torch.full(rollout.log_probs.shape, float("nan"), device=rollout.log_probs.device)
        stds = log_probs.clone()
        for index in range(rollout.num_steps):
            rows = rollout.stochastic[:, index].nonzero().flatten()
            if rows.numel() == 0:
                continue
            for chunk in rows.split(size):
                out = self.log_prob(rollout.select(chunk.cpu()), [index])
                log_probs[chunk, index] = out.log_probs[:, 0].float().to(log_probs.device)
                stds[chunk, index] = out.stds[:, 0].float().to(stds.device)
        return log_probs, stds

    @torch.no_grad()
    def check_log_probs(
        self, rollout: Rollout, atol: float | None = None, microbatch_size: int | None = None
    ) -> float:
        """Ratio-1 check: recomputed log-probs of every stochastic step equal the stored ones.

        Returns the largest absolute difference; raises ``RuntimeError`` naming the step and dtype otherwise.
        ``atol`` defaults to 1e-4 in float32 and 5e-2 in half precision (in units of the per-element mean
        log-density); a trainer derives its tolerance from its clip range instead (``train.ratio_check_fraction``).
        """
        if atol is None:
            atol = 1e-4 if self.dtype == torch.float32 else 5e-2
        recomputed, _ = self.recompute_log_probs(rollout, microbatch_size)
        index, worst = worst_log_prob_mismatch(recomputed, rollout.log_probs, rollout.stochastic)
        worst = float(worst)
        if not worst <= atol:
            raise RuntimeError(
                f"log-prob mismatch at denoising step {index}: recomputed differs from stored by "
                f"{worst:.3g} (> {atol:g}) with model dtype {self.dtype}, so the policy ratio is not 1 "
                "before any update. The model call is not reproducible: check dropout/eval mode, "
                "non-deterministic attention kernels, or conditioning changed since sampling."
            )
        return worst

    # ----- helpers -------------------------------------------------------------------------------------------
    def _image_size(self, options: RolloutOptions) -> tuple[int, int]:
        if options.height and options.width:
            return options.height, options.width
        default_height, default_width = self.default_image_size()
        return (options.height or default_height, options.width or default_width)

    def _num_frames(self, options: RolloutOptions) -> int | None:
        if options.num_frames is not None and not self.video:
            raise ValueError(
                f"num_frames={options.num_frames} was set but the {self.family} family makes images; "
                "set sample.num_frames to null"
            )
        return options.num_frames

    def _max_sequence_length(self, options: RolloutOptions) -> int:
        return options.max_sequence_length or self.default_max_sequence_length

    def _check_step_kind(self, sde_type: str) -> None:
        if sde_type not in self.step_kinds:
            raise ValueError(
                f"unknown sde_type {sde_type!r} for the {self.family} family; it steps with "
                f"{', '.join(self.step_kinds)} (set sample.sde_type to one of them)"
            )

    def _validate_rollout_request(
        self,
        prompts: list[str],
        options: RolloutOptions,
        group_size: int,
        prompt_keys: list[str],
        metadata: Sequence[dict[str, Any]] | None,
    ) -> None:
        if not prompts:
            raise ValueError("rollout needs at least one prompt; got an empty list")
        if group_size < 1:
            raise ValueError(f"group_size must be >= 1 (samples per prompt); got {group_size}")
        if len(prompt_keys) != len(prompts):
            raise ValueError(
                f"got {len(prompt_keys)} prompt_keys for {len(prompts)} prompts; give one per prompt"
            )
        if metadata is not None and len(metadata) != len(prompts):
            raise ValueError(
                f"got {len(metadata)} metadata records for {len(prompts)} prompts; give one per prompt"
            )
        for key in self.conditions:
            missing = [i for i, item in enumerate(metadata or [{}] * len(prompts)) if item.get(key) is None]
            if missing:
                raise ValueError(
                    f"the {self.family} family conditions every sample on metadata {key!r}, but prompt "
                    f"{missing[0]} ({prompts[missing[0]]!r}) has none; give JSONL prompt records with "
                    f'{{"prompt": ..., "{key}": "path/to/source.png"}}'
                )
        if options.num_steps < 1:
            raise ValueError(f"num_steps must be >= 1; got {options.num_steps}")
        self._check_step_kind(options.sde_type)
        self._check_noise_level(options.sde_type, options.noise_level)

    @staticmethod
    def _window(window: tuple[int, int] | None, num_steps: int) -> tuple[int, int]:
        if window is None:
            return 0, num_steps
        start, end = window
        if not 0 <= start < end <= num_steps:
            raise ValueError(
                f"sde_window {tuple(window)} is outside the schedule of {num_steps} steps: need "
                f"0 <= start < end <= {num_steps} (end exclusive)"
            )
        return start, end

    @staticmethod
    def _step_index_matrix(rollout: Rollout, step_indices: Sequence[int] | Tensor) -> Tensor:
        device = rollout.latents.device
        indices = torch.as_tensor(step_indices, dtype=torch.long, device=device)
        if indices.ndim == 1:
            indices = indices.expand(len(rollout), -1)
        if indices.ndim != 2 or indices.shape[0] != len(rollout):
            raise ValueError(
                f"step_indices must be [K] or [B={len(rollout)}, K]; got shape {tuple(indices.shape)}"
            )
        if indices.numel() and (indices.min() < 0 or indices.max() >= rollout.num_steps):
            raise ValueError(f"step_indices must lie in [0, {rollout.num_steps}); got {indices.tolist()}")
        trainable = rollout.stochastic.gather(1, indices.to(rollout.stochastic.device))
        if not bool(trainable.all()):
            bad = (~trainable).nonzero()[0].tolist()
            raise ValueError(
                f"step {int(indices[bad[0], bad[1]])} of sample {bad[0]} was deterministic (ODE or zero std): it "
                "has no log-prob. Train only steps where rollout.stochastic is True."
            )
        return indices


class FlowMatchSampler(Sampler):
    """Rectified-flow families (SD3, FLUX, HunyuanVideo, Wan): flow SDE steps on a sigma grid 1 -> 0."""

    step_kinds = tuple(SDE_STEPS)

    @classmethod
    def build_scheduler(cls, shipped: Any) -> FlowMatchEulerDiscreteScheduler:
        """A ``FlowMatchEulerDiscreteScheduler`` from the shipped config; UniPC's ``flow_shift`` becomes ``shift``.

        Refuses a diffusion (epsilon / v / sample prediction) scheduler: it belongs to another kind of model.
        """
        config = dict(shipped.config)
        prediction = config.get("prediction_type")
        if prediction is not None and prediction != "flow_prediction":
            raise ValueError(
                f"{cls.family} sampler needs a rectified-flow scheduler config (FlowMatchEulerDiscreteScheduler, or "
                f"UniPC with prediction_type 'flow_prediction'); the pipeline's {type(shipped).__name__} predicts "
                f"{prediction!r}. Restore the checkpoint's own scheduler."
            )
        if "flow_shift" in config and "shift" not in config:
            config["shift"] = config["flow_shift"]
        return scheduler_from_config(FlowMatchEulerDiscreteScheduler, config)

    @abstractmethod
    def grid(self, options: RolloutOptions, latents: Tensor) -> tuple[Tensor, Tensor]:
        """The pipeline's sigma grid ``[S+1]`` (ending at 0) and model timesteps ``[S]``, both float32."""

    def noise_grid(self, options: RolloutOptions, latents: Tensor) -> NoiseGrid:
        sigmas, timesteps = self.grid(options, latents)
        return NoiseGrid(timesteps=timesteps, sigmas=sigmas)

    def model_velocity(
        self, latents: Tensor, timesteps: Tensor, conditioning: dict[str, Tensor], image_size: tuple[int, int]
    ) -> Tensor:
        """One denoiser call: velocity v ~ eps - x0 (the flow families' ``model_output``)."""
        return self.model_output(latents, timesteps, conditioning, image_size)

    def predict_velocity(
        self,
        latents: Tensor,
        timesteps: Tensor,
        conditioning: dict[str, Tensor],
        cfg_scale: float,
        image_size: tuple[int, int],
    ) -> Tensor:
        """Velocity with classifier-free guidance ``v_neg + w (v_pos - v_neg)`` when ``cfg_scale > 1``."""
        return self.predict(latents, timesteps, conditioning, cfg_scale, image_size)

    def _levels(self, sigmas: Tensor, alpha_bars: Tensor | None) -> Tensor:
        return sigmas

    def _check_levels(self, levels: Tensor) -> None:
        check_flow_grid(levels)

    def _transition(
        self,
        sde_type: str,
        latents: Tensor,
        model_output: Tensor,
        level: Tensor,
        level_next: Tensor,
        noise_level: float,
        noise: Tensor | None,
        next_sample: Tensor | None,
    ) -> StepOutput:
        step = flow_step_unchecked(sde_type)
        return step(latents, model_output, level, level_next, noise_level, noise, next_sample)

    def _deterministic_transition(
        self, latents: Tensor, model_output: Tensor, level: Tensor, level_next: Tensor
    ) -> StepOutput:
        return flow_euler_unchecked(latents, model_output, level, level_next)


class DDIMSampler(Sampler):
    """Epsilon- or v-prediction diffusion families (SD 1.5 / 2.x): the DDIM step with ``eta`` (DDPO).

    The sampler's own ``DDIMScheduler`` is built from the shipped config (SD 1.5 ships PNDM). ``x0`` is never
    clipped (``clip_sample`` / ``thresholding`` off): latents of latent diffusion are not in [-1, 1].
    """

    step_kinds = ("ddim",)

    @classmethod
    def build_scheduler(cls, shipped: Any) -> DDIMScheduler:
        config = dict(shipped.config)
        prediction = config.get("prediction_type", "epsilon")
        if type(shipped).__name__.startswith("FlowMatch") or prediction not in DDIM_PREDICTION_TYPES:
            raise ValueError(
                f"{cls.family} sampler needs a diffusion scheduler config predicting epsilon or v_prediction "
                f"(DDIM, PNDM, Euler, ...); the pipeline has {type(shipped).__name__} with prediction_type "
                f"{prediction!r}. Restore the checkpoint's own scheduler."
            )
        return scheduler_from_config(DDIMScheduler, config, clip_sample=False, thresholding=False)

    @property
    def prediction_type(self) -> str:
        """What the denoiser predicts: ``epsilon`` or ``v_prediction`` (from the scheduler config)."""
        return self.scheduler.config.prediction_type

    def noise_grid(self, options: RolloutOptions, latents: Tensor) -> NoiseGrid:
        """DDIM's timesteps (the config's spacing and offset) and alpha-bars ``[S+1]``: ``alpha_bar(t_i)``, then
        the alpha-bar DDIM steps to after the last timestep (``final_alpha_cumprod`` below t = 0).

        Step i goes from ``t_i`` to ``t_i - T / S`` as diffusers' ``DDIMScheduler.step`` does; with ``leading`` or
        ``trailing`` spacing that is ``t_{i+1}``, the next grid point.
        """
        if options.shift is not None:
            raise ValueError(
                f"sample.shift applies to rectified-flow schedules; the {self.family} family has none"
            )
        scheduler = self.scheduler
        scheduler.set_timesteps(options.num_steps)
        timesteps = scheduler.timesteps.to(torch.long)
        step = scheduler.config.num_train_timesteps // scheduler.num_inference_steps
        alphas_cumprod = scheduler.alphas_cumprod.to(torch.float32)
        last = int(timesteps[-1]) - step
        final = alphas_cumprod[last] if last >= 0 else torch.as_tensor(scheduler.final_alpha_cumprod)
        alpha_bars = torch.cat([alphas_cumprod[timesteps], final.reshape(1).to(torch.float32)])
        return NoiseGrid(
            timesteps=timesteps.to(self.device, torch.float32),
            sigmas=(1.0 - alpha_bars).sqrt().to(self.device),
            alpha_bars=alpha_bars.to(self.device),
        )

    def _levels(self, sigmas: Tensor, alpha_bars: Tensor | None) -> Tensor:
        if alpha_bars is None:
            raise ValueError("a DDIM rollout needs its alpha_bars grid [B, S+1]; this record has none")
        return alpha_bars

    def _check_levels(self, levels: Tensor) -> None:
        check_ddim_grid(levels)

    def _check_noise_level(self, sde_type: str, noise_level: float) -> None:
        if not 0.0 <= noise_level <= 1.0:
            raise ValueError(f"noise_level is DDIM's eta and must lie in [0, 1]; got {noise_level}")

    def _transition(
        self,
        sde_type: str,
        latents: Tensor,
        model_output: Tensor,
        level: Tensor,
        level_next: Tensor,
        noise_level: float,
        noise: Tensor | None,
        next_sample: Tensor | None,
    ) -> StepOutput:
        return ddim_step_unchecked(
            latents, model_output, level, level_next, noise_level, self.prediction_type, noise, next_sample
        )

    def _deterministic_transition(
        self, latents: Tensor, model_output: Tensor, level: Tensor, level_next: Tensor
    ) -> StepOutput:
        return ddim_step_unchecked(
            latents, model_output, level, level_next, 0.0, self.prediction_type, None, None
        )


def worst_log_prob_mismatch(recomputed: Tensor, stored: Tensor, stochastic: Tensor) -> tuple[int, Tensor]:
    """The step index and value of the largest ``|recomputed - stored|`` log-prob over stochastic steps.

    ``recomputed`` / ``stored`` ``[B, S]`` (NaN on deterministic steps, which are ignored), ``stochastic``
    ``[B, S]`` bool. A NaN at a stochastic step propagates, so it can never pass a tolerance.
    """
    difference = (recomputed.float() - stored.float().to(recomputed.device)).abs()
    difference = torch.where(stochastic.to(difference.device), difference, torch.zeros_like(difference))
    per_step = difference.amax(dim=0)
    index = int(per_step.argmax())
    return index, per_step[index]


def _log_prob_of_stored(stored_next: Tensor, out: StepOutput) -> Tensor:
    """Log-prob of the next latent exactly as stored (after the cast to the model dtype)."""
    if stored_next.dtype == torch.float32:
        return out.log_prob
    return gaussian_log_prob(stored_next.float(), out.mean, out.std)
