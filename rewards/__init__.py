"""Rewards: ``Reward`` subclasses score generated samples; ``build_reward(name, **kwargs)`` makes one.

Registered names:

- images, pixel rules: ``jpeg_compressibility`` / ``jpeg_incompressibility`` (DDPO), ``colour`` (``color``);
- images, learned heads: ``clip_score``, ``pickscore``, ``hps`` (v2 / v2.1), ``aesthetic`` (LAION v2),
  ``dino_similarity``; ``binary`` thresholds any of them (DanceGRPO);
- video: ``segmental`` (InstructVideo SegVR + TAR over any image reward), ``temporal_consistency`` (DINOv2);
- ``remote``: any reward served by ``python -m rewards.serve`` on another GPU or machine.

User code plugs in with a dotted path ``package.module:Class``.
"""

from __future__ import annotations

from rewards.aesthetic import AestheticReward
from rewards.base import REWARDS, Reward, RewardOutput, build_reward, register_reward
from rewards.binary import BinaryReward
from rewards.clip_similarity import CLIPScore, CLIPSimilarity, PickScore
from rewards.colour import ColourReward
from rewards.compression import JpegCompressibility, JpegIncompressibility
from rewards.dino import DinoSimilarity
from rewards.hps import HPSReward
from rewards.remote import RemoteReward
from rewards.video import SegmentalVideoReward, TemporalConsistency

__all__ = [
    "REWARDS",
    "AestheticReward",
    "BinaryReward",
    "CLIPScore",
    "CLIPSimilarity",
    "ColourReward",
    "DinoSimilarity",
    "HPSReward",
    "JpegCompressibility",
    "JpegIncompressibility",
    "PickScore",
    "RemoteReward",
    "Reward",
    "RewardOutput",
    "SegmentalVideoReward",
    "TemporalConsistency",
    "build_reward",
    "register_reward",
]
