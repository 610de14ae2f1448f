"""Sampling options of a run config (training and evaluation), and ``gen-rl sample``: images or videos from a
base model (any family) or a checkpoint's model plus its LoRA.

Samples follow the deterministic sampler (noise level 0) from seeds derived from ``--seed``, the prompt and the
member, exactly as training and evaluation draw them; each sample is written as a PNG (videos: MP4) and all of
them in one labelled grid.
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path
from typing import Any

import torch

from gen_rl.core.config import ConfigError
from gen_rl.trainer_config import GenerationConfig, ModelConfig
from pipelines.base import RolloutOptions


def sampling_options(config: GenerationConfig, **overrides: Any) -> RolloutOptions:
    """``RolloutOptions`` from the config's ``sample`` section and run seed, with ``overrides``."""
    sample = config.sample
    options = RolloutOptions(
        num_steps=sample.num_steps,
        height=sample.height,
        width=sample.width,
        cfg_scale=sample.cfg_scale,
        negative_prompt=sample.negative_prompt,
        guidance=sample.guidance,
        shift=sample.shift,
        sde_type=sample.sde_type,
        noise_level=sample.noise_level,
        share_initial_noise=sample.share_initial_noise,
        seed=config.train.seed,
        max_sequence_length=sample.max_sequence_length,
        num_frames=sample.num_frames,
    )
    return dataclasses.replace(options, **overrides)


def eval_options(config: GenerationConfig) -> RolloutOptions:
    """The held-out evaluation's options: eval seed and noise level, no shared initial noise (fixed every time)."""
    return sampling_options(
        config, seed=config.eval.seed, noise_level=config.eval.noise_level, share_initial_noise=False
    )


def model_of(args: argparse.Namespace) -> tuple[ModelConfig, Path | None, dict]:
    """The model to load, the LoRA folder to put on it (or None) and the run's sample settings (or {})."""
    from pipelines.families import FAMILIES, TINY_MODELS

    if args.checkpoint:
        from gen_rl.core.config import to_dict
        from gen_rl.evaluation import checkpoint_config

        config, lora = checkpoint_config(args.checkpoint)
        model = config.model
        if args.dtype:
            model.dtype = args.dtype
        return model, lora, to_dict(config.sample)
    family = args.family or (TINY_MODELS[args.model].family if args.model in TINY_MODELS else None)
    if family is None:
        raise ConfigError(f"give --family for --model {args.model} (one of {', '.join(FAMILIES)})")
    if family not in FAMILIES:
        raise ConfigError(f"unknown --family {family!r}; use one of {', '.join(FAMILIES)}")
    lora = Path(args.lora) if args.lora else None
    if lora is not None and not lora.is_dir():
        raise ConfigError(f"--lora {lora} is not a folder; give a LoRA folder in diffusers format")
    return ModelConfig(family=family, pretrained=args.model, dtype=args.dtype or "float32"), lora, {}


def prompts_of(args: argparse.Namespace) -> tuple[list[str], list[dict]]:
    """Prompts from ``--prompt`` (repeatable) and ``--prompts`` (a prompt file), in that order."""
    from gen_rl.data import load_prompts

    prompts, metadata = list(args.prompt), [{} for _ in args.prompt]
    if args.prompts:
        loaded = load_prompts(args.prompts, key="--prompts")
        prompts += loaded.prompts
        metadata += loaded.metadata
    if not prompts:
        raise ConfigError('give at least one --prompt "..." or a --prompts file')
    return prompts, metadata


def sample_to_folder(args: argparse.Namespace) -> list[Path]:
    """Sample every prompt ``--samples-per-prompt`` times; returns the sample files, then the grid."""
    from gen_rl.policy import load_sampler

    model, lora, sample = model_of(args)
    prompts, metadata = prompts_of(args)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    sampler = load_sampler(model, device)
    if lora is not None:
        sampler.pipeline.load_lora_weights(lora)
    options = RolloutOptions(
        num_steps=args.steps or sample.get("num_steps", 20),
        height=args.height or sample.get("height"),
        width=args.width or sample.get("width"),
        num_frames=args.frames or sample.get("num_frames"),
        cfg_scale=args.cfg_scale if args.cfg_scale is not None else sample.get("cfg_scale", 1.0),
        negative_prompt=sample.get("negative_prompt", ""),
        guidance=sample.get("guidance"),
        shift=sample.get("shift"),
        sde_type=sample.get("sde_type", sampler.step_kinds[0]),
        noise_level=0.0,
        seed=args.seed,
        max_sequence_length=sample.get("max_sequence_length"),
    )
    rollout = sampler.rollout(prompts, options, group_size=args.samples_per_prompt, metadata=metadata)
    return _write_samples(rollout.pixels.cpu(), prompts, args.samples_per_prompt, Path(args.out))


def _write_samples(pixels: torch.Tensor, prompts: list[str], per_prompt: int, out: Path) -> list[Path]:
    from PIL import Image

    from gen_rl.core.grids import labelled_grid, save_labelled_grid
    from gen_rl.core.images import to_uint8

    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for index, sample in enumerate(pixels):
        name = f"prompt-{index // per_prompt:02d}-sample-{index % per_prompt}"
        if sample.ndim == 4:  # video [C, T, H, W]
            from gen_rl.core.video_io import write_mp4

            frames = (sample.permute(1, 2, 3, 0).clamp(0, 1) * 255).round().to(torch.uint8).numpy()
            paths.append(write_mp4(frames, out / f"{name}.mp4"))
        else:
            paths.append(out / f"{name}.png")
            Image.fromarray(to_uint8(sample[None])[0]).save(paths[-1])
    grid = labelled_grid(pixels, prompts)
    paths.append(save_labelled_grid(grid, out / "grid.png"))
    return paths
