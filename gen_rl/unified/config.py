"""Config of ``task: unified``: a unified multimodal model (Janus) trains its image-token generation with the
shared token-level policy-gradient core, rewarded by its own understanding (SRUM's self-rewarding).

Keys follow the shared vocabulary of the generation and VLM trainers (``train.num_steps``, ``algorithm.*``,
``reward.terms``, ``sample.group_size`` / ``groups_per_step``, ``eval.gold``, ``checkpoint.*``). Torch-free.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

from gen_rl.core.config import ConfigError, option, section

BUILTIN_MODELS = ("builtin:tiny-janus",)
SELF_JUDGED = ("srum", "vlm_judge")  # reward names the policy's own understanding can compute
SELF_JUDGE_KWARGS = ("judge", "question", "objects_key")
LOSS_NAMES = ("grpo", "dr_grpo", "dapo", "gspo", "gspo_token", "cispo", "sapo")  # gen_rl.vlm.objectives


@dataclass
class RewardTerm:
    """One reward and its weight."""

    name: str = option(
        "srum", "reward name (srum | vlm_judge for the self-reward; any registered reward in eval.gold)"
    )
    weight: float = option(1.0, "weight in the combination")
    kwargs: dict[str, Any] = option({}, "keyword arguments (self-reward: judge: self, question, objects_key)")


@dataclass
class ModelSection:
    """The unified model (understanding + image-token generation)."""

    name_or_path: str = option(
        "builtin:tiny-janus",
        "hub id or folder of a JanusForConditionalGeneration + JanusProcessor (e.g. deepseek-community/"
        "Janus-Pro-7B); 'builtin:tiny-janus' builds a ~0.8M-parameter test model in code",
    )
    dtype: str = option("float32", "float32 | bfloat16 | float16 weights")
    trainable: str = option("generation", "generation (image-token modules; the judge stays fixed) | all")
    guidance_scale: float = option(1.0, "classifier-free guidance scale of image-token sampling (Janus: 5)")
    temperature: float = option(1.0, "sampling temperature of image tokens")


@dataclass
class DataSection:
    """Training prompts: inline and/or a JSONL file of records {"prompt": ..., "objects": [...], ...}."""

    prompts: list[str] = option([], "inline training prompts")
    prompt_file: str = option("", "JSONL of training records (prompt + metadata such as SRUM's objects)")
    shuffle: bool = option(True, "shuffle the prompt order each epoch (seeded)")


@dataclass
class SampleSection:
    """Rollouts per step."""

    group_size: int = option(8, "images sampled per prompt (a GRPO group)")
    groups_per_step: int = option(2, "prompts (groups) per training step")


@dataclass
class AlgorithmSection:
    """The token-level objective (gen_rl.vlm.objectives.policy_loss)."""

    name: str = option("grpo", f"objective: {' | '.join(LOSS_NAMES)}")
    clip_low: float = option(0.2, "lower clip epsilon of the ratio")
    clip_high: float | None = option(None, "upper clip epsilon (null = clip_low)")
    kl_coef: float = option(0.0, "KL coefficient to the initial model (a frozen copy; 0 = none)")
    kl_estimator: str = option("k3", "KL estimator: k1 | k2 | k3")


@dataclass
class TrainSection:
    """Optimisation."""

    num_steps: int = option(20, "training steps (rollout batches)")
    lr: float = option(1e-4, "Adam learning rate")
    inner_epochs: int = option(1, "passes over each step's batch")
    samples_per_update: int = option(0, "samples per optimizer update (0 = the whole step's batch)")
    microbatch_size: int = option(0, "samples per forward/backward (0 = the whole update)")
    max_grad_norm: float = option(0.0, "gradient clipping norm (0 = none)")
    adam_betas: list[float] = option([0.9, 0.999], "Adam betas")
    weight_decay: float = option(0.0, "AdamW weight decay")
    cpu: bool = option(False, "run on CPU even where a GPU exists")
    cpu_threads: int = option(0, "torch intra-op threads on CPU; 0 keeps torch's default")


@dataclass
class RewardSection:
    """The self-reward: srum / vlm_judge terms judged by the policy itself (kwargs.judge: self)."""

    terms: list[RewardTerm] = field(
        default_factory=lambda: [RewardTerm(name="srum", kwargs={"judge": "self"})],
        metadata={
            "doc": "[{name, weight, kwargs}]: srum (global x local object questions) or vlm_judge (global "
            "question), each with kwargs {judge: self, question: '... {prompt} ...', objects_key}"
        },
    )
    std_mode: str = option("group", "advantage std: group | global | none")
    std_eps: float = option(1e-4, "added to the advantage std")
    advantage_clip: float | None = option(None, "clamp advantages to [-c, c] (null = none)")


@dataclass
class EvalSection:
    """Held-out evaluation: own reward and gold rewards on fixed-seed samples, plus an image grid."""

    every_steps: int = option(5, "evaluate every N steps (0 = only at the end)")
    prompts: list[str] = option([], "held-out prompts (empty = the training prompts)")
    prompt_file: str = option("", "JSONL of held-out records")
    samples_per_prompt: int = option(4, "images per held-out prompt")
    gold: list[RewardTerm] = field(
        default_factory=list,
        metadata={
            "doc": "held-out rewards not optimised, reported as eval/gold/<name> (e.g. [{name: colour}])"
        },
    )


@dataclass
class LogSection:
    """Outputs."""

    output_dir: str = option("outputs/unified", "run folder: metrics.jsonl, eval grids, checkpoints")
    progress: bool = option(True, "show a progress bar")
    tracker: str = option("none", "none (metrics.jsonl only)")
    run_name: str = option("unified", "tracker run name")


@dataclass
class CheckpointSection:
    """Resumable checkpoints."""

    every_steps: int = option(0, "checkpoint every N steps (0 = only the last)")
    keep_last: int = option(2, "checkpoints kept")


@dataclass
class UnifiedConfig:
    """Self-rewarded image-token RL of a unified multimodal model (SRUM's unified path)."""

    renamed_keys: ClassVar[dict[str, str]] = {
        "train.steps": "train.num_steps",
        "train.beta": "algorithm.kl_coef",
        "train.loss": "algorithm.name",
        "reward.functions": "reward.terms",
        "sample.prompts_per_step": "sample.groups_per_step",
        "log.checkpoint_every": "checkpoint.every_steps",
    }
    task: str = option("unified", "trainer family; must be 'unified' for this config")
    seed: int = option(0, "run seed (prompt order, sampling)")
    model: ModelSection = section(ModelSection)
    data: DataSection = section(DataSection)
    sample: SampleSection = section(SampleSection)
    algorithm: AlgorithmSection = section(AlgorithmSection)
    train: TrainSection = section(TrainSection)
    reward: RewardSection = section(RewardSection)
    eval: EvalSection = section(EvalSection)
    log: LogSection = section(LogSection)
    checkpoint: CheckpointSection = section(CheckpointSection)

    @property
    def batch_size(self) -> int:
        """Images per training step."""
        return self.sample.groups_per_step * self.sample.group_size

    @property
    def samples_per_update(self) -> int:
        """Images per optimizer update (``train.samples_per_update``, 0 = the whole step)."""
        return self.train.samples_per_update or self.batch_size

    def validate(self) -> None:
        """Invariants between keys; each error is one line naming the key and the fix (no model loads)."""
        if self.task != "unified":
            raise ConfigError(f"task must be 'unified' for this config, got {self.task!r}")
        self._validate_model()
        self._validate_batches()
        if self.algorithm.name not in LOSS_NAMES:
            raise ConfigError(
                f"algorithm.name {self.algorithm.name!r} is unknown; valid: {', '.join(LOSS_NAMES)}"
            )
        if self.reward.std_mode not in ("group", "global", "none"):
            raise ConfigError(f"reward.std_mode must be group | global | none, got {self.reward.std_mode!r}")
        self._validate_terms()
        if not (self.data.prompts or self.data.prompt_file):
            raise ConfigError(
                "data: no training prompts; set data.prompts (a list) or data.prompt_file (JSONL)"
            )

    def _validate_model(self) -> None:
        model = self.model
        if model.name_or_path.startswith("builtin:") and model.name_or_path not in BUILTIN_MODELS:
            raise ConfigError(
                f"model.name_or_path {model.name_or_path!r} is not a builtin model; known: {', '.join(BUILTIN_MODELS)}"
            )
        if model.trainable not in ("generation", "all"):
            raise ConfigError(f"model.trainable must be 'generation' or 'all', got {model.trainable!r}")
        if model.dtype not in ("float32", "bfloat16", "float16"):
            raise ConfigError(f"model.dtype must be float32 | bfloat16 | float16, got {model.dtype!r}")
        if not (model.temperature > 0 and model.guidance_scale >= 1):
            raise ConfigError("model.temperature must be > 0 and model.guidance_scale >= 1 (1 = no guidance)")

    def _validate_batches(self) -> None:
        sample, train = self.sample, self.train
        if min(sample.group_size, sample.groups_per_step, train.num_steps) < 1 or sample.group_size < 2:
            raise ConfigError(
                "sample.group_size must be >= 2, sample.groups_per_step and train.num_steps >= 1"
            )
        update = self.samples_per_update
        if self.batch_size % update:
            raise ConfigError(
                f"train.samples_per_update={update} must divide the step's {self.batch_size} images "
                "(sample.groups_per_step x sample.group_size); pick a divisor or 0"
            )
        if train.microbatch_size and update % train.microbatch_size:
            raise ConfigError(
                f"train.microbatch_size={train.microbatch_size} must divide train.samples_per_update={update}; "
                "pick a divisor or 0"
            )
        if min(train.inner_epochs, self.eval.samples_per_prompt) < 1:
            raise ConfigError("train.inner_epochs and eval.samples_per_prompt must be >= 1")

    def _validate_terms(self) -> None:
        if not self.reward.terms:
            raise ConfigError("reward.terms is empty; add {name: srum, kwargs: {judge: self}}")
        for index, term in enumerate(self.reward.terms):
            key = f"reward.terms[{index}]"
            if term.name not in SELF_JUDGED:
                raise ConfigError(
                    f"{key}: {term.name!r} is not a self-reward; the unified trainer optimises "
                    f"{' or '.join(SELF_JUDGED)} judged by the policy (put fixed rewards under eval.gold)"
                )
            if term.kwargs.get("judge") != "self":
                raise ConfigError(
                    f"{key} ({term.name}) has no judge: set {key}.kwargs.judge: self (the policy's own "
                    "understanding judges its images)"
                )
            unknown = sorted(set(term.kwargs) - set(SELF_JUDGE_KWARGS))
            if unknown:
                raise ConfigError(
                    f"{key}.kwargs: unknown {', '.join(unknown)}; a self-judged term takes "
                    f"{', '.join(SELF_JUDGE_KWARGS)}"
                )

    def self_terms(self) -> list[dict[str, Any]]:
        """The self-reward terms as plain dicts (name, weight, question, objects_key)."""
        return [
            {
                "name": term.name,
                "weight": term.weight,
                **{k: v for k, v in term.kwargs.items() if k != "judge"},
            }
            for term in self.reward.terms
        ]
