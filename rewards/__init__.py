"""Rewards: ``Reward`` subclasses score generated samples; ``build_reward(name, **kwargs)`` makes one.

Registered here: ``jpeg_compressibility`` / ``jpeg_incompressibility`` (DDPO) and ``colour`` (alias
``color``). User code plugs in with a dotted path ``package.module:Class``.
"""

from __future__ import annotations

from rewards.base import REWARDS, Reward, RewardOutput, build_reward, register_reward
from rewards.colour import ColourReward
from rewards.compression import JpegCompressibility, JpegIncompressibility

__all__ = [
    "REWARDS",
    "ColourReward",
    "JpegCompressibility",
    "JpegIncompressibility",
    "Reward",
    "RewardOutput",
    "build_reward",
    "register_reward",
]
