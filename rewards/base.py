"""The reward protocol: ``Reward`` subclasses score decoded samples; ``build_reward`` makes one by name.

A reward builds its heavy state (models, palettes) once in ``__init__`` from config keyword arguments and
implements ``score``. Calling the reward checks the input (pixels in [0, 1], the rank of its modality, one
prompt and one metadata record per sample) and the output (scores ``[B]`` float32 on the CPU). A score of
NaN means "no score for this sample": the trainer drops it and counts it. Samples whose pixels are not all
finite (a diverged decode) are scored NaN by ``__call__`` itself.

Three optional abilities, each declared by the reward (all off by default, so every older reward and every
plain callable ``(pixels, prompts, metadata) -> RewardOutput`` keeps working unchanged):

- **group ids**: a reward whose ``score`` takes a ``group_ids`` parameter (``[B]`` int64: samples of one
  prompt share an id) gets them; ``uses_group_ids`` is set from that signature. The trainer scores through
  :func:`score_reward`, which passes group ids only to rewards that take them. A process holds whole groups.
- **learning**: a :class:`LearningReward` (``learns = True``) gets :func:`update_reward` once per training
  step, after scoring, with a :class:`RewardUpdate` (this process's samples, their scores and a ``gather``
  across processes so every process keeps identical state), and has ``state_dict`` / ``load_state_dict``
  (tensors and plain values) that the trainer saves with its other stateful parts. A learned state that
  turns non-finite raises one line (:func:`check_reward_state`).
- **differentiable**: ``differentiable = True`` promises scores that keep the autograd graph to the pixels
  (reward backprop); ``__call__`` passes gradients through its [0, 1] clamp unchanged.
"""

from __future__ import annotations

import inspect
import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
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
    """A scalar reward per sample. Subclasses set ``modality`` and implement ``score``.

    ``score(pixels, prompts, metadata)``, or ``score(pixels, prompts, metadata, group_ids)`` for a reward
    that compares the members of a group (``uses_group_ids`` follows from that signature).
    """

    modality: ClassVar[str] = "image"  # "image": pixels [B, C, H, W]; "video": pixels [B, C, T, H, W]
    uses_group_ids: ClassVar[bool] = False  # set from ``score``'s signature (a ``group_ids`` parameter)
    learns: ClassVar[bool] = False  # True: a LearningReward (update hook, state_dict / load_state_dict)
    differentiable: ClassVar[bool] = False  # True: scores keep the autograd graph to the pixels

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        takes_group_ids = "group_ids" in inspect.signature(cls.score).parameters
        if cls.__dict__.get("uses_group_ids") and not takes_group_ids:
            raise TypeError(
                f"{cls.__name__} sets uses_group_ids but its score() has no group_ids parameter; write "
                "score(self, pixels, prompts, metadata, group_ids)"
            )
        cls.uses_group_ids = takes_group_ids

    @abstractmethod
    def score(self, pixels: Tensor, prompts: list[str], metadata: list[dict]) -> RewardOutput:
        """Scores ``[B]`` for ``pixels`` in [0, 1] (all finite) with their prompts and metadata records."""

    def __call__(
        self,
        pixels: Tensor,
        prompts: Sequence[str],
        metadata: Sequence[dict] | None = None,
        group_ids: Tensor | None = None,
    ) -> RewardOutput:
        """Validate the batch, call ``score`` and return scores ``[B]`` float32 on the CPU.

        ``metadata`` None or empty means no metadata (one empty record per sample), as in ``Rollout``.
        ``group_ids`` ``[B]`` reach ``score`` only when it takes them (then they are required).
        """
        name = type(self).__name__
        check_pixels(pixels, self.modality, name)
        batch = pixels.shape[0]
        prompts, metadata = per_sample_text(prompts, metadata, batch, name)
        groups = None if group_ids is None else check_group_ids(group_ids, batch, name, pixels.device)
        finite = torch.isfinite(pixels).flatten(1).all(dim=1).cpu()
        cleaned = clean_pixels(pixels)
        if self.uses_group_ids:
            if groups is None:
                raise ValueError(
                    f"{name} compares the samples of a group and needs group_ids [B]; call it through "
                    "rewards.base.score_reward(reward, pixels, prompts, metadata, group_ids)"
                )
            output = self.score(cleaned, prompts, metadata, group_ids=groups)  # type: ignore[call-arg]
        else:
            output = self.score(cleaned, prompts, metadata)
        return _checked_output(output, batch, finite, name)


class _ClampKeepingGradient(torch.autograd.Function):
    """Clamp to [0, 1] in the forward pass, identity in the backward pass (pixels sit within tolerance)."""

    @staticmethod
    def forward(ctx: Any, pixels: Tensor) -> Tensor:
        return pixels.clamp(0.0, 1.0)

    @staticmethod
    def backward(ctx: Any, gradient: Tensor) -> Tensor:
        return gradient


def clean_pixels(pixels: Tensor) -> Tensor:
    """Pixels with NaN / -inf as 0 and +inf as 1, clamped to [0, 1]; the gradient passes the clamp unchanged."""
    safe = torch.nan_to_num(pixels, nan=0.0, posinf=1.0, neginf=0.0)  # gradient 0 at non-finite entries
    return _ClampKeepingGradient.apply(safe) if safe.requires_grad else safe.clamp(0.0, 1.0)


def check_group_ids(group_ids: Any, batch: int, owner: str, device: torch.device | None = None) -> Tensor:
    """``group_ids`` as a ``[B]`` int64 tensor on ``device`` (the pixels'), or ``ValueError`` naming the problem."""
    if not isinstance(group_ids, Tensor) or group_ids.is_floating_point() or group_ids.is_complex():
        kind = f"{group_ids.dtype} tensor" if isinstance(group_ids, Tensor) else type(group_ids).__name__
        raise ValueError(f"{owner} takes group_ids as an integer tensor [B={batch}]; got a {kind}")
    if group_ids.shape != (batch,):
        raise ValueError(
            f"{owner} got group_ids of shape {tuple(group_ids.shape)}; give one id per sample [B={batch}]"
        )
    return group_ids.to(device=device or "cpu", dtype=torch.int64)


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


# ----- scoring with group ids, learning rewards ---------------------------------------------------------------
def wants_group_ids(reward: Any) -> bool:
    """Whether ``reward`` takes group ids: a ``Reward`` whose ``score`` has a ``group_ids`` parameter, or a
    plain callable with ``uses_group_ids = True`` or a ``group_ids`` parameter."""
    if isinstance(reward, Reward):
        return reward.uses_group_ids
    if getattr(reward, "uses_group_ids", False):
        return True
    try:
        return "group_ids" in inspect.signature(reward).parameters
    except (TypeError, ValueError):  # a builtin without a signature
        return False


def score_reward(
    reward: Reward | Callable[..., RewardOutput],
    pixels: Tensor,
    prompts: Sequence[str],
    metadata: Sequence[dict] | None = None,
    group_ids: Tensor | None = None,
) -> RewardOutput:
    """Score a batch with any reward: a ``Reward`` or a plain callable ``(pixels, prompts, metadata)``.

    The one call the trainers make. ``group_ids`` ``[B]`` (samples of one prompt share an id) are passed only
    to rewards that take them (:func:`wants_group_ids`). A plain callable's output is checked like a
    ``Reward``'s: scores ``[B]`` float32 on the CPU, NaN where the sample's pixels were not all finite.
    """
    if isinstance(reward, Reward):
        if reward.uses_group_ids:
            return reward(pixels, prompts, metadata, group_ids=group_ids)
        return reward(pixels, prompts, metadata)
    name = getattr(reward, "__name__", type(reward).__name__)
    if not callable(reward):
        raise TypeError(f"a reward must be a Reward or a callable (pixels, prompts, metadata); got {name}")
    batch = pixels.shape[0]
    records = metadata if metadata else [{} for _ in range(batch)]
    if wants_group_ids(reward):
        if group_ids is None:
            raise ValueError(f"reward {name} takes group_ids; pass group_ids [B] to score_reward")
        output = reward(
            pixels, prompts, records, group_ids=check_group_ids(group_ids, batch, name, pixels.device)
        )
    else:
        output = reward(pixels, prompts, records)
    finite = torch.isfinite(pixels.detach()).flatten(1).all(dim=1).cpu()
    return _checked_output(output, batch, finite, name)


def _identity(tensor: Tensor) -> Tensor:
    return tensor


@dataclass
class RewardUpdate:
    """What a learning reward learns from in one training step: this process's samples and their scores.

    ``gather(tensor)`` concatenates ``tensor`` along dim 0 over all processes in rank order (the identity on
    one process); every process calls it with the same shapes in the same order, so that every process can
    apply the same update and keep identical state. :func:`update_reward` fills ``valid`` and hands the
    reward detached, cleaned pixels.
    """

    pixels: Tensor  # [B, C, H, W] or video [B, C, T, H, W], in [0, 1]
    prompts: list[str]
    metadata: list[dict]
    group_ids: Tensor  # [B] int64 (on the pixels' device), samples of one prompt share an id (whole groups)
    scores: Tensor  # [B] float32, this reward's scores of these samples (NaN: no score)
    gather: Callable[[Tensor], Tensor] = _identity
    step: int = 0  # the training step
    valid: Tensor | None = None  # [B] bool: pixels all finite (set by update_reward)


class RewardStateError(ValueError):
    """A learning reward's state is not finite (or does not fit the reward); the message names the key."""


class LearningReward(Reward):
    """A reward that learns during training: ``update`` once per step, state saved with the run.

    ``update`` must be deterministic given the same updates and must use ``batch.gather`` for anything it
    learns from other processes' samples, so that all processes keep identical state. ``state_dict`` returns
    tensors and plain values (``torch.load(weights_only=True)`` reads it back); after ``load_state_dict``
    the reward scores and updates exactly as the one that saved it.
    """

    learns: ClassVar[bool] = True

    @abstractmethod
    def update(self, batch: RewardUpdate) -> dict[str, float]:
        """Learn from one step's samples; returns statistics to log (name -> float)."""

    @abstractmethod
    def state_dict(self) -> dict[str, Any]:
        """Everything learned so far, as tensors and plain values."""

    @abstractmethod
    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore what ``state_dict`` returned; raise ``RewardStateError`` when it does not fit."""


def reward_learns(reward: Any) -> bool:
    """Whether ``reward`` declares ``learns = True``; such a reward must have update / state hooks."""
    if not getattr(reward, "learns", False):
        return False
    missing = [
        hook
        for hook in ("update", "state_dict", "load_state_dict")
        if not callable(getattr(reward, hook, None))
    ]
    if missing:
        raise TypeError(
            f"{type(reward).__name__} declares learns = True but has no {', '.join(missing)}; subclass "
            "rewards.base.LearningReward"
        )
    return True


def update_reward(reward: Any, batch: RewardUpdate, name: str | None = None) -> dict[str, float]:
    """Call a learning reward's ``update`` with a checked batch; ``{}`` for a reward that does not learn.

    The trainer calls this once per training step on every process, after scoring, for every reward it
    optimises. The reward sees detached pixels cleaned like ``__call__`` and ``batch.valid`` (pixels all
    finite); ``update`` runs with autograd enabled (a learned head can take optimizer steps) even when the
    caller is under ``torch.no_grad``. Raises ``RewardStateError`` when the state is not finite afterwards.
    """
    if not reward_learns(reward):
        return {}
    name = name or type(reward).__name__
    modality = getattr(reward, "modality", "image")
    check_pixels(batch.pixels, modality, name)
    size = batch.pixels.shape[0]
    prompts, metadata = per_sample_text(batch.prompts, batch.metadata, size, name)
    scores = _as_batch_vector(batch.scores.detach(), size, f"{name} update scores")
    pixels = batch.pixels.detach()
    checked = replace(
        batch,
        pixels=clean_pixels(pixels),
        prompts=prompts,
        metadata=metadata,
        group_ids=check_group_ids(batch.group_ids, size, name, pixels.device),
        scores=scores,
        valid=torch.isfinite(pixels).flatten(1).all(dim=1).cpu(),
    )
    with torch.enable_grad():  # a reward may train a head even when the trainer scores under no_grad
        stats = reward.update(checked)
    check_reward_state(reward.state_dict(), f"reward {name!r} after its update at step {batch.step}")
    return {key: float(value) for key, value in (stats or {}).items()}


def check_reward_state(state: Mapping[str, Any], what: str) -> None:
    """``RewardStateError`` naming the first key whose tensor or number is NaN / inf (nested dicts, lists)."""
    for key, value in _flat_items(state):
        if isinstance(value, Tensor) and (value.is_floating_point() or value.is_complex()):
            bad = int((~torch.isfinite(value.detach())).sum())
            if bad:
                raise RewardStateError(
                    f"{what}: learned state {key!r} has {bad} of {value.numel()} values NaN / inf, so its "
                    "scores would be NaN from now on; fix the reward's update (the last checkpoint is intact)"
                )
        elif isinstance(value, float) and not math.isfinite(value):
            raise RewardStateError(
                f"{what}: learned state {key!r} is {value}; fix the reward's update (the last checkpoint is intact)"
            )


def _flat_items(value: Any, prefix: str = "") -> list[tuple[str, Any]]:
    if isinstance(value, Mapping):
        return [item for key, inner in value.items() for item in _flat_items(inner, f"{prefix}{key}.")]
    if isinstance(value, (list, tuple)):
        return [item for index, inner in enumerate(value) for item in _flat_items(inner, f"{prefix}{index}.")]
    return [(prefix[:-1], value)]


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
    if getattr(reward_class, "learns", False) or getattr(reward_class, "uses_group_ids", False):
        ability = "learns" if getattr(reward_class, "learns", False) else "compares the samples of a group"
        raise ValueError(
            f"{owner} cannot wrap {reward_class.__name__}: it {ability}, which {owner} does not pass on; use it "
            "as a reward term of its own"
        )
    inner_modality = getattr(reward, "modality", getattr(reward_class, "modality", None))
    if modality is not None and inner_modality != modality:
        raise ValueError(
            f"{owner} applies {modality} rewards only; {reward_class.__name__} is a {inner_modality} reward "
            f"(pixels {MODALITY_LAYOUTS.get(inner_modality, '?')}); use it directly instead"
        )
    return reward if isinstance(reward, Reward) else build_reward(reward, **(kwargs or {}))


def check_reward_sources(reward_class: type, kwargs: Mapping[str, Any], key: str) -> None:
    """``MissingWeightsError`` (one line) when a model a reward will load is not there; loads nothing.

    A reward declares ``weight_sources = {argument: marker file}`` (e.g. ``{"model": "config.json"}``); each
    such argument given in ``kwargs`` (or its default) must be a local folder holding the marker, or a hub id
    that is reachable or cached. For start-up checks before the first rollout; ``key`` names the config entry.
    """
    from gen_rl.core.hub import check_weights

    defaults = inspect.signature(reward_class.__init__).parameters
    for argument, marker in getattr(reward_class, "weight_sources", {}).items():
        source = kwargs.get(argument)
        if source is None and argument in defaults:
            default = defaults[argument].default
            source = None if default is inspect.Parameter.empty else default
        if isinstance(source, str) and source:
            check_weights(source, f"{key}.kwargs.{argument}", marker)


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
