"""Typed config of the preference reward-model trainer (``task: reward_model``), one dataclass per YAML section.

``gen_rl/train.py --describe`` with a ``task: reward_model`` config prints every key with its default and unit.
Importing this module imports no torch. Shared names follow the generation trainer (``train.num_steps``,
``train.lr``, ``train.warmup_updates``, ``data.bad_records``, ``log.output_dir``, ``log.progress``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

from gen_rl.core.config import ConfigError, check_finite, option, section

DATA_FORMATS = ("pairs", "ranked", "implicit", "pickapic", "hpd")
BUILTIN_BACKBONES = ("builtin:tiny-clip", "builtin:tiny-dino")


@dataclass
class LoraSection:
    """LoRA adapters on the backbone (``model.mode: lora``), merged into it when the model is saved."""

    r: int = option(8, "LoRA rank")
    alpha: float = option(8.0, "LoRA alpha (the update is scaled by alpha / r)")
    dropout: float = option(0.0, "dropout on the LoRA input (probability)")
    target_modules: list[str] = option(
        ["q_proj", "k_proj", "v_proj", "out_proj"],
        "linear layers that get adapters (CLIP: q_proj k_proj v_proj out_proj; DINOv2: query key value dense)",
    )


@dataclass
class ModelSection:
    """The backbone (CLIP or DINOv2, transformers format), what is trained, and the score head."""

    backbone: Literal["clip", "dino"] = option("clip", "backbone kind: clip (CLIPModel) | dino (Dinov2Model)")
    name_or_path: str = option(
        "openai/clip-vit-large-patch14",
        "hub id or local folder of the backbone (and its image processor); builtin:tiny-clip or "
        "builtin:tiny-dino builds a tiny random one in code under log.output_dir/builtin",
    )
    mode: Literal["frozen", "lora", "full"] = option(
        "frozen", "frozen: train the head on frozen features | lora: LoRA on the backbone + head | full"
    )
    head: Literal["linear", "mlp", "cosine"] = option(
        "mlp",
        "score head: linear | mlp on [image, image*prompt] features | cosine: logit_scale*cos(image, prompt) "
        "(CLIP with use_text, HPS/PickScore style; needs mode lora or full)",
    )
    head_hidden: int = option(256, "hidden width of the mlp head")
    use_text: bool = option(True, "condition on the prompt through CLIP's text tower (CLIP only)")
    dtype: Literal["float32", "bfloat16", "float16"] = option("float32", "backbone weight dtype")
    device: str = option("", "torch device; empty: cuda when available, else cpu")
    feature_stats_images: int = option(
        256, "training images whose features fix the head's standardisation (mean, std) before training"
    )
    lora: LoraSection = section(LoraSection)


@dataclass
class ImplicitSection:
    """Engagement counts to pairs (``data.format: implicit``), as Social Reward does.

    Images are compared only within one context (records with the same ``group``, else the same prompt); the
    one with more engagement is preferred when ``log1p(c_i) - log1p(c_j) >= min_log_gap`` (a clear gap; the
    default log 2 needs about twice the engagement); smaller gaps give no pair (never a tie).
    """

    min_log_gap: float = option(0.693147, "least log1p(count) difference for a pair (log 2: about 2x)")
    max_pairs_per_group: int = option(64, "pairs kept per context group (the widest gaps first); 0: all")


@dataclass
class DataSection:
    """Preference records: JSONL of pairs or ranked lists, engagement counts, or a Pick-a-Pic / HPD layout."""

    synthetic: Literal["", "colour"] = option(
        "",
        "colour: write the synthetic colour-preference task (gen_rl/reward_model/synthetic.py; the image closer to "
        "red is preferred) under log.output_dir/data and train on it (leave train_file and eval_file empty)",
    )
    train_file: str = option("", "training records (see data.format)")
    eval_file: str = option("", "held-out records in the same format; empty: split eval_fraction off train")
    eval_fraction: float = option(0.1, "share of training records held out when eval_file is empty")
    image_root: str = option("", "folder that relative image paths are resolved against; empty: the file's")
    format: Literal["pairs", "ranked", "implicit", "pickapic", "hpd"] = option(
        "pairs",
        "pairs: {prompt, image_a, image_b, label 1|0|0.5} or {prompt, chosen, rejected} | ranked: {prompt, "
        "ranking: [best..worst]} | implicit: {prompt, image, engagement, group?} | pickapic: {caption, jpg_0, "
        "jpg_1 (or image_0_uid, image_1_uid), label_0} JSONL or parquet | hpd: HPDv2 JSON list {prompt, "
        "image_path, human_preference | rank}",
    )
    category_key: str = option("category", "record key whose value groups eval accuracy; empty: none")
    bad_records: Literal["abort", "skip"] = option(
        "abort",
        "a bad record (missing or unreadable image, the same image twice): abort listing each, or skip",
    )
    implicit: ImplicitSection = section(ImplicitSection)


@dataclass
class TrainSection:
    """The optimiser and the loss."""

    num_steps: int = option(200, "optimizer updates")
    batch_size: int = option(32, "records (pairs or ranked lists) per update")
    lr: float = option(1e-3, "AdamW learning rate of the head")
    backbone_lr: float = option(1e-5, "AdamW learning rate of the backbone (lora / full modes)")
    weight_decay: float = option(0.0, "AdamW weight decay")
    warmup_updates: int = option(0, "linear learning-rate warm-up (optimizer updates)")
    max_grad_norm: float = option(1.0, "gradient-norm clip; 0 disables")
    loss: Literal["auto", "bradley_terry", "plackett_luce"] = option(
        "auto",
        "bradley_terry (pairs, 0.5-target ties; ranked lists become all their pairs) | plackett_luce (ranked "
        "lists) | auto: plackett_luce for ranked data, else bradley_terry",
    )
    seed: int = option(0, "seed of the weights, the split and the batch order")


@dataclass
class EvalSection:
    """Held-out evaluation: pairwise accuracy, by category, calibration; report in log.output_dir."""

    every_steps: int = option(50, "evaluate every N updates (and at the end); 0: only at the end")
    batch_size: int = option(32, "images per forward")
    calibration_bins: int = option(10, "equal-width bins of the predicted preference probability (ECE)")


@dataclass
class LogSection:
    """Where results go."""

    output_dir: str = option("outputs/reward_model", "run folder: metrics.jsonl, model/, eval/ report")
    progress: bool = option(True, "print one line per evaluation")


@dataclass
class RewardModelConfig:
    """A preference reward-model run: ``gen_rl/train.py --config`` with ``task: reward_model``."""

    task: str = option("reward_model", "reward_model (this trainer), generation or vlm")
    renamed_keys: ClassVar[dict[str, str]] = {}

    model: ModelSection = section(ModelSection)
    data: DataSection = section(DataSection)
    train: TrainSection = section(TrainSection)
    eval: EvalSection = section(EvalSection)
    log: LogSection = section(LogSection)

    def validate(self) -> None:
        """Check the invariants between fields; each error names the key and a fix."""
        if self.task != "reward_model":
            raise ConfigError(f"task is {self.task!r}; this config class runs task: reward_model")
        check_finite(self)
        model, data, train = self.model, self.data, self.train
        if data.synthetic and (data.train_file or data.eval_file or data.format != "pairs"):
            raise ConfigError(
                "data.synthetic writes its own pairs files; leave data.train_file and data.eval_file empty and "
                "data.format: pairs"
            )
        if not data.train_file and not data.synthetic:
            raise ConfigError("data.train_file is empty; give a JSONL file of preference records")
        if model.backbone == "dino" and model.use_text:
            raise ConfigError("model.use_text: a dino backbone has no text side; set model.use_text: false")
        if model.head == "cosine" and not model.use_text:
            raise ConfigError("model.head: cosine compares image and prompt; set model.use_text: true")
        if model.head == "cosine" and model.mode == "frozen":
            raise ConfigError("model.head: cosine has no weights of its own; use model.mode: lora or full")
        builtin = model.name_or_path.startswith("builtin:")
        if builtin and model.name_or_path not in BUILTIN_BACKBONES:
            raise ConfigError(f"model.name_or_path {model.name_or_path!r}: builtins are {BUILTIN_BACKBONES}")
        if builtin and model.name_or_path.split("-")[-1] != model.backbone:
            raise ConfigError(f"model.name_or_path {model.name_or_path} does not match model.backbone")
        if train.loss == "plackett_luce" and data.format not in ("ranked", "hpd"):
            raise ConfigError(
                f"train.loss: plackett_luce needs ranked lists; data.format {data.format} gives pairs "
                "(use bradley_terry or auto)"
            )
        if not data.eval_file and not 0.0 < data.eval_fraction < 1.0:
            raise ConfigError("data.eval_fraction must be in (0, 1) when data.eval_file is empty")
        positive = {
            "train.num_steps": train.num_steps,
            "train.batch_size": train.batch_size,
            "eval.batch_size": self.eval.batch_size,
            "eval.calibration_bins": self.eval.calibration_bins,
            "model.head_hidden": model.head_hidden,
            "model.lora.r": model.lora.r,
            "model.feature_stats_images": model.feature_stats_images,
        }
        for key, value in positive.items():
            if value < 1:
                raise ConfigError(f"{key} must be >= 1; got {value}")
        for key, value in {"train.lr": train.lr, "train.backbone_lr": train.backbone_lr}.items():
            if value <= 0:
                raise ConfigError(f"{key} must be > 0; got {value}")
        if self.eval.every_steps < 0 or train.warmup_updates < 0 or train.max_grad_norm < 0:
            raise ConfigError("eval.every_steps, train.warmup_updates and train.max_grad_norm must be >= 0")
