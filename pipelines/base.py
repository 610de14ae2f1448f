"""The sampler protocol, the rollout record, and the rollout / log-prob loops written once.

A family adapter (``sd3.py``, ``flux.py``, ...) implements five hooks over a diffusers pipeline: prompt
encoding, initial latents, the sigma grid, one model call, and decoding. ``FlowMatchSampler`` builds on them,
once for every rectified-flow family:

- ``rollout``: sample groups of images with an SDE (or the ODE) and store every latent and per-step
  log-probability (the Gaussian policy of each denoising step, Flow-GRPO eq. 9 / DanceGRPO eq. 6);
- ``log_prob``: recompute those log-probs for chosen steps from the ``Rollout`` record alone, with gradients,
  as the policy-gradient loss needs; ``check_log_probs`` is the "ratio == 1 before the first update" check.
"""

from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from diffusers import DiffusionPipeline, FlowMatchEulerDiscreteScheduler
from torch import Tensor

from gen_rl.core.seeding import derive_seed, draw_noise, make_generators
from pipelines.sde import StepOutput, flow_sde_step, gaussian_log_prob, get_flow_step

NEGATIVE_PREFIX = "negative_"


@dataclass
class RolloutOptions:
    """How to sample. Every field can be set from the ``sample`` section of a config."""

    num_steps: int = 10  # denoising steps S
    height: int | None = None  # pixels; None: the pipeline's default size
    width: int | None = None  # pixels; None: the pipeline's default size
    cfg_scale: float = 1.0  # true classifier-free guidance with the negative prompt; <= 1 disables it
    negative_prompt: str = ""  # the unconditional prompt used when cfg_scale > 1
    guidance: float | None = None  # embedded (distilled) guidance of FLUX.1-dev; None: the family default
    shift: float | None = None  # static schedule shift; None: the scheduler's own (dynamic for FLUX)
    sde_type: str = "flow_grpo"  # flow_grpo | dance_grpo | cps: the stochastic step family
    noise_level: float = 0.7  # a of Flow-GRPO / CPS, or eta of DanceGRPO; 0 gives the ODE
    sde_window: tuple[int, int] | None = None  # [start, end) steps that are stochastic; None: all steps
    share_initial_noise: bool = False  # members of a group start from the same initial noise
    seed: int = 0  # run seed; noise derives from (seed, epoch, prompt key, member)
    max_sequence_length: int | None = None  # T5 tokens; None: the family default (FLUX 512, SD3 256)
    decode: bool = True  # decode the final latents to pixels in [0, 1]


@dataclass
class Rollout:
    """Everything needed to recompute each step's log-probability; batch-first tensors, S denoising steps."""

    latents: Tensor  # [B, S+1, *latent_shape] in the model dtype, x at every grid point
    sigmas: Tensor  # [B, S+1] float32, the noise level grid actually used (1 -> 0)
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
    pixels: Tensor | None = None  # [B, C, H, W] float32 in [0, 1]
    metadata: list[dict[str, Any]] = field(default_factory=list)

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
        """Concatenate rollouts along the batch (same steps, SDE and image size)."""
        first = rollouts[0]
        for other in rollouts[1:]:
            if (other.sde_type, other.noise_level, other.cfg_scale, other.image_size, other.num_steps) != (
                first.sde_type,
                first.noise_level,
                first.cfg_scale,
                first.image_size,
                first.num_steps,
            ):
                raise ValueError("cannot concatenate rollouts sampled with different settings")
        parts = [rollout._batched() for rollout in rollouts]
        merged = {name: _concat([part[name] for part in parts]) for name in parts[0]}
        return dataclasses.replace(first, **merged)

    def _batched(self) -> dict[str, Any]:
        names = ("latents", "sigmas", "timesteps", "log_probs", "stochastic", "conditioning", "prompts")
        names += ("group_ids", "members", "seeds", "pixels", "metadata")
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


class FlowMatchSampler(ABC):
    """A rectified-flow sampler over a diffusers pipeline; subclasses implement the model-specific hooks."""

    family: ClassVar[str]
    pipeline_class: ClassVar[type[DiffusionPipeline]]
    required_components: ClassVar[tuple[str, ...]]
    default_max_sequence_length: ClassVar[int]

    def __init__(self, pipeline: DiffusionPipeline) -> None:
        missing = [name for name in self.required_components if getattr(pipeline, name, None) is None]
        if missing:
            raise ValueError(
                f"{self.family} sampler needs a pipeline with components {list(self.required_components)}; "
                f"{type(pipeline).__name__} lacks {missing}. Load a full {self.pipeline_class.__name__} checkpoint."
            )
        if not isinstance(pipeline.scheduler, FlowMatchEulerDiscreteScheduler):
            raise ValueError(
                f"{self.family} sampler needs a FlowMatchEulerDiscreteScheduler (rectified flow); the pipeline has "
                f"{type(pipeline.scheduler).__name__}. Restore the checkpoint's own scheduler."
            )
        self.pipeline = pipeline
        self.forward_module: torch.nn.Module | None = None

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
    def transformer(self) -> torch.nn.Module:
        """The denoiser: the module a LoRA adapter is attached to."""
        return self.pipeline.transformer

    @property
    def denoiser(self) -> torch.nn.Module:
        """The module that runs the denoiser's forward: a DDP / autocast wrapper set in ``forward_module`` by a
        trainer (so gradients synchronise), else the transformer itself."""
        return self.transformer if self.forward_module is None else self.forward_module

    @property
    def device(self) -> torch.device:
        return self.pipeline._execution_device

    @property
    def dtype(self) -> torch.dtype:
        return self.transformer.dtype

    # ----- model-specific hooks ------------------------------------------------------------------------------
    @abstractmethod
    def encode_prompts(
        self, prompts: list[str], options: RolloutOptions, num_per_prompt: int
    ) -> dict[str, Tensor]:
        """Batch-first conditioning for ``len(prompts) * num_per_prompt`` samples (``negative_*`` keys for CFG)."""

    @abstractmethod
    def initial_latents(self, generators: list[torch.Generator], image_size: tuple[int, int]) -> Tensor:
        """x at s = 1 in the model's input layout, one generator per sample (the pipeline's own draw)."""

    @abstractmethod
    def grid(self, options: RolloutOptions, latents: Tensor) -> tuple[Tensor, Tensor]:
        """The pipeline's sigma grid ``[S+1]`` (ending at 0) and model timesteps ``[S]``, both float32."""

    @abstractmethod
    def model_velocity(
        self, latents: Tensor, timesteps: Tensor, conditioning: dict[str, Tensor], image_size: tuple[int, int]
    ) -> Tensor:
        """One denoiser call: velocity v ~ eps - x0 for ``latents`` at per-sample ``timesteps`` [B]."""

    @abstractmethod
    def decode(self, latents: Tensor, image_size: tuple[int, int]) -> Tensor:
        """Final latents to pixels ``[B, 3, H, W]`` float32 in [0, 1]."""

    def default_image_size(self) -> tuple[int, int]:
        """The pipeline's default (height, width) in pixels."""
        size = self.pipeline.default_sample_size * self.pipeline.vae_scale_factor
        return size, size

    # ----- written once --------------------------------------------------------------------------------------
    def predict_velocity(
        self,
        latents: Tensor,
        timesteps: Tensor,
        conditioning: dict[str, Tensor],
        cfg_scale: float,
        image_size: tuple[int, int],
    ) -> Tensor:
        """Velocity with classifier-free guidance ``v_neg + w (v_pos - v_neg)`` when ``cfg_scale > 1``."""
        positive = {key: value for key, value in conditioning.items() if not key.startswith(NEGATIVE_PREFIX)}
        if cfg_scale <= 1.0:
            return self.model_velocity(latents, timesteps, positive, image_size)
        negative = dict(positive)
        negative.update(
            {
                key[len(NEGATIVE_PREFIX) :]: value
                for key, value in conditioning.items()
                if key.startswith(NEGATIVE_PREFIX)
            }
        )
        both = {key: torch.cat([negative[key], positive[key]]) for key in positive}
        velocity = self.model_velocity(
            torch.cat([latents, latents]), torch.cat([timesteps, timesteps]), both, image_size
        )
        velocity_negative, velocity_positive = velocity.chunk(2)
        return velocity_negative + cfg_scale * (velocity_positive - velocity_negative)

    @torch.no_grad()
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
        prompt text. Steps inside ``options.sde_window`` follow ``options.sde_type``; the others are Euler ODE
        steps, recorded as deterministic (``stochastic`` False, ``log_probs`` NaN).
        """
        prompts = list(prompts)
        prompt_keys = list(prompts if prompt_keys is None else prompt_keys)
        self._validate_rollout_request(prompts, options, group_size, prompt_keys, metadata)
        step = get_flow_step(options.sde_type)
        image_size = self._image_size(options)
        batch = len(prompts) * group_size
        members = [member for _ in prompts for member in range(group_size)]
        keys = [key for key in prompt_keys for _ in range(group_size)]

        def stream_seeds(stream: str, shared_within_group: bool) -> list[int]:
            return [
                derive_seed(options.seed, epoch, key, 0 if shared_within_group else member, stream)
                for key, member in zip(keys, members, strict=True)
            ]

        initial_seeds = stream_seeds("initial", options.share_initial_noise)
        sde_generators = make_generators(stream_seeds("sde", shared_within_group=False))

        conditioning = self.encode_prompts(prompts, options, group_size)
        latents = self.initial_latents(make_generators(initial_seeds), image_size)
        sigma_grid, timestep_grid = self.grid(options, latents)
        latent_dtype, device = latents.dtype, latents.device
        num_steps = timestep_grid.shape[0]
        window = self._window(options.sde_window, num_steps)

        trajectory = [latents]
        log_probs = torch.full((batch, num_steps), float("nan"), device=device)
        stochastic = torch.zeros((batch, num_steps), dtype=torch.bool, device=device)
        for index in range(num_steps):
            timesteps = timestep_grid[index].expand(batch)
            velocity = self.predict_velocity(latents, timesteps, conditioning, options.cfg_scale, image_size)
            sigma, sigma_next = sigma_grid[index], sigma_grid[index + 1]
            if window[0] <= index < window[1]:
                noise = draw_noise(sde_generators, tuple(latents.shape[1:]), device)
                out = step(latents, velocity, sigma, sigma_next, options.noise_level, noise=noise)
            else:
                out = flow_sde_step(latents, velocity, sigma, sigma_next, 0.0)
            latents = out.next_sample.to(latent_dtype)
            is_random = out.std > 0
            if bool(is_random.any()):
                log_probs[:, index] = _log_prob_of_stored(latents, out)
                stochastic[:, index] = is_random
            trajectory.append(latents)

        pixels = self.decode(latents, image_size) if options.decode else None
        return Rollout(
            latents=torch.stack(trajectory, dim=1),
            sigmas=sigma_grid.expand(batch, -1).clone(),
            timesteps=timestep_grid.expand(batch, -1).clone(),
            log_probs=log_probs,
            stochastic=stochastic,
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
        )

    def log_prob(self, rollout: Rollout, step_indices: Sequence[int] | Tensor) -> StepLogProbs:
        """Recompute the transitions at ``step_indices`` (``[K]`` shared or ``[B, K]`` per sample) with grad.

        Each sample may sit at its own step: the model is called once per column k with per-sample sigmas.
        """
        indices = self._step_index_matrix(rollout, step_indices)
        step = get_flow_step(rollout.sde_type)
        rows = torch.arange(len(rollout), device=indices.device)
        log_probs, means, stds = [], [], []
        for column in indices.unbind(dim=1):
            latents = rollout.latents[rows, column]
            velocity = self.predict_velocity(
                latents,
                rollout.timesteps[rows, column],
                rollout.conditioning,
                rollout.cfg_scale,
                rollout.image_size,
            )
            out = step(
                latents,
                velocity,
                rollout.sigmas[rows, column],
                rollout.sigmas[rows, column + 1],
                rollout.noise_level,
                next_sample=rollout.latents[rows, column + 1],
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
        default_height, default_width = self.default_image_size()
        return (options.height or default_height, options.width or default_width)

    def _max_sequence_length(self, options: RolloutOptions) -> int:
        return options.max_sequence_length or self.default_max_sequence_length

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
        if options.num_steps < 1:
            raise ValueError(f"num_steps must be >= 1; got {options.num_steps}")
        if options.noise_level < 0:
            raise ValueError(f"noise_level must be >= 0; got {options.noise_level}")

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
