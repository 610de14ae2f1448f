"""The generation trainer's config: one dataclass per YAML section, every field documented with its unit.

``python gen_rl/train.py --describe`` prints this reference. Log-probs are means over latent elements
(``pipelines/sde.py``), the reduction of the Flow-GRPO and DanceGRPO reference code, so their clip ranges apply
to the flow SDE steps as published. Their other conventions are explicit settings (``gen_rl/objective.py``):
``train.kl_estimator: flow_grpo`` for Flow-GRPO's KL coefficient (the exact transition KL is ``1/|ds|`` times
larger), ``train.log_prob_convention: flow_grpo_cps`` for Flow-GRPO's CPS clip range, ``reward.std_ddof`` /
``reward.std_eps`` for DanceGRPO's advantage std; ``tests/test_recipes.py`` checks each recipe against them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

from gen_rl.algorithms.options import AlgorithmOptions, PolicyGradientOptions
from gen_rl.core.config import ConfigError, check_finite, option, section
from pipelines.families import FAMILIES

# old key -> new key (a config with an old key fails with one line naming the new one)
RENAMED_KEYS = {
    "train.clip_range": "algorithm.clip_low",
    "train.clip_range_high": "algorithm.clip_high",
    "train.kl_coef": "algorithm.kl_coef",
    "train.kl_estimator": "algorithm.kl_estimator",
    "train.log_prob_convention": "algorithm.log_prob_convention",
    "train.step_selection": "algorithm.step_selection",
    "train.step_fraction": "algorithm.step_fraction",
    "train.window_size": "algorithm.window_size",
    "train.window_range": "algorithm.window_range",
    "train.window_stride": "algorithm.window_stride",
    "train.window_every": "algorithm.window_every",
    "train.trainable_steps": "algorithm.trainable_steps",
    "train.advantage_clip": "reward.advantage_clip",
}


@dataclass
class ModelConfig:
    """The generator to train."""

    family: str = option("flux", "sampler family: flux | sd3 | package.module:Class")
    pretrained: str = option(
        "tiny:flux",
        "local diffusers folder, hub id, or tiny:flux / tiny:flux-pixel / tiny:sd3 (built in code)",
    )
    dtype: Literal["float32", "bfloat16", "float16"] = option("float32", "dtype of the frozen weights")
    lora: bool = option(True, "train a LoRA adapter (False: full fine-tuning of the transformer)")
    lora_rank: int = option(16, "LoRA rank r")
    lora_alpha: float = option(16.0, "LoRA alpha (scale = alpha / r)")
    lora_target_modules: list[str] = option([], "module names for LoRA; empty: the family's default list")
    gradient_checkpointing: bool = option(False, "recompute activations in backward (saves memory)")
    vae_tiling: bool = option(False, "VAE decode / encode in tiles (large images, videos: saves memory)")
    vae_slicing: bool = option(False, "VAE decode / encode one sample at a time (saves memory)")
    trained_experts: list[str] = option(
        [], "two-expert models (Wan 2.2 A14B): the experts that train, high and / or low; empty: all"
    )


@dataclass
class SampleConfig:
    """How rollouts are drawn (the SDE of pipelines/sde.py)."""

    num_steps: int = option(16, "denoising steps S per rollout")
    height: int | None = option(None, "image height in pixels; null: the model's default")
    width: int | None = option(None, "image width in pixels; null: the model's default")
    cfg_scale: float = option(1.0, "true classifier-free guidance scale; <= 1 disables it")
    negative_prompt: str = option("", "negative prompt used when cfg_scale > 1")
    guidance: float | None = option(None, "FLUX.1-dev embedded guidance; null: the family default (3.5)")
    shift: float | None = option(None, "static schedule shift; null: the scheduler's own")
    sde_type: Literal["flow_grpo", "dance_grpo", "cps", "ddim"] = option(
        "flow_grpo", "stochastic step family: flow_grpo | dance_grpo | cps (rectified flow) | ddim (SD)"
    )
    noise_level: float = option(0.7, "a of Flow-GRPO / CPS, or eta of DanceGRPO (dimensionless)")
    share_initial_noise: bool = option(False, "members of a group start from the same initial noise")
    group_size: int = option(8, "samples per prompt (G of GRPO)")
    groups_per_step: int = option(8, "distinct prompts per training step, summed over all processes")
    groups_per_rollout: int = option(2, "prompts per rollout call on one process (memory knob)")
    max_sequence_length: int | None = option(None, "T5 tokens; null: the family default")
    num_frames: int | None = option(None, "video families: frames per sample; null: the family default")


@dataclass
class TrainConfig:
    """The policy-gradient update."""

    num_steps: int = option(100, "training steps (each: sample, score, update)")
    seed: int = option(0, "run seed: prompts, noise, step choice and minibatch order derive from it")
    lr: float = option(1e-4, "AdamW learning rate")
    lr_schedule: Literal["constant", "linear", "cosine"] = option(
        "constant", "decay after warmup, per update"
    )
    warmup_updates: int = option(0, "optimizer updates of linear warmup")
    weight_decay: float = option(1e-4, "AdamW weight decay")
    adam_betas: tuple[float, float] = option((0.9, 0.999), "AdamW betas")
    adam_eps: float = option(1e-8, "AdamW epsilon")
    max_grad_norm: float = option(1.0, "gradient-norm clip per update; <= 0 disables")
    mixed_precision: Literal["no", "bf16", "fp16"] = option(
        "no", "autocast precision for the trained forward"
    )
    inner_epochs: int = option(1, "passes over each step's samples")
    samples_per_update: int = option(16, "samples per optimizer update on one process")
    microbatch_size: int = option(4, "samples per forward/backward (gradient accumulation fills the update)")
    ema: bool = option(False, "keep an EMA of the trained weights (used for eval and the exported LoRA)")
    ema_decay: float = option(0.9, "EMA decay per optimizer update")
    check_log_probs: bool = option(True, "verify ratio == 1 on the first rollout (fails loudly otherwise)")
    ratio_check_fraction: float = option(
        0.1, "the ratio check fails when max |log-prob mismatch| > this x min(algorithm.clip_low, clip_high)"
    )
    optimizer: Literal["adamw", "sgd"] = option("adamw", "AdamW, or plain SGD (no momentum)")
    cpu_threads: int = option(0, "torch intra-op threads when running on CPU; 0 keeps torch's default")


@dataclass
class RewardTerm:
    """One reward model and its weight."""

    name: str = option("colour", "registered reward name or package.module:Class")
    weight: float = option(1.0, "weight in the combination")
    kwargs: dict[str, Any] = option({}, "keyword arguments for the reward's constructor")


@dataclass
class RewardConfig:
    """What is optimised, and how rewards become advantages."""

    terms: list[RewardTerm] = field(
        default_factory=lambda: [RewardTerm()],
        metadata={"doc": "rewards with weights: [{name, weight, kwargs}]"},
    )
    combine: Literal["sum_then_normalize", "normalize_then_sum"] = option(
        "sum_then_normalize", "weighted sum then group-normalise, or normalise each then sum"
    )
    std_mode: Literal["group", "global", "none"] = option("group", "advantage std: group, batch, or none")
    std_ddof: int = option(0, "advantage std: 0 population (GRPO, Flow-GRPO), 1 sample std (DanceGRPO)")
    std_eps: float = option(1e-4, "added to the advantage std (Flow-GRPO 1e-4, DanceGRPO 1e-8)")
    advantage_clip: float | None = option(5.0, "clamp advantages to [-c, c]; null: no clamp")
    per_prompt_tracker: bool = option(False, "DDPO per-prompt history statistics instead of groups")
    tracker_buffer: int = option(32, "per-prompt history length (tracker)")
    tracker_min_count: int = option(16, "history length before a prompt uses its own statistics (tracker)")
    nan_policy: Literal["drop", "abort"] = option("drop", "a NaN / inf reward: drop the sample, or stop")


@dataclass
class DataConfig:
    """Prompt sets."""

    train_prompts: str = option("", "text file (one prompt per line) or JSONL with a 'prompt' key")
    eval_prompts: str = option("", "held-out prompts (same formats); empty: no evaluation")
    bad_records: Literal["abort", "skip"] = option(
        "abort",
        "a bad JSONL record in a prompt file: stop at start-up listing every one, or skip it (warned)",
    )


@dataclass
class EvalConfig:
    """Held-out evaluation with fixed seeds."""

    every_steps: int = option(10, "evaluate every N training steps (and before the first, and at the end)")
    samples_per_prompt: int = option(2, "images per eval prompt")
    noise_level: float = option(0.0, "SDE noise at eval; 0: the deterministic ODE sampler")
    seed: int = option(1234, "seed of the eval noise (fixed across the run)")
    max_prompts: int = option(16, "evaluate at most this many eval prompts")
    gold: list[RewardTerm] = field(
        default_factory=list,
        metadata={
            "doc": "rewards scored at eval only, never optimised: [{name, kwargs}] (reward-hacking check)"
        },
    )


@dataclass
class LogConfig:
    """Where results go."""

    output_dir: str = option("outputs/run", "run folder: metrics.jsonl, eval grids, checkpoints, curves")
    tracker: Literal["none", "tensorboard", "wandb"] = option("tensorboard", "accelerate tracker")
    run_name: str = option("gen-rl", "tracker run name")
    progress: bool = option(True, "tqdm progress bar on the main process")
    monitors: bool = option(True, "log image statistics and in-group diversity every step and at eval")
    diversity_model: str = option(
        "", "DINOv2 path / hub id for diversity features; empty: downsampled pixels"
    )


@dataclass
class CheckpointConfig:
    """Checkpoints and resume."""

    every_steps: int = option(10, "save every N training steps (and at the end); 0: only at the end")
    keep_last: int = option(2, "checkpoints kept (older ones are deleted after a save succeeds)")


@dataclass
class GenerationConfig:
    """A generation GRPO run: ``gen_rl/train.py --config`` reads one of these from YAML."""

    task: str = option("generation", "generation (this trainer) or vlm (gen_rl/vlm)")
    renamed_keys: ClassVar[dict[str, str]] = RENAMED_KEYS

    model: ModelConfig = section(ModelConfig)
    sample: SampleConfig = section(SampleConfig)
    algorithm: AlgorithmOptions = section(PolicyGradientOptions)
    train: TrainConfig = section(TrainConfig)
    reward: RewardConfig = section(RewardConfig)
    data: DataConfig = section(DataConfig)
    eval: EvalConfig = section(EvalConfig)
    log: LogConfig = section(LogConfig)
    checkpoint: CheckpointConfig = section(CheckpointConfig)

    def validate(self, num_processes: int = 1) -> None:
        """Check the invariants between fields; each error states the invariant and a fix."""
        if self.task != "generation":
            raise ConfigError(f"task is {self.task!r}; this config class runs task: generation")
        _check_combinations(self)
        _check_values(self)
        sample, train = self.sample, self.train
        _positive(
            {
                "sample.num_steps": sample.num_steps,
                "sample.group_size": sample.group_size,
                "sample.groups_per_step": sample.groups_per_step,
                "sample.groups_per_rollout": sample.groups_per_rollout,
                "train.num_steps": train.num_steps,
                "train.inner_epochs": train.inner_epochs,
                "train.samples_per_update": train.samples_per_update,
                "train.microbatch_size": train.microbatch_size,
                "model.lora_rank": self.model.lora_rank,
                "checkpoint.keep_last": self.checkpoint.keep_last,
            }
        )
        if sample.groups_per_step % num_processes:
            raise ConfigError(
                f"sample.groups_per_step ({sample.groups_per_step}) must be divisible by the number of processes "
                f"({num_processes}) so that every process samples whole groups; set it to a multiple of "
                f"{num_processes}."
            )
        groups_per_process = sample.groups_per_step // num_processes
        if groups_per_process % sample.groups_per_rollout:
            raise ConfigError(
                f"groups per process ({groups_per_process} = groups_per_step / processes) must be divisible by "
                f"sample.groups_per_rollout ({sample.groups_per_rollout}); pick a divisor of {groups_per_process}."
            )
        samples_per_process = groups_per_process * sample.group_size
        if samples_per_process % train.samples_per_update:
            raise ConfigError(
                f"samples per process per step ({samples_per_process} = groups_per_step * group_size / processes) "
                f"must be divisible by train.samples_per_update ({train.samples_per_update}); the batch of "
                f"{samples_per_process} samples would not split into whole updates."
            )
        if train.samples_per_update % train.microbatch_size:
            raise ConfigError(
                f"train.samples_per_update ({train.samples_per_update}) must be divisible by "
                f"train.microbatch_size ({train.microbatch_size}) (gradient accumulation takes whole microbatches)."
            )
        self.algorithm.validate(self)
        family = FAMILIES.get(self.model.family)
        if family is not None and sample.sde_type not in family.step_kinds:
            raise ConfigError(
                f"sample.sde_type {sample.sde_type!r} is not a step of the {self.model.family} family; it steps with "
                f"{', '.join(family.step_kinds)}: set sample.sde_type to one of them"
            )
        if not self.reward.terms:
            raise ConfigError(
                "reward.terms is empty; add at least one reward, e.g. [{name: colour, weight: 1}]"
            )
        for term in self.reward.terms:
            if (
                term.name == "remote"
                and term.kwargs.get("on_failure") == "drop"
                and self.reward.nan_policy == "abort"
            ):
                raise ConfigError(
                    "a remote reward with on_failure: drop returns NaN for the samples it could not score, and "
                    "reward.nan_policy: abort would stop the run on them; set reward.nan_policy: drop, or "
                    "on_failure: abort"
                )
        if not self.data.train_prompts:
            raise ConfigError("data.train_prompts is empty; give a .txt (one prompt per line) or .jsonl file")
        if self.eval.every_steps < 0 or self.checkpoint.every_steps < 0:
            raise ConfigError("eval.every_steps and checkpoint.every_steps must be >= 0")


def _positive(values: dict[str, int]) -> None:
    for name, value in values.items():
        if value < 1:
            raise ConfigError(f"{name} must be >= 1, got {value}")


def _check_values(config: GenerationConfig) -> None:
    """Single-field value checks: finite numbers, learning rate and betas in range, groups that can train."""
    check_finite(config)
    train, sample, reward = config.train, config.sample, config.reward
    if train.lr <= 0:
        raise ConfigError(
            f"train.lr must be > 0 (the AdamW learning rate), got {train.lr}; e.g. train.lr=1e-5"
        )
    if sample.group_size < 2 and not reward.per_prompt_tracker:
        raise ConfigError(
            f"sample.group_size is {sample.group_size}: each sample's advantage is its reward minus its group's "
            "mean, so groups of one give 0 everywhere and nothing trains; use >= 2 (Flow-GRPO: 24, DanceGRPO: 12) "
            "or reward.per_prompt_tracker: true"
        )
    _at_least(
        {
            "train.weight_decay": (train.weight_decay, 0.0),
            "train.warmup_updates": (train.warmup_updates, 0),
            "sample.noise_level": (sample.noise_level, 0.0),
            "eval.noise_level": (config.eval.noise_level, 0.0),
            "eval.samples_per_prompt": (config.eval.samples_per_prompt, 1),
            "eval.max_prompts": (config.eval.max_prompts, 1),
            "reward.tracker_buffer": (reward.tracker_buffer, 1),
            "reward.tracker_min_count": (reward.tracker_min_count, 1),
        }
    )
    _open_unit_interval(
        {"train.adam_betas[0]": train.adam_betas[0], "train.adam_betas[1]": train.adam_betas[1]}
    )
    _open_unit_interval({"train.ema_decay": train.ema_decay} if train.ema else {})
    for key, value in {
        "train.adam_eps": train.adam_eps,
        "model.lora_alpha": config.model.lora_alpha,
        "reward.advantage_clip": reward.advantage_clip,
        "sample.height": sample.height,
        "sample.width": sample.width,
        "sample.shift": sample.shift,
    }.items():
        if value is not None and value <= 0:
            raise ConfigError(f"{key} must be > 0, got {value}")
    if reward.per_prompt_tracker and reward.tracker_min_count > reward.tracker_buffer:
        raise ConfigError(
            f"reward.tracker_min_count ({reward.tracker_min_count}) exceeds reward.tracker_buffer "
            f"({reward.tracker_buffer}), so no prompt ever uses its own statistics; lower the count"
        )
    if reward.terms and all(term.weight == 0 for term in reward.terms):
        raise ConfigError("every reward.terms weight is 0, so every reward is 0; give one a non-zero weight")
    if not config.log.output_dir:
        raise ConfigError("log.output_dir is empty; give the run folder, e.g. outputs/my_run")


def _at_least(values: dict[str, tuple[float, float]]) -> None:
    for name, (value, low) in values.items():
        if value < low:
            raise ConfigError(f"{name} must be >= {low}, got {value}")


def _open_unit_interval(values: dict[str, float]) -> None:
    for name, value in values.items():
        if not 0.0 <= value < 1.0:
            raise ConfigError(f"{name} must be in [0, 1), got {value}")


def _check_combinations(config: GenerationConfig) -> None:
    """Settings that cannot work together, refused before any model loads (each message names the fix)."""
    train, reward = config.train, config.reward
    if reward.std_ddof not in (0, 1):
        raise ConfigError(
            f"reward.std_ddof must be 0 (population std) or 1 (sample std), got {reward.std_ddof}"
        )
    if reward.std_eps < 0:
        raise ConfigError(f"reward.std_eps must be >= 0, got {reward.std_eps}")
    if reward.per_prompt_tracker and (reward.std_mode != "group" or reward.combine != "sum_then_normalize"):
        raise ConfigError(
            "reward.per_prompt_tracker normalises the weighted reward sum by each prompt's history, so "
            "reward.std_mode and reward.combine would be ignored; leave them at group / sum_then_normalize, or "
            "turn the tracker off (Flow-GRPO's per-prompt mean with a batch std is std_mode: global)"
        )
    if not 0 < train.ratio_check_fraction <= 1:
        raise ConfigError(
            f"train.ratio_check_fraction must be in (0, 1] (a share of the clip range), got "
            f"{train.ratio_check_fraction}"
        )
