"""The reward protocol: ``Reward`` subclasses score decoded samples; ``build_reward`` makes one by name.

A reward builds its heavy state (models, palettes) once in ``__init__`` from config keyword arguments and
implements ``score``. Calling the reward checks the input (pixels in [0, 1], the rank of its modality, one
prompt and one metadata record per sample) and the output (scores ``[B]`` float32 on the CPU). A score of
NaN means "no score for this sample": the trainer drops it and counts it. Samples whose pixels are not all
finite (a diverged decode) are scored NaN by ``__call__`` itself.
"""

from __future__ import annotations

import inspect
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, TypeVar

import torch
from torch import Tensor

from gen_rl.core.registry import resolve

PIXEL_TOLERANCE = 1e-4
MODALITY_LAYOUTS = {"image": "[B, C, H, W]", "video": "[B, C, T, H, W]"}
MODALITY_RANKS = {"image": 4, "video": 5}


@dataclass
class RewardOutput:
    """Per-sample scores and optional per-sample diagnostics (logged by the trainer)."""

    scores: Tensor  # [B] float32, NaN = no score for that sample
    components: dict[str, Tensor] = field(default_factory=dict)  # extra [B] diagnostics, e.g. "jpeg_kb"


class Reward(ABC):
    """A scalar reward per sample. Subclasses set ``modality`` and implement ``score``."""

    modality: ClassVar[str] = "image"  # "image": pixels [B, C, H, W]; "video": pixels [B, C, T, H, W]

    @abstractmethod
    def score(self, pixels: Tensor, prompts: list[str], metadata: list[dict]) -> RewardOutput:
        """Scores ``[B]`` for ``pixels`` in [0, 1] (all finite) with their prompts and metadata records."""

    def __call__(
        self, pixels: Tensor, prompts: Sequence[str], metadata: Sequence[dict] | None = None
    ) -> RewardOutput:
        """Validate the batch, call ``score`` and return scores ``[B]`` float32 on the CPU.

        ``metadata`` None or empty means no metadata (one empty record per sample), as in ``Rollout``.
        """
        check_pixels(pixels, self.modality, type(self).__name__)
        batch = pixels.shape[0]
        prompts, metadata = per_sample_text(prompts, metadata, batch, type(self).__name__)
        finite = torch.isfinite(pixels).flatten(1).all(dim=1).cpu()
        cleaned = torch.nan_to_num(pixels, nan=0.0, posinf=1.0, neginf=0.0).clamp(0.0, 1.0)
        output = self.score(cleaned, prompts, metadata)
        return _checked_output(output, batch, finite, type(self).__name__)


def per_sample_text(
    prompts: Sequence[str], metadata: Sequence[dict] | None, batch: int, owner: str
) -> tuple[list[str], list[dict]]:
    """Prompts and metadata records as lists of ``batch`` (None / empty metadata: one empty record each)."""
    prompts = list(prompts)
    records = [{} for _ in range(batch)] if not metadata else [dict(record) for record in metadata]
    if len(prompts) != batch or len(records) != batch:
        raise ValueError(
            f"{owner} got {batch} samples, {len(prompts)} prompts and {len(records)} metadata records; give "
            "one prompt and one metadata record per sample"
        )
    return prompts, records


def check_pixels(pixels: Tensor, modality: str, reward_name: str) -> None:
    """Raise ``ValueError`` unless ``pixels`` is a float tensor in [0, 1] with the rank of ``modality``."""
    if modality not in MODALITY_RANKS:
        raise ValueError(f"{reward_name}.modality must be one of {sorted(MODALITY_RANKS)}; got {modality!r}")
    if not isinstance(pixels, Tensor) or not pixels.is_floating_point():
        kind = f"{pixels.dtype} tensor" if isinstance(pixels, Tensor) else type(pixels).__name__
        raise ValueError(f"{reward_name} takes pixels as a float tensor in [0, 1]; got a {kind}")
    expected = MODALITY_RANKS[modality]
    if pixels.ndim != expected:
        other = {rank: name for name, rank in MODALITY_RANKS.items()}.get(pixels.ndim)
        given = f"{other} pixels {MODALITY_LAYOUTS[other]}" if other else f"{pixels.ndim} dimensions"
        raise ValueError(
            f"{reward_name} is a {modality} reward and takes pixels {MODALITY_LAYOUTS[modality]}; got "
            f"{given} of shape {tuple(pixels.shape)}"
        )
    finite = pixels[torch.isfinite(pixels)]
    if finite.numel() and (finite.min() < -PIXEL_TOLERANCE or finite.max() > 1 + PIXEL_TOLERANCE):
        raise ValueError(
            f"{reward_name} got pixel values in [{finite.min().item():.4g}, {finite.max().item():.4g}]; pass "
            "pixels in [0, 1] (divide uint8 images by 255; map [-1, 1] decoder output with (x + 1) / 2)"
        )


def _checked_output(output: RewardOutput, batch: int, finite: Tensor, reward_name: str) -> RewardOutput:
    """Scores and components as ``[B]`` float32 CPU tensors, NaN where the input was not finite."""
    if not isinstance(output, RewardOutput):
        raise TypeError(f"{reward_name}.score must return a RewardOutput; got {type(output).__name__}")
    scores = _as_batch_vector(output.scores, batch, f"{reward_name} scores")
    components = {
        name: _as_batch_vector(value, batch, f"{reward_name} component {name!r}")
        for name, value in output.components.items()
    }
    if not bool(finite.all()):
        scores = scores.masked_fill(~finite, float("nan"))
        components = {name: value.masked_fill(~finite, float("nan")) for name, value in components.items()}
    return RewardOutput(scores=scores, components=components)


def _as_batch_vector(values: Any, batch: int, what: str) -> Tensor:
    if not isinstance(values, Tensor):
        raise TypeError(f"{what} must be a tensor [B={batch}]; got {type(values).__name__}")
    if values.shape != (batch,):
        raise ValueError(f"{what} must have shape [B={batch}]; got {tuple(values.shape)}")
    return values.to(device="cpu", dtype=torch.float32)


def deduplicate(prompts: Sequence[str]) -> tuple[list[str], list[int]]:
    """The distinct prompts in first-seen order, and each prompt's row among them (a group shares one)."""
    row_of: dict[str, int] = {}
    rows = [row_of.setdefault(prompt, len(row_of)) for prompt in prompts]
    return list(row_of), rows


# ----- registry ----------------------------------------------------------------------------------------------
REWARDS: dict[str, type[Reward]] = {}
RewardClass = TypeVar("RewardClass", bound=type[Reward])


def register_reward(*names: str) -> Callable[[RewardClass], RewardClass]:
    """Class decorator adding a ``Reward`` subclass to ``REWARDS`` under each of ``names`` (name, aliases)."""

    def register(reward_class: RewardClass) -> RewardClass:
        for name in names:
            if name in REWARDS and REWARDS[name] is not reward_class:
                raise ValueError(f"reward name {name!r} is already taken by {REWARDS[name].__name__}")
            REWARDS[name] = reward_class
        return reward_class

    return register


def build_reward(name: str, **kwargs: Any) -> Reward:
    """The reward registered as ``name`` (or a ``package.module:Class`` path) built with config ``kwargs``."""
    reward_class = resolve(REWARDS, name, "reward")
    if not (isinstance(reward_class, type) and issubclass(reward_class, Reward)):
        raise TypeError(f"reward {name!r} resolves to {reward_class!r}, which is not a Reward subclass")
    _check_arguments(reward_class, name, kwargs)
    return reward_class(**kwargs)


def build_inner_reward(
    reward: str | Reward, kwargs: dict[str, Any] | None, owner: str, modality: str | None = None
) -> Reward:
    """The reward a wrapper (``owner``) applies: ``reward`` itself, or built by name / dotted path with ``kwargs``.

    With ``modality``, a reward of another modality is refused before anything is built (no model loads).
    """
    if isinstance(reward, Reward):
        if kwargs:
            raise ValueError(f"{owner}: give kwargs only with a reward name, not a built Reward")
        reward_class: type = type(reward)
    elif isinstance(reward, str):
        reward_class = resolve(REWARDS, reward, "reward")
    else:
        raise TypeError(f"{owner}: reward must be a reward name or a Reward; got {type(reward).__name__}")
    inner_modality = getattr(reward, "modality", getattr(reward_class, "modality", None))
    if modality is not None and inner_modality != modality:
        raise ValueError(
            f"{owner} applies {modality} rewards only; {reward_class.__name__} is a {inner_modality} reward "
            f"(pixels {MODALITY_LAYOUTS.get(inner_modality, '?')}); use it directly instead"
        )
    return reward if isinstance(reward, Reward) else build_reward(reward, **(kwargs or {}))


def _check_arguments(reward_class: type[Reward], name: str, kwargs: dict[str, Any]) -> None:
    """TypeError naming the reward and its accepted arguments when ``kwargs`` do not fit ``__init__``."""
    signature = inspect.signature(reward_class.__init__)
    try:
        signature.bind(None, **kwargs)
    except TypeError as error:
        variadic = (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)
        accepted = [p.name for p in list(signature.parameters.values())[1:] if p.kind not in variadic]
        listed = ", ".join(accepted) if accepted else "no arguments"
        raise TypeError(
            f"reward {name!r} ({reward_class.__name__}): {error}. It accepts: {listed}"
        ) from error
