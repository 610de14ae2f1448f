"""Typed config of the vision-language GRPO trainer (``task: vlm``), one dataclass per YAML section.

``VLMConfig`` is loaded by ``gen_rl.core.config.load_config`` (YAML + dotted overrides) and checked by
``VLMConfig.validate``; ``gen_rl/train.py --describe`` prints every key with its default and unit.

The settings shared with the generation trainer carry its names (``train.num_steps``, ``train.inner_epochs``,
``train.samples_per_update`` per process, ``train.microbatch_size``, ``train.warmup_updates``, the ``algorithm``
section, ``reward.terms`` / ``std_mode`` / ``std_eps`` / ``advantage_clip``, ``sample.groups_per_step``,
``log.progress``, ``checkpoint.every_steps``); a YAML or override with an old key fails with one line naming the
new one (:data:`RENAMED_KEYS`). The objective's options, DAPO's dynamic sampling included, are in ``algorithm``;
how rewards become advantages (estimator, std, clamp) is in ``reward``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from gen_rl.core.config import ConfigError, check_finite, option, section

__all__ = [
    "LOSS_NAMES",
    "RENAMED_KEYS",
    "AlgorithmSection",
    "CheckpointSection",
    "REFERENCE_MODES",
    "AcceleratorSection",
    "DataSection",
    "EvalSection",
    "LogSection",
    "LoraSection",
    "ModelSection",
    "RewardSection",
    "RewardSpec",
    "SampleSection",
    "StageSection",
    "TrainSection",
    "VideoSection",
    "VLMConfig",
]

LOSS_NAMES = ("grpo", "dr_grpo", "dapo", "gspo", "gspo_token", "cispo", "sapo")
LOSS_AGGREGATIONS = ("token_mean", "seq_mean_token_mean", "seq_mean_token_sum", "constant")
ADVANTAGE_ESTIMATORS = ("grpo", "rloo", "reinforce_pp", "reinforce_pp_baseline")
REFERENCE_MODES = ("auto", "disable_adapter", "frozen_copy")
SYNTHETIC_NAMES = ("colour", "video_colour")
DTYPES = ("float32", "bfloat16", "float16")  # gen_rl.core.dtypes.DTYPES's names, without importing torch here

# old key -> new key: the names shared with the generation trainer (VOCABULARY); an old key fails with one line
RENAMED_KEYS = {
    "train.steps": "train.num_steps",
    "train.num_iterations": "train.inner_epochs",
    "train.mini_batch_size": "train.samples_per_update",
    "train.micro_batch_size": "train.microbatch_size",
    "train.warmup_steps": "train.warmup_updates",
    "train.loss": "algorithm.name",
    "train.clip_low": "algorithm.clip_low",
    "train.clip_high": "algorithm.clip_high",
    "train.beta": "algorithm.kl_coef",
    "train.kl_estimator": "algorithm.kl_estimator",
    "train.loss_aggregation": "algorithm.loss_aggregation",
    "train.dual_clip": "algorithm.dual_clip",
    "train.sapo_tau_pos": "algorithm.sapo_tau_pos",
    "train.sapo_tau_neg": "algorithm.sapo_tau_neg",
    "train.top_entropy_fraction": "algorithm.top_entropy_fraction",
    "train.drop_zero_std_groups": "algorithm.drop_zero_std_groups",
    "train.dynamic_sampling_rounds": "algorithm.dynamic_sampling_rounds",
    "train.std_mode": "reward.std_mode",
    "train.advantage_estimator": "reward.advantage_estimator",
    "reward.functions": "reward.terms",
    "reward.advantage_eps": "reward.std_eps",
    "sample.prompts_per_step": "sample.groups_per_step",
    "log.progress_bar": "log.progress",
    "log.checkpoint_every": "checkpoint.every_steps",
}


@dataclass
class LoraSection:
    """LoRA adapters on the language model (peft); disabled means full fine-tuning."""

    enabled: bool = option(False, "train LoRA adapters instead of every language-model weight")
    r: int = option(64, "LoRA rank")
    alpha: int = option(128, "LoRA alpha (the update is scaled by alpha / r)")
    dropout: float = option(
        0.0, "dropout on the LoRA input (probability); >0 makes the first ratio differ from 1"
    )
    target_modules: list[str] = option(
        ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        "names of the linear layers that get adapters (matched inside the language model only)",
    )


@dataclass
class ModelSection:
    """The policy: a transformers image-text-to-text model loaded through the Auto classes."""

    name_or_path: str = option(
        "Qwen/Qwen2.5-VL-3B-Instruct",
        "hub id or folder (AutoModelForImageTextToText + AutoProcessor); 'builtin:tiny-qwen2-vl', "
        "'builtin:tiny-qwen2.5-vl' or 'builtin:tiny-llava' builds a tiny test model into the output folder and "
        "loads it from there",
    )
    dtype: str = option("bfloat16", "weight dtype: float32 | bfloat16 | float16")
    attn_implementation: str = option("sdpa", "attention kernel: sdpa | eager | flash_attention_2")
    min_pixels: int = option(0, "image processor min_pixels (Qwen: pixels per image); 0 keeps the model's")
    max_pixels: int = option(0, "image processor max_pixels (Qwen: pixels per image); 0 keeps the model's")
    freeze_vision_tower: bool = option(
        True,
        "keep the vision encoder and its merger/projector frozen (with LoRA every base weight is frozen)",
    )
    gradient_checkpointing: bool = option(False, "recompute activations in the backward pass (less memory)")
    reference: str = option(
        "auto",
        "KL reference: disable_adapter (LoRA off) | frozen_copy (a frozen copy of the initial weights) | "
        "auto (disable_adapter with LoRA, frozen_copy otherwise); only built when algorithm.kl_coef > 0",
    )
    lora: LoraSection = section(LoraSection)


@dataclass
class StageSection:
    """One curriculum stage: which records to draw prompts from, and for how many steps."""

    name: str = option("main", "stage name (logged)")
    files: list[str] = option([], "JSONL files of records (image, problem, solution, task, metadata)")
    tasks: list[str] = option([], "keep only records whose task is listed; empty keeps all")
    steps: int = option(
        0, "training steps (rollout batches) in this stage; 0 = until train.num_steps (last stage)"
    )
    synthetic: str = option(
        "", "build this synthetic task in code instead of reading files: 'colour' | 'video_colour'"
    )
    synthetic_records: int = option(64, "records of the synthetic task (written under log.output_dir/data)")


@dataclass
class VideoSection:
    """Frames drawn from each record's video (a folder of frames, or a file with the video extra)."""

    num_frames: int = option(0, "frames sampled evenly over the clip; 0 = sample by fps")
    fps: float = option(2.0, "frames per second of video time when num_frames is 0 (Qwen2-VL: 2)")
    max_frames: int = option(32, "cap on the sampled frames (evenly thinned); 0 = no cap")
    frames_fps: float = option(1.0, "frame rate of frame folders whose record sets no video_fps")
    min_pixels: int = option(0, "pixels per frame at least (Qwen video processor size); 0 keeps the model's")
    max_pixels: int = option(0, "pixels per frame at most (Qwen video processor size); 0 keeps the model's")


@dataclass
class DataSection:
    """Prompts: JSONL records plus an image root, in curriculum stages (RewardMap: perception first)."""

    image_root: str = option("", "folder that relative image paths in the records are resolved against")
    stages: list[StageSection] = option([], "curriculum stages, run in order")
    system_prompt: str = option("", "system message of every prompt; empty sends none")
    question_template: str = option(
        "{problem}", "user text of every prompt; '{problem}' is replaced by the record's problem"
    )
    max_prompt_length: int = option(
        0, "prompt token budget; longer problems are cut (image tokens never are); 0 = no limit"
    )
    shuffle: bool = option(True, "draw records in a seeded shuffled order (else file order)")
    video: VideoSection = section(VideoSection)
    bad_records: str = option(
        "abort", "a bad JSONL record or missing image: abort at start-up listing every one, or skip (warned)"
    )


@dataclass
class SampleSection:
    """Rollouts: ``generate`` with plain temperature sampling (no top-k / top-p, so log-probs are exact)."""

    groups_per_step: int = option(8, "prompts (groups) per rollout batch, over all processes")
    group_size: int = option(8, "completions per prompt (G)")
    max_new_tokens: int = option(256, "completion token budget")
    temperature: float = option(1.0, "sampling temperature; log-probs are recomputed at the same one")
    generation_batch_size: int = option(0, "completions per generate call on a process; 0 = all at once")
    mask_truncated: bool = option(
        True, "completions that hit max_new_tokens without EOS contribute no loss (DAPO overlong filtering)"
    )


@dataclass
class TrainSection:
    """The optimizer and the update loop: steps, passes over each batch, update and forward sizes."""

    num_steps: int = option(
        100, "training steps (rollout batches), each followed by inner_epochs passes of optimizer updates"
    )
    lr: float = option(1e-6, "AdamW learning rate")
    weight_decay: float = option(0.0, "AdamW weight decay")
    adam_betas: list[float] = option([0.9, 0.99], "AdamW betas")
    warmup_updates: int = option(0, "linear learning-rate warm-up (optimizer updates)")
    max_grad_norm: float = option(1.0, "gradient-norm clip; 0 disables")
    inner_epochs: int = option(1, "passes over each rollout batch (GRPO's mu)")
    samples_per_update: int = option(
        0, "completions per optimizer update on one process; 0 = the process's whole share of the batch"
    )
    microbatch_size: int = option(
        0, "completions per forward/backward on a process; 0 = samples_per_update (no accumulation)"
    )


@dataclass
class AlgorithmSection:
    """The objective (gen_rl/vlm/objectives.py) and its options: clipping, KL, aggregation, token and group
    selection (DAPO dynamic sampling, the 80/20 high-entropy rule)."""

    name: str = option("grpo", "objective: grpo | dr_grpo | dapo | gspo | gspo_token | cispo | sapo")
    clip_low: float = option(0.2, "ratio lower bound is 1 - clip_low (GSPO: ~3e-4)")
    clip_high: float | None = option(
        None, "ratio upper bound is 1 + clip_high; null = clip_low (DAPO clip-higher: 0.28)"
    )
    kl_coef: float = option(
        0.0, "KL(policy || reference) coefficient (beta; per token); 0 builds no reference"
    )
    kl_estimator: str = option("k3", "KL estimator: k1 | k2 | k3")
    loss_aggregation: str | None = option(
        None,
        "per-token losses to one number: token_mean (DAPO) | seq_mean_token_mean (GRPO) | seq_mean_token_sum "
        "| constant (Dr.GRPO: sum / (completions x max_new_tokens)); null = the objective's default",
    )
    dual_clip: float = option(
        0.0, "dual-clip c > 1 (Ye et al. 2020; 3 there): loss of A < 0 tokens capped at -c*A; 0 disables"
    )
    sapo_tau_pos: float = option(1.0, "SAPO gate temperature for positive advantages (paper: 1.0)")
    sapo_tau_neg: float = option(1.05, "SAPO gate temperature for negative advantages (paper: 1.05)")
    top_entropy_fraction: float = option(
        1.0,
        "policy gradient only on this top fraction of loss tokens by the sampling policy's entropy, over "
        "the whole batch (Wang et al. 2025, 80/20 rule: 0.2); 1 trains every token",
    )
    drop_zero_std_groups: bool = option(False, "leave groups whose rewards are all equal out of the loss")
    dynamic_sampling_rounds: int = option(
        1, "rollout rounds to fill the batch with non-zero-std groups (DAPO dynamic sampling); 1 = no refill"
    )

    @property
    def clip_high_or_low(self) -> float:
        """The upper clip epsilon (``clip_low`` when ``clip_high`` is null)."""
        return self.clip_low if self.clip_high is None else self.clip_high


@dataclass
class RewardSpec:
    """One verifiable reward and its weight."""

    name: str = option(
        "exact", "rewards.verifiable name (exact, format, iou, math, ...) or 'module:function'"
    )
    weight: float = option(1.0, "weight in the combined reward")
    tasks: list[str] = option([], "score only records of these tasks (others get 0); empty = all")


@dataclass
class RewardSection:
    """Rewards and how they combine into one group-relative advantage."""

    terms: list[RewardSpec] = option([], "the rewards (at least one): [{name, weight, tasks}]")
    combine: str = option("sum_then_normalize", "sum_then_normalize | normalize_then_sum")
    advantage_estimator: str = option(
        "grpo",
        "grpo (group mean, std per std_mode) | rloo (leave-one-out mean) | reinforce_pp (batch mean and std) | "
        "reinforce_pp_baseline (group mean, then batch std); non-grpo ones need combine: sum_then_normalize",
    )
    std_mode: str | None = option(
        None, "advantage std: group | global | none; null = the objective's default (dr_grpo: none)"
    )
    std_eps: float = option(1e-4, "added to the advantage std")
    advantage_clip: float | None = option(None, "clamp advantages to [-clip, clip]; null = no clamp")
    nan_policy: str = option(
        "drop",
        "a reward returning NaN / inf or raising: drop the sample (reported, masked out, counted in "
        "reward/dropped_samples) or abort the run; never scored 0",
    )


@dataclass
class LogSection:
    """Outputs: metrics, sample completions, the tracker, the progress bar."""

    output_dir: str = option(
        "outputs/vlm", "run folder: metrics.jsonl, completions.jsonl, checkpoints, final/"
    )
    log_completions: int = option(4, "completions written to completions.jsonl per step")
    progress: bool = option(True, "tqdm progress bar on the main process")
    tracker: str = option(
        "none", "accelerate tracker for metrics and eval completions: none | tensorboard | wandb"
    )
    run_name: str = option("gen-rl-vlm", "tracker run / project name")


@dataclass
class CheckpointSection:
    """Resumable checkpoints (the final adapter / model is always written to final/)."""

    every_steps: int = option(0, "save a resumable checkpoint every N steps; 0 = only final/ at the end")
    keep_last: int = option(2, "checkpoints kept (older ones are deleted after a save succeeds)")


@dataclass
class EvalSection:
    """Held-out evaluation during training: greedy and sampled completions scored by every reward."""

    every_steps: int = option(0, "evaluate after every N training steps and after the last; 0 = never")
    data: list[str] = option([], "JSONL files of held-out records (resolved against data.image_root)")
    synthetic: str = option("", "held-out synthetic task instead of files: 'colour' | 'video_colour'")
    synthetic_records: int = option(16, "records of the synthetic held-out task (its own seed)")
    max_records: int = option(0, "evaluate only the first N records; 0 = all")
    greedy: bool = option(True, "score one greedy completion per record (eval/<reward>/greedy)")
    num_samples: int = option(
        4, "k sampled completions per record (eval/<reward>/mean@k, pass@k, pass@1); 0 = none"
    )
    temperature: float = option(0.0, "sampling temperature at eval; 0 = sample.temperature")
    pass_threshold: float = option(1.0, "a completion passes a reward when it scores >= this")
    batch_size: int = option(0, "completions per generate call; 0 = all records of a process at once")
    tracker_completions: int = option(8, "eval completions sent to the tracker as text per evaluation")


@dataclass
class AcceleratorSection:
    """accelerate.Accelerator settings."""

    mixed_precision: str = option("no", "no | bf16 | fp16")
    cpu: bool = option(False, "run on CPU even where a GPU exists")
    cpu_threads: int = option(0, "torch intra-op threads when running on CPU; 0 keeps torch's default")


@dataclass
class VLMConfig:
    """GRPO-family training of a vision-language model on verifiable rewards."""

    renamed_keys: ClassVar[dict[str, str]] = RENAMED_KEYS
    task: str = option("vlm", "trainer family; must be 'vlm' for this config")
    seed: int = option(0, "run seed (data order, sampling)")
    model: ModelSection = section(ModelSection)
    data: DataSection = section(DataSection)
    sample: SampleSection = section(SampleSection)
    algorithm: AlgorithmSection = section(AlgorithmSection)
    train: TrainSection = section(TrainSection)
    reward: RewardSection = section(RewardSection)
    log: LogSection = section(LogSection)
    checkpoint: CheckpointSection = section(CheckpointSection)
    eval: EvalSection = section(EvalSection)
    accelerator: AcceleratorSection = section(AcceleratorSection)

    @property
    def batch_size(self) -> int:
        """Completions per rollout batch, over all processes."""
        return self.sample.groups_per_step * self.sample.group_size

    def samples_per_update(self, num_processes: int) -> int:
        """Completions per optimizer update on one process (``train.samples_per_update``, 0 = its whole share)."""
        return self.train.samples_per_update or self.batch_size // num_processes

    def validate(self) -> None:
        """Check the invariants between keys; each error names the key and the fix."""
        self._validate_names()
        self._validate_values()
        self._validate_batches()
        self._validate_stages()
        self._validate_rewards()
        self._validate_objective()
        self._validate_video_and_eval()

    def _validate_video_and_eval(self) -> None:
        video, evaluation = self.data.video, self.eval
        if min(video.num_frames, video.max_frames, video.min_pixels, video.max_pixels) < 0:
            raise ConfigError("data.video.num_frames, max_frames, min_pixels and max_pixels must be >= 0")
        if video.min_pixels and video.max_pixels and video.min_pixels > video.max_pixels:
            raise ConfigError(
                f"data.video.min_pixels={video.min_pixels} exceeds data.video.max_pixels={video.max_pixels}"
            )
        if video.num_frames == 0 and not video.fps > 0:
            raise ConfigError(
                "data.video: set num_frames > 0 (frames per clip) or fps > 0 (frames per second)"
            )
        if not video.frames_fps > 0:
            raise ConfigError(
                f"data.video.frames_fps must be > 0 (frames per second), got {video.frames_fps}"
            )
        if self.log.tracker not in ("none", "tensorboard", "wandb"):
            raise ConfigError(
                f"log.tracker must be one of 'none', 'tensorboard', 'wandb', got {self.log.tracker!r}"
            )
        if evaluation.every_steps < 0 or evaluation.num_samples < 0 or evaluation.max_records < 0:
            raise ConfigError("eval.every_steps, eval.num_samples and eval.max_records must be >= 0")
        if not evaluation.every_steps:
            return
        if not evaluation.data and not evaluation.synthetic:
            raise ConfigError(
                "eval.every_steps > 0 needs held-out records: set eval.data (JSONL files) or eval.synthetic"
            )
        if evaluation.synthetic and evaluation.synthetic not in SYNTHETIC_NAMES:
            raise ConfigError(
                f"eval.synthetic must be one of {', '.join(SYNTHETIC_NAMES)}, got {evaluation.synthetic!r}"
            )
        if not evaluation.greedy and evaluation.num_samples == 0:
            raise ConfigError("eval: greedy is false and num_samples is 0, so nothing would be evaluated")
        if evaluation.temperature < 0:
            raise ConfigError(
                f"eval.temperature must be >= 0 (0 = sample.temperature), got {evaluation.temperature}"
            )

    def _validate_values(self) -> None:
        """Single-key value checks: finite numbers, a positive learning rate, counts and fractions in range."""
        check_finite(self)
        train, model, data = self.train, self.model, self.data
        if train.lr <= 0:
            raise ConfigError(
                f"train.lr must be > 0 (the AdamW learning rate), got {train.lr}; e.g. train.lr=1e-6"
            )
        if len(train.adam_betas) != 2 or not all(0 <= beta < 1 for beta in train.adam_betas):
            raise ConfigError(f"train.adam_betas must be two numbers in [0, 1), got {train.adam_betas}")
        if data.bad_records not in ("abort", "skip"):
            raise ConfigError(f"data.bad_records must be 'abort' or 'skip', got {data.bad_records!r}")
        if not 0 <= model.lora.dropout < 1:
            raise ConfigError(f"model.lora.dropout must be in [0, 1), got {model.lora.dropout}")
        if model.lora.enabled and not (model.lora.r >= 1 and model.lora.alpha > 0):
            raise ConfigError(
                f"model.lora.r must be >= 1 and alpha > 0, got r={model.lora.r}, alpha={model.lora.alpha}"
            )
        if model.min_pixels and model.max_pixels and model.min_pixels > model.max_pixels:
            raise ConfigError(
                f"model.min_pixels ({model.min_pixels}) exceeds model.max_pixels ({model.max_pixels}); swap them"
            )
        non_negative = {
            "train.weight_decay": train.weight_decay,
            "train.warmup_updates": train.warmup_updates,
            "train.samples_per_update": train.samples_per_update,
            "train.microbatch_size": train.microbatch_size,
            "sample.generation_batch_size": self.sample.generation_batch_size,
            "model.min_pixels": model.min_pixels,
            "model.max_pixels": model.max_pixels,
            "data.max_prompt_length": data.max_prompt_length,
            "reward.std_eps": self.reward.std_eps,
            "log.log_completions": self.log.log_completions,
            "checkpoint.every_steps": self.checkpoint.every_steps,
        }
        for key, value in non_negative.items():
            if value < 0:
                raise ConfigError(f"{key} must be >= 0, got {value}")
        clip = self.reward.advantage_clip
        if clip is not None and not clip > 0:
            raise ConfigError(
                f"reward.advantage_clip must be > 0 (advantages clamped to [-clip, clip]) or null (no clamp), "
                f"got {clip}"
            )
        if self.checkpoint.keep_last < 1:
            raise ConfigError(f"checkpoint.keep_last must be >= 1, got {self.checkpoint.keep_last}")
        if not self.log.output_dir:
            raise ConfigError("log.output_dir is empty; give the run folder, e.g. outputs/my_vlm_run")

    def _validate_names(self) -> None:
        if self.task != "vlm":
            raise ConfigError(f"task must be 'vlm' for VLMConfig, got {self.task!r}; set task: vlm")
        algorithm, reward = self.algorithm, self.reward
        choices = {
            "algorithm.name": (algorithm.name, LOSS_NAMES),
            "algorithm.loss_aggregation": (algorithm.loss_aggregation, (None, *LOSS_AGGREGATIONS)),
            "algorithm.kl_estimator": (algorithm.kl_estimator, ("k1", "k2", "k3")),
            "reward.std_mode": (reward.std_mode, (None, "group", "global", "none")),
            "reward.advantage_estimator": (reward.advantage_estimator, ADVANTAGE_ESTIMATORS),
            "reward.combine": (reward.combine, ("sum_then_normalize", "normalize_then_sum")),
            "reward.nan_policy": (reward.nan_policy, ("drop", "abort")),
            "model.dtype": (self.model.dtype, DTYPES),
            "model.reference": (self.model.reference, REFERENCE_MODES),
            "accelerator.mixed_precision": (self.accelerator.mixed_precision, ("no", "bf16", "fp16")),
        }
        for key, (value, allowed) in choices.items():
            if value not in allowed:
                names = ", ".join("null" if choice is None else repr(choice) for choice in allowed)
                raise ConfigError(f"{key} must be one of {names}, got {value!r}")
        if self.model.reference == "disable_adapter" and not self.model.lora.enabled:
            raise ConfigError(
                "model.reference=disable_adapter needs model.lora.enabled=true; use frozen_copy or auto for "
                "full fine-tuning"
            )

    def _validate_batches(self) -> None:
        sample, train, algorithm = self.sample, self.train, self.algorithm
        if sample.group_size < 2:
            raise ConfigError(
                f"sample.group_size must be >= 2 (advantages are relative within a group), got "
                f"{sample.group_size}"
            )
        positive = {
            "sample.groups_per_step": sample.groups_per_step,
            "sample.max_new_tokens": sample.max_new_tokens,
            "train.num_steps": train.num_steps,
            "train.inner_epochs": train.inner_epochs,
            "algorithm.dynamic_sampling_rounds": algorithm.dynamic_sampling_rounds,
        }
        for key, value in positive.items():
            if value < 1:
                raise ConfigError(f"{key} must be >= 1, got {value}")
        if not sample.temperature > 0:
            raise ConfigError(f"sample.temperature must be > 0 (sampling), got {sample.temperature}")
        if train.samples_per_update and self.batch_size % train.samples_per_update != 0:
            raise ConfigError(
                f"train.samples_per_update={train.samples_per_update} must divide the rollout batch "
                f"sample.groups_per_step x sample.group_size = {self.batch_size} (per process: its share); "
                "pick a divisor or 0"
            )
        update = train.samples_per_update
        if train.microbatch_size and update and update % train.microbatch_size != 0:
            raise ConfigError(
                f"train.microbatch_size={train.microbatch_size} must divide train.samples_per_update={update}; "
                "pick a divisor or 0"
            )
        if algorithm.clip_low < 0:
            raise ConfigError(f"algorithm.clip_low must be >= 0, got {algorithm.clip_low}")
        if algorithm.clip_high is not None and not algorithm.clip_high > 0:
            raise ConfigError(
                f"algorithm.clip_high must be > 0, or null for clip_low, got {algorithm.clip_high}"
            )
        if algorithm.name == "dapo" and not algorithm.clip_high_or_low > algorithm.clip_low:
            raise ConfigError(
                f"algorithm.name=dapo uses clip-higher: set algorithm.clip_high > algorithm.clip_low (DAPO: 0.28 "
                f"vs 0.2), got clip_low={algorithm.clip_low}, clip_high={algorithm.clip_high_or_low}"
            )
        if algorithm.kl_coef < 0:
            raise ConfigError(f"algorithm.kl_coef must be >= 0, got {algorithm.kl_coef}")

    def _validate_stages(self) -> None:
        stages = self.data.stages
        if not stages:
            raise ConfigError(
                "data.stages is empty; add at least one stage with files (or synthetic: colour)"
            )
        for index, stage in enumerate(stages):
            where = f"data.stages[{index}]"
            if not stage.files and not stage.synthetic:
                raise ConfigError(
                    f"{where} has neither files nor synthetic; list JSONL files in {where}.files"
                )
            if stage.synthetic and stage.synthetic not in SYNTHETIC_NAMES:
                raise ConfigError(
                    f"{where}.synthetic must be '' or one of {', '.join(SYNTHETIC_NAMES)}, got {stage.synthetic!r}"
                )
            if stage.steps < 0:
                raise ConfigError(f"{where}.steps must be >= 0, got {stage.steps}")
            if stage.steps == 0 and index != len(stages) - 1:
                raise ConfigError(
                    f"{where}.steps is 0 (until the end) but later stages follow; give it steps"
                )

    def _validate_rewards(self) -> None:
        if not self.reward.terms:
            raise ConfigError("reward.terms is empty; add e.g. {name: exact, weight: 1.0}")
        names = [spec.name for spec in self.reward.terms]
        if len(set(names)) != len(names):
            raise ConfigError(f"reward.terms names must be unique, got {names}")

    def _validate_objective(self) -> None:
        algorithm, reward = self.algorithm, self.reward
        estimator = reward.advantage_estimator
        if estimator != "grpo" and reward.combine != "sum_then_normalize":
            raise ConfigError(
                f"reward.advantage_estimator={estimator} works on the weighted reward sum; set "
                "reward.combine: sum_then_normalize"
            )
        if estimator != "grpo" and reward.std_mode is not None:
            raise ConfigError(
                f"reward.std_mode applies to advantage_estimator grpo only; remove it for {estimator}"
            )
        if algorithm.dual_clip and not algorithm.dual_clip > 1:
            raise ConfigError(
                f"algorithm.dual_clip must be 0 (off) or > 1 (Ye et al.: 3), got {algorithm.dual_clip}"
            )
        if algorithm.dual_clip and algorithm.name in ("cispo", "sapo"):
            raise ConfigError(
                f"algorithm.dual_clip bounds the PPO clipped surrogate; algorithm.name={algorithm.name} has none"
            )
        if not (algorithm.sapo_tau_pos > 0 and algorithm.sapo_tau_neg > 0):
            raise ConfigError(
                "algorithm.sapo_tau_pos and algorithm.sapo_tau_neg must be > 0 (SAPO: 1.0 and 1.05)"
            )
        if not 0 < algorithm.top_entropy_fraction <= 1:
            raise ConfigError(
                f"algorithm.top_entropy_fraction must be in (0, 1] (80/20 rule: 0.2), got "
                f"{algorithm.top_entropy_fraction}"
            )
