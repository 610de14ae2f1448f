"""The trainable preference scorer: a CLIP or DINOv2 backbone, a head, and what is trained (frozen / LoRA / full).

The scorer class, its checkpoint format and its loading live in ``rewards/preference_model.py`` (the reward
side must not import the trainer); this module builds one from a ``RewardModelConfig``, freezes or adapts the
backbone, fixes the head's feature standardisation from training images, and saves it with LoRA merged.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from gen_rl.core.dtypes import resolve_device, resolve_dtype
from gen_rl.reward_model.config import RewardModelConfig
from rewards.preference_model import (
    PreferenceModelSpec,
    PreferenceScorer,
    preprocess_to_dict,
    save_preference_model,
)
from rewards.preprocess import ImagePreprocess

BUILTIN_FOLDER = "builtin"


def backbone_source(config: RewardModelConfig) -> str:
    """The backbone folder or hub id; a ``builtin:`` tiny backbone is written under ``log.output_dir/builtin``."""
    name = config.model.name_or_path
    if not name.startswith("builtin:"):
        return name
    from rewards.tiny import save_tiny_clip, save_tiny_dino

    folder = Path(config.log.output_dir) / BUILTIN_FOLDER / name.removeprefix("builtin:")
    if not (folder / "config.json").is_file():
        save = save_tiny_clip if config.model.backbone == "clip" else save_tiny_dino
        save(folder, seed=config.train.seed)
    return str(folder)


def build_scorer(config: RewardModelConfig) -> PreferenceScorer:
    """A fresh scorer on the configured device: backbone loaded, head initialised from ``train.seed``."""
    from rewards.weights import load_pretrained

    model = config.model
    source = backbone_source(config)
    dtype = resolve_dtype(model.dtype)
    what = f"{model.backbone} backbone {source!r}"
    tokenizer = None
    if model.backbone == "clip":
        from transformers import AutoTokenizer, CLIPModel

        published = "https://huggingface.co/openai/clip-vit-large-patch14"
        backbone = load_pretrained(CLIPModel.from_pretrained, source, what=what, published=published)
        feature_dim = int(backbone.config.projection_dim)
        if model.use_text:
            tokenizer = load_pretrained(
                AutoTokenizer.from_pretrained, source, what=f"{what} tokenizer", published=published
            )
    else:
        from transformers import Dinov2Model

        published = "https://huggingface.co/facebook/dinov2-base"
        backbone = load_pretrained(Dinov2Model.from_pretrained, source, what=what, published=published)
        feature_dim = int(backbone.config.hidden_size)
    preprocess = ImagePreprocess.from_pretrained(source, what=what, published=published)
    spec = PreferenceModelSpec(
        backbone=model.backbone,
        use_text=model.use_text,
        head=model.head,
        head_hidden=model.head_hidden,
        feature_dim=feature_dim,
        preprocess=preprocess_to_dict(preprocess),
        trained_with={"backbone": model.name_or_path, "mode": model.mode, "data": config.data.train_file},
    )
    torch.manual_seed(config.train.seed)
    scorer = PreferenceScorer(spec, backbone.to(dtype=dtype), tokenizer)
    scorer.to(resolve_device(model.device or None))
    set_trainable(scorer, config)
    return scorer


def set_trainable(scorer: PreferenceScorer, config: RewardModelConfig) -> None:
    """Freeze the backbone (``frozen``), add LoRA adapters to it (``lora``) or train all of it (``full``)."""
    mode = config.model.mode
    scorer.backbone.requires_grad_(mode == "full")
    if mode == "lora":
        from peft import LoraConfig, get_peft_model

        lora = config.model.lora
        adapter = LoraConfig(
            r=lora.r,
            lora_alpha=lora.alpha,
            lora_dropout=lora.dropout,
            target_modules=list(lora.target_modules),
        )
        scorer.backbone = get_peft_model(scorer.backbone, adapter)
    if scorer.head is not None:
        scorer.head.requires_grad_(True)


def parameter_groups(scorer: PreferenceScorer, config: RewardModelConfig) -> list[dict[str, Any]]:
    """AdamW groups: the head at ``train.lr``, trainable backbone weights at ``train.backbone_lr``."""
    groups = []
    if scorer.head is not None:
        groups.append({"params": list(scorer.head.parameters()), "lr": config.train.lr})
    backbone = [parameter for parameter in scorer.backbone.parameters() if parameter.requires_grad]
    if backbone:
        groups.append({"params": backbone, "lr": config.train.backbone_lr})
    return groups


@torch.no_grad()
def fix_feature_statistics(
    scorer: PreferenceScorer, images: list[Tensor], prompts: list[str], batch: int
) -> None:
    """Set the head's standardisation to the mean and std of the features of ``images`` (floor 1e-6 on std)."""
    if scorer.head is None or not images:
        return
    was_training = scorer.training
    scorer.eval()
    features = torch.cat(
        [
            scorer.features(images[start : start + batch], prompts[start : start + batch])
            for start in range(0, len(images), batch)
        ]
    )
    scorer.train(was_training)
    scorer.head.feature_mean.copy_(features.mean(dim=0))
    std = features.std(dim=0, unbiased=False) if features.shape[0] > 1 else torch.ones_like(features[0])
    scorer.head.feature_std.copy_(std.clamp_min(1e-6))


def save_trained(scorer: PreferenceScorer, folder: str | Path) -> Path:
    """Save ``scorer`` as a checkpoint folder; LoRA adapters are merged into a copy of the backbone first."""
    import copy

    backbone = scorer.backbone
    if hasattr(backbone, "merge_and_unload"):
        merged = copy.deepcopy(backbone).merge_and_unload()
        saved = PreferenceScorer(scorer.spec, merged, scorer.tokenizer)
        if scorer.head is not None:
            saved.head.load_state_dict(scorer.head.state_dict())
        return save_preference_model(saved, folder)
    return save_preference_model(scorer, folder)
