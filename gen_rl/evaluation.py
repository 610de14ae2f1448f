"""The evaluation harness: a base model and checkpoints side by side on held-out prompts with fixed seeds.

    gen-rl eval outputs/demo/checkpoints/checkpoint-000010 outputs/demo --out outputs/compare

Every model samples the same prompts from the same noise as the trainer's own evaluation (``eval.seed``, prompt
keys ``eval-<i>``, ``eval.noise_level``), so a checkpoint's numbers here equal the ``eval/*`` record of the step it
was saved at. Each is scored with the run's rewards and gold rewards. Written to the output folder:
``scores.csv`` (one row per sample), ``summary.md`` (one row per model) and ``comparison.png`` (rows: prompts;
columns: models; rewards under each sample); video families also get ``<model>/prompt-<i>.mp4``.
"""

from __future__ import annotations

import csv
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from gen_rl.core.config import ConfigError, load_config
from gen_rl.core.grids import labelled_grid, save_labelled_grid
from gen_rl.data import load_prompts
from gen_rl.trainer_config import GenerationConfig


@dataclass
class EvalTarget:
    """One model of the comparison: the base (``lora=None``) or a LoRA folder, shown under ``name``."""

    name: str
    lora: Path | None = None


@dataclass
class EvalReport:
    """Mean scores per model (``name -> {score name -> mean}``) and the files written."""

    means: dict[str, dict[str, float]] = field(default_factory=dict)
    files: dict[str, Path] = field(default_factory=dict)


def checkpoint_config(checkpoint: str | Path, overrides: Sequence[str] = ()) -> tuple[GenerationConfig, Path]:
    """The run config saved in a checkpoint folder (or a run folder's latest checkpoint) and its LoRA folder."""
    from gen_rl.checkpoint import CheckpointManager

    folder = Path(checkpoint)
    if not (folder / "config.yaml").is_file():
        latest = CheckpointManager(folder, keep_last=1).latest() if folder.is_dir() else None
        if latest is None:
            raise ConfigError(
                f"{folder} is neither a checkpoint folder (with config.yaml) nor a run folder with checkpoints; "
                "give outputs/<run>/checkpoints/checkpoint-<step> or outputs/<run>"
            )
        folder = latest
    lora = folder / "lora"
    if not lora.is_dir():
        raise ConfigError(
            f"{folder} has no lora/ folder: only LoRA runs can be compared with their base model"
        )
    return load_config(GenerationConfig, folder / "config.yaml", list(overrides)), lora


def targets_of(
    checkpoints: list[str], include_base: bool = True, overrides: Sequence[str] = ()
) -> tuple[GenerationConfig, list[EvalTarget]]:
    """The config of the first checkpoint and one target per checkpoint (names ``<run>/<checkpoint>``), the base
    model first; every checkpoint must share the first one's model."""
    if not checkpoints:
        raise ConfigError(
            "give at least one checkpoint (outputs/<run>/checkpoints/checkpoint-<step>, or outputs/<run>)"
        )
    config, targets = None, [EvalTarget("base")] if include_base else []
    for checkpoint in checkpoints:
        own, lora = checkpoint_config(checkpoint, overrides)
        if config is None:
            config = own
        elif (own.model.family, own.model.pretrained) != (config.model.family, config.model.pretrained):
            raise ConfigError(
                f"{checkpoint} was trained from {own.model.pretrained} but the first checkpoint from "
                f"{config.model.pretrained}; compare checkpoints of one base model"
            )
        checkpoint_folder = lora.parent
        run = checkpoint_folder.parent
        run = run.parent if run.name == "checkpoints" else run
        targets.append(EvalTarget(f"{run.name}/{checkpoint_folder.name}", lora))
    return config, targets


def evaluate_models(
    config: GenerationConfig, targets: list[EvalTarget], out_dir: str | Path, device: str | None = None
) -> EvalReport:
    """Sample and score every target on ``config``'s eval prompts (``eval.max_prompts``, ``eval.samples_per_prompt``)
    with the trainer's evaluation seeds; write the CSV, the Markdown table and the comparison grid."""
    from gen_rl.objective import reward_key
    from gen_rl.policy import load_sampler
    from gen_rl.sampling import eval_options
    from rewards import build_reward
    from rewards.base import score_reward

    if not config.data.eval_prompts:
        raise ConfigError("data.eval_prompts is empty: give held-out prompts (data.eval_prompts=path)")
    prompt_set = load_prompts(config.data.eval_prompts, config.data.bad_records, "data.eval_prompts")
    count = min(len(prompt_set), config.eval.max_prompts)
    prompts, metadata = prompt_set.prompts[:count], prompt_set.metadata[:count]
    per_prompt = config.eval.samples_per_prompt
    weights = {reward_key(i, t.name): t.weight for i, t in enumerate(config.reward.terms)}
    rewards = {
        reward_key(i, t.name): build_reward(t.name, **t.kwargs) for i, t in enumerate(config.reward.terms)
    }
    rewards.update(
        {
            f"gold/{reward_key(i, t.name)}": build_reward(t.name, **t.kwargs)
            for i, t in enumerate(config.eval.gold)
        }
    )
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    sampler = load_sampler(config.model, device)
    options = eval_options(config)
    group_ids = torch.arange(count).repeat_interleave(per_prompt)
    out_dir = Path(out_dir)
    rows, pixels_by_target, report = [], {}, EvalReport()
    for target in tqdm(targets, desc="gen-rl eval", disable=len(targets) < 2):
        if target.lora is not None:
            sampler.pipeline.load_lora_weights(target.lora)
        rollout = sampler.rollout(
            prompts, options, group_size=per_prompt, prompt_keys=[f"eval-{i}" for i in range(count)],
            metadata=metadata,
        )  # fmt: skip
        if target.lora is not None:
            sampler.pipeline.unload_lora_weights()
        scores = {name: score_reward(model, rollout.pixels, rollout.prompts, rollout.metadata, group_ids).scores
                  for name, model in rewards.items()}  # fmt: skip
        scores["reward"] = sum(weights[name] * scores[name] for name in weights)
        pixels_by_target[target.name] = rollout.pixels.cpu()
        report.means[target.name] = {name: float(values.float().nanmean()) for name, values in scores.items()}
        for index in range(len(rollout)):
            row = {"model": target.name, "prompt_index": index // per_prompt, "member": index % per_prompt}
            row.update({"prompt": rollout.prompts[index], **{k: float(v[index]) for k, v in scores.items()}})
            rows.append(row)
    report.files = _write_outputs(out_dir, rows, report.means, pixels_by_target, prompts, per_prompt)
    return report


def _write_outputs(out_dir, rows, means, pixels_by_target, prompts, per_prompt) -> dict[str, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    files = {
        "csv": out_dir / "scores.csv",
        "markdown": out_dir / "summary.md",
        "grid": out_dir / "comparison.png",
    }
    with files["csv"].open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    files["markdown"].write_text(summary_table(means))
    names = list(pixels_by_target)
    by_score = {row["model"]: [] for row in rows}
    for row in rows:
        by_score[row["model"]].append(f"{row['reward']:.3f}")
    cells, labels = [], []
    for prompt_index in range(len(prompts)):  # row-major: one row per prompt, models left to right
        for name in names:
            start = prompt_index * per_prompt
            cells.append(pixels_by_target[name][start : start + per_prompt])
            labels += by_score[name][start : start + per_prompt]
    columns = [f"{name} #{member}" for name in names for member in range(per_prompt)]
    grid = labelled_grid(torch.cat(cells), prompts, labels, column_labels=columns)
    save_labelled_grid(grid, files["grid"])
    if next(iter(pixels_by_target.values())).ndim == 5:
        from gen_rl.eval_media import write_prompt_videos

        for index, name in enumerate(names):
            write_prompt_videos(pixels_by_target[name], len(prompts), out_dir / f"model-{index:02d}")
    return files


def summary_table(means: dict[str, dict[str, float]]) -> str:
    """A Markdown table: one row per model, the combined reward first, then each reward and gold reward."""
    names = ["reward"] + sorted(key for key in next(iter(means.values())) if key != "reward")
    lines = ["| model | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    for model, values in means.items():
        lines.append(f"| {model} | " + " | ".join(f"{values[name]:.4f}" for name in names) + " |")
    return "\n".join(lines) + "\n"
