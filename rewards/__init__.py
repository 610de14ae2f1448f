"""Rewards: ``Reward`` subclasses score generated samples; ``build_reward(name, **kwargs)`` makes one.

Registered names:

- images, pixel rules: ``jpeg_compressibility`` / ``jpeg_incompressibility`` (DDPO), ``colour`` (``color``);
- images, learned heads: ``clip_score``, ``pickscore``, ``hps`` (v2 / v2.1), ``aesthetic`` (LAION v2),
  ``dino_similarity``; ``binary`` thresholds any of them (DanceGRPO);
- video: ``segmental`` (InstructVideo SegVR + TAR over any image reward), ``temporal_consistency`` (DINOv2);
- ``remote``: any reward served by ``python -m rewards.serve`` on another GPU or machine;
- learning: ``running_reference`` (distance to an EMA of past samples' features; updated every step);
- trained here: ``preference_model`` (a checkpoint of ``task: reward_model``, loaded by ``path``);
- learning / reasoning: ``adversarial`` (Adv-GRPO discriminator on DINOv2 tokens, trained every step),
  ``vlm_judge`` (P(yes) or the expected 1-10 score of a VLM), ``srum`` (SRUM global + local judge reward),
  ``pairwise_win_rate`` (Pref-GRPO in-group win rate; takes group ids).

The trainers score through ``score_reward`` (group ids for rewards that take them), update learning rewards
with ``update_reward(reward, RewardUpdate(...))`` and save their ``state_dict()`` with the run.

User code plugs in with a dotted path ``package.module:Class``.
"""

from __future__ import annotations

from rewards.adversarial import AdversarialReward
from rewards.aesthetic import AestheticReward
from rewards.base import (
    REWARDS,
    LearningReward,
    Reward,
    RewardOutput,
    RewardStateError,
    RewardUpdate,
    build_reward,
    check_reward_state,
    register_reward,
    reward_learns,
    score_reward,
    update_reward,
)
from rewards.binary import BinaryReward
from rewards.clip_similarity import CLIPScore, CLIPSimilarity, PickScore
from rewards.colour import ColourReward
from rewards.compression import JpegCompressibility, JpegIncompressibility
from rewards.dino import DinoSimilarity
from rewards.hps import HPSReward
from rewards.pairwise import PairwiseWinRate
from rewards.preference_model import PreferenceModelReward
from rewards.remote import RemoteReward
from rewards.running_reference import RunningReferenceReward
from rewards.srum import SRUMReward
from rewards.video import SegmentalVideoReward, TemporalConsistency
from rewards.vlm_judge import VLMJudge

__all__ = [
    "REWARDS",
    "AdversarialReward",
    "PairwiseWinRate",
    "SRUMReward",
    "VLMJudge",
    "AestheticReward",
    "BinaryReward",
    "CLIPScore",
    "CLIPSimilarity",
    "ColourReward",
    "DinoSimilarity",
    "HPSReward",
    "JpegCompressibility",
    "JpegIncompressibility",
    "LearningReward",
    "PickScore",
    "PreferenceModelReward",
    "RemoteReward",
    "Reward",
    "RewardOutput",
    "RewardStateError",
    "RewardUpdate",
    "RunningReferenceReward",
    "SegmentalVideoReward",
    "TemporalConsistency",
    "build_reward",
    "check_reward_state",
    "register_reward",
    "reward_learns",
    "score_reward",
    "update_reward",
]
