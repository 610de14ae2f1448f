"""The preference reward-model trainer (``task: reward_model`` in ``gen_rl/train.py``).

One run: read and check the records (bad ones reported with line numbers), hold some out, build the scorer
(``gen_rl/reward_model/model.py``), fix the head's feature standardisation on training images, train with the
Bradley-Terry (pairs, 0.5-target ties) or Plackett-Luce (ranked lists) loss, save the model to
``<log.output_dir>/model`` (LoRA merged), then load it back from there, exactly as a generation config's
``preference_model`` reward does, and evaluate it on the held-out records: ``<log.output_dir>/eval/report.md``,
``reliability.png``, ``scores.jsonl``. Metrics go to ``<log.output_dir>/metrics.jsonl``.
"""

from __future__ import annotations

import json
import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import Tensor

from gen_rl.checkpoint import RunError
from gen_rl.core.config import to_dict
from gen_rl.reward_model.config import RewardModelConfig
from gen_rl.reward_model.data import Comparison, as_pairs, load_comparisons, split_comparisons
from gen_rl.reward_model.evaluation import evaluate_pairs, load_image, write_report
from gen_rl.reward_model.losses import bradley_terry_loss, pairwise_accuracy, plackett_luce_loss
from gen_rl.reward_model.model import build_scorer, fix_feature_statistics, parameter_groups, save_trained
from gen_rl.run_folder import claim
from rewards.preference_model import PreferenceScorer, load_preference_model

MODEL_FOLDER = "model"
EVAL_FOLDER = "eval"
CACHE_LIMIT = 20_000  # images kept in memory after their first load (tiny and medium sets)


@dataclass
class PreferenceSets:
    """Training and held-out records, and the loss the training records take."""

    train: list[Comparison]
    held_out: list[Comparison]
    loss: str  # "bradley_terry" | "plackett_luce"


def load_preference_sets(config: RewardModelConfig) -> PreferenceSets:
    """Read (and check) the training and held-out records; pick the loss (``train.loss: auto``)."""
    data = config.data

    def read(path: str, key: str) -> list[Comparison]:
        return load_comparisons(
            path,
            data.format,
            image_root=data.image_root,
            bad_records=data.bad_records,
            category_key=data.category_key,
            min_log_gap=data.implicit.min_log_gap,
            max_pairs_per_group=data.implicit.max_pairs_per_group,
            key=key,
        )

    records = read(data.train_file, "data.train_file")
    if data.eval_file:
        train, held_out = records, read(data.eval_file, "data.eval_file")
    else:
        train, held_out = split_comparisons(records, data.eval_fraction, config.train.seed)
    ranked = any(item.ranked for item in train)
    loss = (
        config.train.loss if config.train.loss != "auto" else ("plackett_luce" if ranked else "bradley_terry")
    )
    if loss == "plackett_luce" and not all(item.ranked for item in train):
        raise RunError("train.loss: plackett_luce needs every training record to be a ranked list")
    if loss == "bradley_terry":
        train = as_pairs(train)
    return PreferenceSets(train=train, held_out=as_pairs(held_out), loss=loss)


def with_synthetic_data(config: RewardModelConfig, folder: Path) -> RewardModelConfig:
    """The config with ``data.train_file`` / ``eval_file`` pointing at the synthetic task written to ``folder``."""
    from gen_rl.reward_model.synthetic import write_pairs

    train_file = write_pairs(folder, "train.jsonl", 300, seed=0)
    eval_file = write_pairs(folder, "eval.jsonl", 100, seed=7)
    data = replace(config.data, train_file=str(train_file), eval_file=str(eval_file))
    return replace(config, data=data)


def batch_indices(count: int, step: int, batch_size: int, seed: int) -> list[int]:
    """Record indices of update ``step``: epochs of seeded permutations, walked ``batch_size`` at a time."""
    permutations: dict[int, list[int]] = {}
    indices = []
    for position in range(step * batch_size, (step + 1) * batch_size):
        epoch, offset = divmod(position, count)
        if epoch not in permutations:
            order = list(range(count))
            random.Random(seed * 1_000_003 + epoch).shuffle(order)
            permutations[epoch] = order
        indices.append(permutations[epoch][offset])
    return indices


@dataclass
class ImageCache:
    """Loads record images, keeping up to ``CACHE_LIMIT`` of them in memory."""

    images: dict[Path, Tensor] = field(default_factory=dict)

    def __call__(self, path: Path, comparison: Comparison | None = None) -> Tensor:
        cached = self.images.get(path)
        if cached is not None:
            return cached
        image = load_image(path, comparison)
        if len(self.images) < CACHE_LIMIT:
            self.images[path] = image
        return image


def batch_loss(
    scorer: PreferenceScorer | Callable[[list[Tensor], list[str]], Tensor],
    batch: list[Comparison],
    loss_name: str,
    images: Callable[[Path, Comparison], Tensor],
) -> tuple[Tensor, Tensor]:
    """(loss, pairwise accuracy) of one batch: Bradley-Terry on pairs, Plackett-Luce on ranked lists."""
    pixels, prompts = [], []
    for item in batch:
        for path in item.images:
            pixels.append(images(path, item))
            prompts.append(item.prompt)
    scores = scorer(pixels, prompts)
    if loss_name == "bradley_terry":
        score_a, score_b = scores[0::2], scores[1::2]
        label = torch.tensor([item.label for item in batch], device=scores.device)
        return bradley_terry_loss(score_a, score_b, label), pairwise_accuracy(score_a, score_b, label)
    longest = max(len(item.images) for item in batch)
    padded = scores.new_zeros(len(batch), longest)
    mask = torch.zeros(len(batch), longest, dtype=torch.bool, device=scores.device)
    start = 0
    for row, item in enumerate(batch):
        padded[row, : len(item.images)] = scores[start : start + len(item.images)]
        mask[row, : len(item.images)] = True
        start += len(item.images)
    top_wins = (padded[:, 0:1] > padded.masked_fill(~mask, float("-inf"))[:, 1:]).float()
    accuracy = (top_wins * mask[:, 1:]).sum() / mask[:, 1:].sum()  # the best image above each other one
    return plackett_luce_loss(padded, mask), accuracy


def warmup_factor(update: int, warmup_updates: int) -> float:
    """Linear warm-up to 1 over ``warmup_updates`` updates (1 throughout when 0)."""
    return min(1.0, (update + 1) / warmup_updates) if warmup_updates else 1.0


def train(config: RewardModelConfig, resume: bool = False, overwrite: bool = False) -> dict[str, Any]:
    """Train, save and evaluate a preference model; returns the final held-out metrics and the model path."""
    if resume:
        raise RunError(
            "task: reward_model runs are short and do not resume; start again with --overwrite (the old run "
            "is moved aside) or another log.output_dir"
        )
    folder = claim(config.log.output_dir, resume=False, overwrite=overwrite).root
    (folder / "config.yaml").write_text(yaml.safe_dump(to_dict(config), sort_keys=False), encoding="utf-8")
    if config.data.synthetic:
        config = with_synthetic_data(config, folder / "data")
    sets = load_preference_sets(config)
    torch.manual_seed(config.train.seed)
    scorer = build_scorer(config)
    images = ImageCache()
    _fix_statistics(scorer, sets.train, images, config)
    optimizer = torch.optim.AdamW(parameter_groups(scorer, config), weight_decay=config.train.weight_decay)
    base_lrs = [group["lr"] for group in optimizer.param_groups]
    trainable = [p for group in optimizer.param_groups for p in group["params"]]
    metrics_path = folder / "metrics.jsonl"
    scorer.train()
    if config.model.mode == "frozen":
        scorer.backbone.eval()
    for step in range(config.train.num_steps):
        started = time.perf_counter()
        for group, base in zip(optimizer.param_groups, base_lrs, strict=True):
            group["lr"] = base * warmup_factor(step, config.train.warmup_updates)
        batch = [
            sets.train[i]
            for i in batch_indices(len(sets.train), step, config.train.batch_size, config.train.seed)
        ]
        loss, accuracy = batch_loss(scorer, batch, sets.loss, images)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        clip = config.train.max_grad_norm if config.train.max_grad_norm > 0 else math.inf
        grad_norm = torch.nn.utils.clip_grad_norm_(trainable, clip)
        if not torch.isfinite(loss):
            raise RunError(f"the reward-model loss is {float(loss)} at update {step}; lower train.lr")
        optimizer.step()
        record = {
            "step": step,
            "loss/total": loss.item(),
            "train/accuracy": accuracy.item(),
            "optim/lr": optimizer.param_groups[0]["lr"],
            "optim/grad_norm": float(grad_norm),
            "time/step_s": time.perf_counter() - started,
        }
        every = config.eval.every_steps
        if every and (step + 1) % every == 0 and step + 1 < config.train.num_steps:
            record.update(_evaluate_in_training(scorer, sets.held_out, images, config))
            _progress(config, record)
        _append(metrics_path, record)
    model_folder = save_trained(scorer, folder / MODEL_FOLDER)
    # evaluate the saved model as a generation run will load it: same weights, same preprocessing
    loaded = load_preference_model(model_folder, device=config.model.device or None, dtype=config.model.dtype)
    evaluation = evaluate_pairs(
        loaded, sets.held_out, config.eval.batch_size, config.eval.calibration_bins, images
    )
    write_report(evaluation, folder / EVAL_FOLDER)
    final = {"step": config.train.num_steps, **evaluation.metrics}
    _append(metrics_path, final)
    _progress(config, final)
    return {**evaluation.metrics, "model": str(model_folder), "train_records": len(sets.train)}


def _fix_statistics(
    scorer: PreferenceScorer, train: list[Comparison], images: ImageCache, config: RewardModelConfig
) -> None:
    seen: dict[Path, str] = {}
    for item in train:
        for path in item.images:
            seen.setdefault(path, item.prompt)
        if len(seen) >= config.model.feature_stats_images:
            break
    chosen = list(seen.items())[: config.model.feature_stats_images]
    pixels = [images(path) for path, _ in chosen]
    fix_feature_statistics(scorer, pixels, [prompt for _, prompt in chosen], config.eval.batch_size)


def _evaluate_in_training(
    scorer: PreferenceScorer, held_out: list[Comparison], images: ImageCache, config: RewardModelConfig
) -> dict[str, float]:
    scorer.eval()
    evaluation = evaluate_pairs(
        scorer, held_out, config.eval.batch_size, config.eval.calibration_bins, images
    )
    scorer.train()
    if config.model.mode == "frozen":
        scorer.backbone.eval()
    return evaluation.metrics


def _append(path: Path, record: dict[str, Any]) -> None:
    with path.open("a", encoding="utf-8") as handle:
        handle.write(json.dumps(record) + "\n")


def _progress(config: RewardModelConfig, record: dict[str, Any]) -> None:
    if config.log.progress and "eval/accuracy" in record:
        print(
            f"[reward_model] step {record['step']}: held-out accuracy {record['eval/accuracy']:.3f}, "
            f"loss {record['eval/loss']:.4f}, ECE {record['eval/ece']:.3f}",
            flush=True,
        )
