"""Group-relative advantage estimation for GRPO-family training.

The functions here are unit-agnostic: an advantage is one number per *sample* (an image / video generated
from a prompt, or a VLM completion) and is later broadcast over that sample's units (trained denoising
steps or completion tokens) by :mod:`gen_rl.core.losses`.

References
----------
* DDPO (Black et al., 2023): per-prompt running reward statistics (:class:`PerPromptStatTracker`).
* GRPO / DeepSeekMath (Shao et al., 2024): group-relative advantage ``(r - mean_g) / std_g``.
* Dr.GRPO (Liu et al., 2025): drop the std normalisation (``std_mode="none"``).
* Flow-GRPO (Liu et al., 2025): per-group mean with a batch-global std (``std_mode="global"``).

Standard deviations are population standard deviations (``ddof=0``, as ``np.std``: GRPO, Flow-GRPO) unless
``ddof=1`` asks for the sample std (``torch.std``'s default, used by DanceGRPO's ``group_rewards.std() + 1e-8``).
Non-finite rewards (NaN = "no score") are excluded from every statistic and receive advantage exactly 0.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "STD_MODES",
    "COMBINE_MODES",
    "AdvantageOutput",
    "group_advantages",
    "PerPromptStatTracker",
    "combine_rewards",
]

STD_MODES = ("group", "global", "none")
COMBINE_MODES = ("sum_then_normalize", "normalize_then_sum")


@dataclass
class AdvantageOutput:
    """Result of a group-advantage computation.

    Attributes:
        advantages: float32 ``[N]`` advantage per sample.
        num_groups: number of distinct group ids in the batch.
        num_zero_std_groups: groups whose finite rewards are all equal (max == min), including groups with
            no finite reward at all; every sample of such a group gets advantage exactly 0.
        num_invalid: samples with a non-finite reward; excluded from statistics, advantage exactly 0.
    """

    advantages: Tensor
    num_groups: int
    num_zero_std_groups: int
    num_invalid: int


@dataclass
class _GroupStatistics:
    """Per-group statistics over finite rewards (internal)."""

    group_index: Tensor  # [N] long: index of each sample's group in 0..G-1
    is_valid: Tensor  # [N] bool: reward is finite
    rewards_clean: Tensor  # [N] rewards with non-finite entries replaced by 0 (compute dtype)
    group_mean: Tensor  # [G]
    group_var: Tensor  # [G] population variance
    group_is_zero_std: Tensor  # [G] bool: max == min over finite rewards, or no finite reward


def _compute_dtype(device: torch.device) -> torch.dtype:
    # float64 for accurate statistics wherever the backend supports it.
    return torch.float32 if device.type == "mps" else torch.float64


def _check_1d_pair(rewards: Tensor, group_ids: Tensor) -> None:
    if rewards.dim() != 1:
        raise ValueError(
            f"rewards must be 1-D [N] (one scalar reward per sample), got shape {tuple(rewards.shape)}; "
            "flatten or reduce the reward before computing advantages."
        )
    if group_ids.dim() != 1:
        raise ValueError(
            f"group_ids must be 1-D [N] (one group id per sample), got shape {tuple(group_ids.shape)}."
        )
    if rewards.shape[0] != group_ids.shape[0]:
        raise ValueError(
            f"mismatched batch/group sizes: rewards has {rewards.shape[0]} entries but group_ids has "
            f"{group_ids.shape[0]}; pass exactly one group id per reward (gather both from all processes "
            "in the same order)."
        )


def _group_statistics(rewards: Tensor, group_ids: Tensor, ddof: int = 0) -> _GroupStatistics:
    """Vectorised per-group mean / variance (divisor ``count - ddof``) / zero-spread flags over finite rewards."""
    dtype = _compute_dtype(rewards.device)
    rewards_c = rewards.detach().to(dtype)
    is_valid = torch.isfinite(rewards_c)
    rewards_clean = torch.where(is_valid, rewards_c, torch.zeros_like(rewards_c))

    _, group_index = torch.unique(group_ids.to(rewards.device), return_inverse=True)
    num_groups = int(group_index.max().item()) + 1 if group_index.numel() > 0 else 0

    valid_f = is_valid.to(dtype)
    group_count = torch.zeros(num_groups, dtype=dtype, device=rewards.device).index_add_(
        0, group_index, valid_f
    )
    group_sum = torch.zeros_like(group_count).index_add_(0, group_index, rewards_clean)
    safe_count = torch.where(group_count > 0, group_count, torch.ones_like(group_count))
    group_mean = group_sum / safe_count

    centered = torch.where(is_valid, rewards_clean - group_mean[group_index], torch.zeros_like(rewards_c))
    divisor = group_count - ddof
    safe_divisor = torch.where(divisor > 0, divisor, torch.ones_like(divisor))
    group_var = torch.zeros_like(group_count).index_add_(0, group_index, centered.square()) / safe_divisor

    inf = torch.full_like(rewards_c, float("inf"))
    group_max = torch.full_like(group_count, -float("inf")).scatter_reduce(
        0, group_index, torch.where(is_valid, rewards_c, -inf), reduce="amax", include_self=True
    )
    group_min = torch.full_like(group_count, float("inf")).scatter_reduce(
        0, group_index, torch.where(is_valid, rewards_c, inf), reduce="amin", include_self=True
    )
    group_is_zero_std = (group_max == group_min) | (group_count == 0) | (divisor <= 0)
    return _GroupStatistics(group_index, is_valid, rewards_clean, group_mean, group_var, group_is_zero_std)


def _validate_advantage_args(std_mode: str, eps: float, clip: float | None, ddof: int = 0) -> None:
    if ddof not in (0, 1):
        raise ValueError(f"ddof must be 0 (population std) or 1 (sample std), got {ddof}.")
    if std_mode not in STD_MODES:
        raise ValueError(f"unknown std_mode {std_mode!r}; valid options are {list(STD_MODES)}.")
    if not eps >= 0:
        raise ValueError(f"eps must be >= 0 (it is added to the std to avoid division by zero), got {eps}.")
    if clip is not None and not clip > 0:
        raise ValueError(f"clip must be a positive number or None (no clipping), got {clip}.")


def _advantages_from_stats(stats: _GroupStatistics, *, std_mode: str, eps: float, ddof: int = 0) -> Tensor:
    """A_i = (r_i - mean_g) / (std + eps) in the compute dtype; zero-std groups / invalid samples -> 0."""
    centered = stats.rewards_clean - stats.group_mean[stats.group_index]
    if std_mode == "group":
        advantages = centered / (stats.group_var.sqrt()[stats.group_index] + eps)
    elif std_mode == "global":
        valid_rewards = stats.rewards_clean[stats.is_valid]
        global_std = (
            valid_rewards.std(correction=ddof) if valid_rewards.numel() > ddof else centered.new_zeros(())
        )
        advantages = centered / (global_std + eps)
    else:  # "none": Dr.GRPO, mean-centred only
        advantages = centered
    keep = stats.is_valid & ~stats.group_is_zero_std[stats.group_index]
    return torch.where(keep, advantages, torch.zeros_like(advantages))


def group_advantages(
    rewards: Tensor,
    group_ids: Tensor,
    *,
    std_mode: str = "group",
    eps: float = 1e-4,
    clip: float | None = None,
    ddof: int = 0,
) -> AdvantageOutput:
    """Group-relative advantages ``A_i = (r_i - mean_g) / (std + eps)`` (GRPO, DeepSeekMath eq. 3 style).

    Args:
        rewards: ``[N]`` scalar reward per sample (already gathered from every process); NaN/inf = no score.
        group_ids: ``[N]`` group id per sample (e.g. prompt index); samples sharing an id form a group.
        std_mode: ``"group"`` (GRPO: population std of the group), ``"global"`` (Flow-GRPO: population std of
            all finite rewards in the batch, mean still per group) or ``"none"`` (Dr.GRPO: ``A = r - mean``).
        eps: added to the std (ignored for ``"none"``).
        clip: if given, advantages are clamped to ``[-clip, clip]`` (DanceGRPO uses 5).
        ddof: 0 for the population std (GRPO, Flow-GRPO), 1 for the sample std (DanceGRPO).

    Returns:
        :class:`AdvantageOutput`; groups whose finite rewards are all equal and samples with non-finite
        rewards get advantage exactly 0 and are counted.
    """
    rewards = torch.as_tensor(rewards)
    group_ids = torch.as_tensor(group_ids)
    _check_1d_pair(rewards, group_ids)
    _validate_advantage_args(std_mode, eps, clip, ddof)

    stats = _group_statistics(rewards, group_ids, ddof)
    return _advantage_output(
        _advantages_from_stats(stats, std_mode=std_mode, eps=eps, ddof=ddof), stats, clip
    )


class PerPromptStatTracker:
    """DDPO per-prompt running reward statistics (Black et al., 2023, "per-prompt stat tracking").

    For each prompt a history of its last ``buffer_size`` finite rewards is kept. On :meth:`update` the
    batch's finite rewards are appended first; then a prompt whose history holds fewer than ``min_count``
    rewards is normalised with the mean / population std of the whole current batch, otherwise with those of
    its history: ``A = (r - mean) / (std + eps)``. Non-finite rewards are not recorded and get advantage 0.
    """

    def __init__(self, buffer_size: int = 32, min_count: int = 16, eps: float = 1e-6) -> None:
        self._check_config(buffer_size, min_count, eps)
        self.buffer_size = int(buffer_size)
        self.min_count = int(min_count)
        self.eps = float(eps)
        self._history: dict[str, deque[float]] = {}

    @staticmethod
    def _check_config(buffer_size: int, min_count: int, eps: float) -> None:
        if buffer_size < 1:
            raise ValueError(f"buffer_size must be >= 1, got {buffer_size}.")
        if min_count < 1:
            raise ValueError(f"min_count must be >= 1, got {min_count}.")
        if min_count > buffer_size:
            raise ValueError(
                f"min_count ({min_count}) > buffer_size ({buffer_size}): a prompt's history could never "
                "reach min_count, so per-prompt statistics would never be used; raise buffer_size or lower "
                "min_count."
            )
        if not eps >= 0:
            raise ValueError(f"eps must be >= 0, got {eps}.")

    def __len__(self) -> int:
        """Number of prompts with a recorded history."""
        return len(self._history)

    def update(self, prompts: Sequence[str], rewards: Tensor) -> Tensor:
        """Record ``rewards`` under ``prompts``; return DDPO-normalised advantages ``[N]`` (float32)."""
        rewards = torch.as_tensor(rewards)
        prompts = list(prompts)
        if rewards.dim() != 1:
            raise ValueError(f"rewards must be 1-D [N], got shape {tuple(rewards.shape)}.")
        if len(prompts) != rewards.shape[0]:
            raise ValueError(
                f"mismatched batch/group sizes: {len(prompts)} prompts but {rewards.shape[0]} rewards; "
                "pass one prompt string per reward."
            )
        rewards_np = rewards.detach().to("cpu", torch.float64).numpy()
        advantages_np = np.zeros_like(rewards_np)
        if len(prompts) == 0:
            return torch.zeros(0, dtype=torch.float32, device=rewards.device)

        is_valid = np.isfinite(rewards_np)
        batch_valid = rewards_np[is_valid]
        batch_mean, batch_std = 0.0, 0.0
        if batch_valid.size > 0:
            batch_mean, batch_std = float(batch_valid.mean()), float(batch_valid.std())
        first_index: dict[str, int] = {}  # prompt -> dense index, in order of first appearance
        prompt_index = np.fromiter(
            (first_index.setdefault(str(p), len(first_index)) for p in prompts),
            dtype=np.int64,
            count=len(prompts),
        )

        for k, prompt in enumerate(first_index):
            sample_idx = np.nonzero((prompt_index == k) & is_valid)[0]
            if sample_idx.size == 0:
                continue  # nothing finite to record or normalise for this prompt
            prompt_rewards = rewards_np[sample_idx]
            history = self._history.setdefault(prompt, deque(maxlen=self.buffer_size))
            history.extend(prompt_rewards.tolist())
            if len(history) < self.min_count:
                mean, std = batch_mean, batch_std
            else:
                history_np = np.fromiter(history, dtype=np.float64, count=len(history))
                mean, std = float(history_np.mean()), float(history_np.std())
            advantages_np[sample_idx] = (prompt_rewards - mean) / (std + self.eps)
        return torch.from_numpy(advantages_np).to(device=rewards.device, dtype=torch.float32)

    def state_dict(self) -> dict:
        """Plain-python state (config + per-prompt histories) for checkpointing."""
        return {
            "buffer_size": self.buffer_size,
            "min_count": self.min_count,
            "eps": self.eps,
            "history": {prompt: list(history) for prompt, history in self._history.items()},
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore config and histories from :meth:`state_dict` (histories trimmed to ``buffer_size``)."""
        missing = {"buffer_size", "min_count", "eps", "history"} - set(state)
        if missing:
            raise ValueError(f"PerPromptStatTracker state is missing keys {sorted(missing)}.")
        self._check_config(state["buffer_size"], state["min_count"], state["eps"])
        self.buffer_size = int(state["buffer_size"])
        self.min_count = int(state["min_count"])
        self.eps = float(state["eps"])
        self._history = {
            str(prompt): deque((float(r) for r in rewards), maxlen=self.buffer_size)
            for prompt, rewards in state["history"].items()
        }


def combine_rewards(
    rewards: Mapping[str, Tensor],
    weights: Mapping[str, float],
    group_ids: Tensor,
    *,
    mode: str = "sum_then_normalize",
    **advantage_kwargs,
) -> AdvantageOutput:
    """Combine several reward models into one group-relative advantage.

    ``mode="sum_then_normalize"``: ``group_advantages(sum_k w_k r_k)`` (a non-finite reward of any model
    makes the sample invalid). ``mode="normalize_then_sum"``: ``sum_k w_k group_advantages(r_k)``
    (multi-reward Flow-GRPO / DanceGRPO style), where a sample invalid in any reward is excluded from the
    statistics of every reward and gets 0; a group counts as zero-std only if it is zero-std for every reward.

    ``advantage_kwargs`` go to :func:`group_advantages` (``std_mode``, ``eps``, ``clip``, ``ddof``); ``clip`` is applied
    to the final combined advantage in both modes.
    """
    if mode not in COMBINE_MODES:
        raise ValueError(f"unknown combine mode {mode!r}; valid options are {list(COMBINE_MODES)}.")
    if len(rewards) == 0:
        raise ValueError("combine_rewards needs at least one reward.")
    for name in rewards:
        if name not in weights:
            raise ValueError(f"reward {name!r} has no weight; add weights[{name!r}] (use 0.0 to disable it).")
    for name in weights:
        if name not in rewards:
            raise ValueError(
                f"weight given for unknown reward {name!r}; available rewards are {sorted(rewards)}."
            )
    unknown_kwargs = set(advantage_kwargs) - {"std_mode", "eps", "clip", "ddof"}
    if unknown_kwargs:
        raise ValueError(
            f"unexpected advantage kwargs {sorted(unknown_kwargs)}; valid: std_mode, eps, clip, ddof."
        )
    std_mode = advantage_kwargs.get("std_mode", "group")
    eps = advantage_kwargs.get("eps", 1e-4)
    clip = advantage_kwargs.get("clip")
    ddof = advantage_kwargs.get("ddof", 0)
    _validate_advantage_args(std_mode, eps, clip, ddof)

    group_ids = torch.as_tensor(group_ids)
    reward_tensors = {name: torch.as_tensor(value) for name, value in rewards.items()}
    for value in reward_tensors.values():
        _check_1d_pair(value, group_ids)
    first = next(iter(reward_tensors.values()))
    dtype = _compute_dtype(first.device)
    stacked = torch.stack(
        [value.detach().to(device=first.device, dtype=dtype) for value in reward_tensors.values()]
    )
    weight_vec = torch.tensor(
        [float(weights[name]) for name in reward_tensors], dtype=dtype, device=first.device
    )

    if mode == "sum_then_normalize":
        total_reward = (weight_vec[:, None] * stacked).sum(dim=0)
        return group_advantages(total_reward, group_ids, std_mode=std_mode, eps=eps, clip=clip, ddof=ddof)

    # normalize_then_sum: a sample invalid in any reward is dropped from every reward's statistics.
    is_valid = torch.isfinite(stacked).all(dim=0)
    masked = torch.where(is_valid[None, :], stacked, torch.full_like(stacked, float("nan")))
    per_reward_stats = [_group_statistics(row, group_ids, ddof) for row in masked]
    per_reward_adv = torch.stack(
        [_advantages_from_stats(s, std_mode=std_mode, eps=eps, ddof=ddof) for s in per_reward_stats]
    )
    advantages = (weight_vec[:, None] * per_reward_adv).sum(dim=0)
    advantages = torch.where(is_valid, advantages, torch.zeros_like(advantages))
    if clip is not None:
        advantages = advantages.clamp(-clip, clip)
    zero_std_all = torch.stack([s.group_is_zero_std for s in per_reward_stats]).all(dim=0)
    return AdvantageOutput(
        advantages=advantages.to(torch.float32),
        num_groups=int(per_reward_stats[0].group_mean.shape[0]),
        num_zero_std_groups=int(zero_std_all.sum().item()),
        num_invalid=int((~is_valid).sum().item()),
    )


# ----------------------------------------------------------------------------------------------------
# Leave-one-out and batch-normalised estimators (VLM side; same validity rules as group_advantages)
# ----------------------------------------------------------------------------------------------------

ADVANTAGE_ESTIMATORS = ("grpo", "rloo", "reinforce_pp", "reinforce_pp_baseline")
__all__ += ["ADVANTAGE_ESTIMATORS", "rloo_advantages", "reinforce_pp_advantages"]


def _valid_group_counts(stats: _GroupStatistics) -> Tensor:
    """``[N]`` number of finite rewards in each sample's group."""
    valid = stats.is_valid.to(stats.rewards_clean.dtype)
    counts = torch.zeros_like(stats.group_mean).index_add_(0, stats.group_index, valid)
    return counts[stats.group_index]


def _advantage_output(advantages: Tensor, stats: _GroupStatistics, clip: float | None) -> AdvantageOutput:
    advantages = torch.where(stats.is_valid, advantages, torch.zeros_like(advantages))
    if clip is not None:
        advantages = advantages.clamp(-clip, clip)
    return AdvantageOutput(
        advantages=advantages.to(torch.float32),
        num_groups=int(stats.group_mean.shape[0]),
        num_zero_std_groups=int(stats.group_is_zero_std.sum().item()),
        num_invalid=int((~stats.is_valid).sum().item()),
    )


def rloo_advantages(rewards: Tensor, group_ids: Tensor, *, clip: float | None = None) -> AdvantageOutput:
    """RLOO (Kool et al. 2019; Ahmadian et al. 2024, eq. 6): ``A_i = r_i - 1/(n-1) sum_{j != i} r_j``.

    The baseline of each sample is the mean of the *other* finite rewards of its group, which equals
    ``n / (n - 1) * (r_i - mean_g)``. A group with fewer than two finite rewards has no baseline and gets 0;
    samples with a non-finite reward get 0 and are left out of their group's baseline. No std division.
    """
    rewards, group_ids = torch.as_tensor(rewards), torch.as_tensor(group_ids)
    _check_1d_pair(rewards, group_ids)
    _validate_advantage_args("none", 0.0, clip)
    stats = _group_statistics(rewards, group_ids)
    counts = _valid_group_counts(stats)
    centered = stats.rewards_clean - stats.group_mean[stats.group_index]
    has_baseline = counts > 1
    scale = torch.where(has_baseline, counts / (counts - 1).clamp_min(1), torch.zeros_like(counts))
    return _advantage_output(scale * centered, stats, clip)


def reinforce_pp_advantages(
    rewards: Tensor,
    group_ids: Tensor,
    *,
    baseline: bool = False,
    eps: float = 1e-4,
    clip: float | None = None,
) -> AdvantageOutput:
    """REINFORCE++ (Hu et al. 2025) global batch normalisation of outcome rewards.

    ``baseline=False`` (REINFORCE++, eq. 6 with one outcome reward): ``A = (r - mean_B(r)) / (std_B(r) + eps)``
    over every finite reward of the batch ``B`` (all processes). ``baseline=True`` (REINFORCE++-Baseline):
    subtract the group mean first, ``A~ = r - mean_g``, then normalise by the batch's std of ``A~``:
    ``A = A~ / (std_B(A~) + eps)`` (the batch mean of ``A~`` is 0 already). Population stds (ddof 0);
    non-finite rewards get 0 and count in no statistic. Unlike GRPO, the plain variant gives equal-reward
    groups a non-zero advantage (they are compared with the batch, not the group).
    """
    rewards, group_ids = torch.as_tensor(rewards), torch.as_tensor(group_ids)
    _check_1d_pair(rewards, group_ids)
    _validate_advantage_args("global", eps, clip)
    stats = _group_statistics(rewards, group_ids)
    valid = stats.rewards_clean[stats.is_valid]
    if baseline:
        centered = stats.rewards_clean - stats.group_mean[stats.group_index]
        scale = centered[stats.is_valid].std(correction=0) if valid.numel() else centered.new_zeros(())
    else:
        batch_mean = valid.mean() if valid.numel() else stats.rewards_clean.new_zeros(())
        centered = stats.rewards_clean - batch_mean
        scale = valid.std(correction=0) if valid.numel() else centered.new_zeros(())
    return _advantage_output(centered / (scale + eps), stats, clip)
