"""Start-up checks of everything a run reads or writes, each failing with one line that names the fix.

``gen_rl/train.py`` runs them right after the config validates, in two stages, both before any model loads:

1. ``check_generation_inputs`` / ``check_vlm_inputs`` import neither torch nor a model library: the output
   folder is writable, the tracker is installed, every data file is read whole (every bad record named with its
   line), the model weights exist locally or in the hub cache when the hub cannot be used, and the image size
   fits the model (from its config files only).
2. ``check_registered_names`` imports the reward and sampler registries (and so torch) and checks every reward
   and family name and the reward's keyword arguments against its constructor.

Paths resolve against the working directory (``gen_rl.core.config.resolve_path``); messages show the resolved path.
When ``HF_HUB_OFFLINE=1`` is set, or the hub cannot be reached, hub ids resolve from the local cache only:
``hub_unusable_reason`` then sets ``HF_HUB_OFFLINE=1`` for the rest of the process so that no loader retries a
network that is not there.
"""

from __future__ import annotations

import importlib.util
import json
import os
import tempfile
from pathlib import Path
from typing import Any

from gen_rl.core.config import ConfigError, resolve_path
from gen_rl.core.hub import (
    cached_hub_file,
    check_weights,
    looks_like_local_path,
)
from gen_rl.data import DataError, load_prompts, read_text_lines
from pipelines.families import FAMILIES, TINY_MODELS  # plain data: importing it does not import torch

# tiny models built in code: family and the multiple their image size must be (from pipelines.families)
TINY_GENERATORS = {name: (tiny.family, tiny.image_multiple) for name, tiny in TINY_MODELS.items()}
TRACKER_MODULES = {"tensorboard": ("tensorboard", "tensorboardX"), "wandb": ("wandb",)}


def check_output_dir(path: str, key: str = "log.output_dir") -> Path:
    """The resolved run folder; ConfigError when it (or the folder it would be made in) cannot be written."""
    folder = resolve_path(path)
    existing = folder
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise ConfigError(f"{key} {folder} cannot be made: {existing} is a file; choose another folder")
    try:
        probe = tempfile.mkdtemp(prefix=".gen_rl_write_check_", dir=existing)
    except OSError as error:
        raise ConfigError(
            f"{key} {folder} is not writable ({existing}: {error.strerror}); choose another folder or fix its "
            "permissions"
        ) from error
    os.rmdir(probe)
    return folder


def check_tracker(tracker: str, key: str = "log.tracker") -> None:
    """ConfigError when the tracker's package is not installed (``none`` needs nothing)."""
    modules = TRACKER_MODULES.get(tracker, ())
    if modules and not any(importlib.util.find_spec(module) for module in modules):
        raise ConfigError(
            f"{key} is {tracker!r} but {modules[0]} is not installed; pip install {modules[0]}, or set "
            f"{key}: {'tensorboard' if tracker != 'tensorboard' else 'none'}"
        )


# ----- image size ----------------------------------------------------------------------------------------------
def image_multiple(family: str, pretrained: str) -> int | None:
    """The number image height and width must be multiples of, from the model's config files only.

    VAE scale x the family's latent patch (``pipelines.families.FAMILIES``: FLUX packs 2x2, SD3 reads its
    transformer's patch size, SD's UNet has none). None when unknown (a user family). Where the config files
    are not at hand, the family's ``image_multiple`` (16 for FLUX and SD3, 8 for SD).
    """
    if pretrained in TINY_GENERATORS:
        return TINY_GENERATORS[pretrained][1]
    if family not in FAMILIES:
        return None
    spec = FAMILIES[family]
    vae = _model_config(pretrained, "vae/config.json")
    if vae is None or "block_out_channels" not in vae:
        return spec.image_multiple
    vae_scale = 2 ** (len(vae["block_out_channels"]) - 1)
    patch = spec.patch_size
    if patch is None:
        patch = int((_model_config(pretrained, "transformer/config.json") or {}).get("patch_size", 2))
    return vae_scale * patch


def _model_config(pretrained: str, filename: str) -> dict[str, Any] | None:
    path = resolve_path(pretrained)
    if path.is_dir():
        found: Path | None = path / filename
    elif looks_like_local_path(pretrained):
        found = None
    else:
        found = cached_hub_file(pretrained, filename)
    if found is None or not found.is_file():
        return None
    try:
        return json.loads(found.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def check_image_size(family: str, pretrained: str, height: int | None, width: int | None) -> None:
    """ConfigError when ``sample.height`` / ``sample.width`` is not a multiple the model can generate."""
    multiple = image_multiple(family, pretrained)
    if multiple is None:
        return
    for key, value in (("sample.height", height), ("sample.width", width)):
        if value is not None and value % multiple:
            low, high = value // multiple * multiple, (value // multiple + 1) * multiple
            choices = f"{low} or {high}" if low else str(high)
            raise ConfigError(
                f"{key} is {value}, but {pretrained!r} ({family}) generates sides that are multiples of "
                f"{multiple} (VAE scale x patch size); use {choices}"
            )


# ----- the checks of one run -----------------------------------------------------------------------------------
def check_generation_inputs(config: Any) -> None:
    """Stage 1 for a ``GenerationConfig``: run folder, tracker, prompt files, weights, image size (no torch)."""
    check_output_dir(config.log.output_dir)
    check_tracker(config.log.tracker)
    data = config.data
    load_prompts(data.train_prompts, data.bad_records, "data.train_prompts")
    if data.eval_prompts:
        load_prompts(data.eval_prompts, data.bad_records, "data.eval_prompts")
    model = config.model
    if model.pretrained.startswith("tiny:"):
        _check_tiny(model.pretrained, model.family)
    else:
        check_weights(model.pretrained, "model.pretrained", "model_index.json")
    if config.log.monitors and config.log.diversity_model:
        check_weights(config.log.diversity_model, "log.diversity_model", "config.json")
    check_image_size(model.family, model.pretrained, config.sample.height, config.sample.width)


def _check_tiny(name: str, family: str) -> None:
    if name not in TINY_GENERATORS:
        raise ConfigError(
            f"model.pretrained {name!r} is not a tiny model; use one of {', '.join(TINY_GENERATORS)}"
        )
    expected = TINY_GENERATORS[name][0]
    if expected != family:
        raise ConfigError(
            f"model.pretrained {name!r} is a {expected} model but model.family is {family!r}; "
            f"set model.family: {expected}"
        )


def check_vlm_inputs(config: Any) -> None:
    """Stage 1 for a ``VLMConfig``: run folder, image root, data files, weights, then every JSONL record and image.

    The record check imports ``gen_rl.vlm.data`` (and so torch); everything before it is torch-free.
    """
    check_output_dir(config.log.output_dir)
    data = config.data
    if data.image_root and not resolve_path(data.image_root).is_dir():
        raise DataError(
            f"data.image_root {resolve_path(data.image_root)} is not a folder; fix the path (relative paths "
            "start at the working directory)"
        )
    files = {
        f"data.stages[{index}].files[{file_index}]": path
        for index, stage in enumerate(data.stages)
        for file_index, path in enumerate(stage.files)
    }
    for key, path in files.items():
        if not resolve_path(path).is_file():
            read_text_lines(resolve_path(path), "data file", key)  # raises the message for a missing file
    if not config.model.name_or_path.startswith("builtin:"):
        check_weights(config.model.name_or_path, "model.name_or_path", "config.json")
    from gen_rl.vlm.data import read_checked_records

    for key, path in files.items():
        read_checked_records(path, data.image_root, data.bad_records, key)


def check_registered_names(config: Any) -> None:
    """Stage 2 (imports torch, loads nothing): generation family, reward names and kwargs; VLM reward names."""
    if config.task == "vlm":
        _check_vlm_reward_names(config)
        return
    from gen_rl.core.registry import resolve
    from pipelines import SAMPLERS
    from rewards.base import REWARDS, Reward, _check_arguments, check_reward_sources

    try:
        resolve(SAMPLERS, config.model.family, "model family")
    except ValueError as error:
        raise ConfigError(f"model.family: {error}") from error
    terms = [(f"reward.terms[{i}]", term) for i, term in enumerate(config.reward.terms)]
    terms += [(f"eval.gold[{i}]", term) for i, term in enumerate(config.eval.gold)]
    for key, term in terms:
        try:
            reward_class = resolve(REWARDS, term.name, "reward")
            if not (isinstance(reward_class, type) and issubclass(reward_class, Reward)):
                raise TypeError(f"{term.name!r} resolves to {reward_class!r}, which is not a Reward subclass")
            _check_arguments(reward_class, term.name, term.kwargs)
            check_reward_sources(reward_class, term.kwargs, key)
        except ConfigError:
            raise  # already names its key
        except (TypeError, ValueError) as error:
            raise ConfigError(f"{key}: {error}") from error


def _check_vlm_reward_names(config: Any) -> None:
    from gen_rl.vlm.scoring import build_reward_functions

    for index, spec in enumerate(config.reward.terms):
        try:
            build_reward_functions([spec])
        except (TypeError, ValueError) as error:
            raise ConfigError(f"reward.terms[{index}]: {error}") from error
