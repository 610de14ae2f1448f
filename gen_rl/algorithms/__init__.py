"""Training algorithms, declared (``base.Algorithm``) and registered by name; ``package.module:Class`` for yours."""

from __future__ import annotations

from typing import Any

from gen_rl.algorithms.base import Algorithm, LossBatch, Policy
from gen_rl.algorithms.options import AlgorithmOptions
from gen_rl.core.registry import resolve

# name -> "module:Class" (imported on use, so that loading a config never imports torch)
ALGORITHMS: dict[str, str] = {
    "flow_grpo": "gen_rl.algorithms.policy_gradient:FlowGRPO",
    "dance_grpo": "gen_rl.algorithms.policy_gradient:DanceGRPO",
    "diffusion_nft": "gen_rl.algorithms.diffusion_nft:DiffusionNFT",
}


def build_algorithm(options: AlgorithmOptions, **kwargs: Any) -> Algorithm:
    """The algorithm ``options.name`` names (registered, or ``package.module:Class``), built with its options."""
    target = ALGORITHMS.get(options.name, options.name)
    algorithm_class = (
        resolve({}, target, "algorithm") if ":" in target else resolve(ALGORITHMS, target, "algorithm")
    )
    if not (isinstance(algorithm_class, type) and issubclass(algorithm_class, Algorithm)):
        raise TypeError(f"algorithm {options.name!r} must subclass gen_rl.algorithms.base.Algorithm")
    return algorithm_class(options, **kwargs)


__all__ = ["ALGORITHMS", "Algorithm", "AlgorithmOptions", "LossBatch", "Policy", "build_algorithm"]
