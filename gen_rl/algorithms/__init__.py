"""Training algorithms, declared (``base.Algorithm``) and registered by name; ``package.module:Class`` for yours.

Importing this package does not import torch (the config loads ``gen_rl.algorithms.options`` before any model
library): the algorithm classes load on use, through :func:`build_algorithm` or attribute access.
"""

from __future__ import annotations

import importlib
from typing import Any

# name -> "module:Class" (imported on use, so that loading a config never imports torch)
ALGORITHMS: dict[str, str] = {
    "grpo": "gen_rl.algorithms.policy_gradient:PolicyGradient",
    "flow_grpo": "gen_rl.algorithms.policy_gradient:FlowGRPO",
    "dance_grpo": "gen_rl.algorithms.policy_gradient:DanceGRPO",
    "diffusion_nft": "gen_rl.algorithms.diffusion_nft:DiffusionNFT",
    "grpo_guard": "gen_rl.algorithms.grpo_guard:GRPOGuard",
    "flow_dppo": "gen_rl.algorithms.flow_dppo:FlowDPPO",
    "tempflow_grpo": "gen_rl.algorithms.tempflow_grpo:TempFlowGRPO",
    "branch_grpo": "gen_rl.algorithms.branch_grpo:BranchGRPO",
    "flash_grpo": "gen_rl.algorithms.flash_grpo:FlashGRPO",
    "awm": "gen_rl.algorithms.awm:AWM",
    "dgpo": "gen_rl.algorithms.dgpo:DGPO",
    "diffusion_dpo": "gen_rl.algorithms.dpo:DiffusionDPO",
    "sft": "gen_rl.algorithms.sft:SFT",
    "draft": "gen_rl.algorithms.reward_backprop:DRaFT",
    "refl": "gen_rl.algorithms.reward_backprop:ReFL",
    "partial_edit": "gen_rl.algorithms.reward_backprop:PartialEdit",
    "few_step_grpo": "gen_rl.algorithms.few_step:FewStepGRPO",
}
_LAZY = {"Algorithm": "base", "LossBatch": "base", "Policy": "base", "AlgorithmOptions": "options"}


def build_algorithm(options: Any, **kwargs: Any) -> Any:
    """The algorithm ``options.name`` names (registered, or ``package.module:Class``), built with its options."""
    from gen_rl.algorithms.base import Algorithm
    from gen_rl.core.registry import resolve

    target = ALGORITHMS.get(options.name, options.name)
    algorithm_class = resolve({}, target, "algorithm")
    if not (isinstance(algorithm_class, type) and issubclass(algorithm_class, Algorithm)):
        raise TypeError(f"algorithm {options.name!r} must subclass gen_rl.algorithms.base.Algorithm")
    return algorithm_class(options, **kwargs)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(f"gen_rl.algorithms.{_LAZY[name]}"), name)
    raise AttributeError(f"module 'gen_rl.algorithms' has no attribute {name!r}")


__all__ = ["ALGORITHMS", "Algorithm", "AlgorithmOptions", "LossBatch", "Policy", "build_algorithm"]
