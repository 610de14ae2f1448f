"""Options of the likelihood-ratio family beyond Flow-GRPO (issue 16 item 1): GRPO-Guard, Flow-DPPO, TempFlow-GRPO,
BranchGRPO and Flash-GRPO. Torch-free, like ``options.py``: a bad ``algorithm.*`` key fails when the config loads.

Each extends :class:`~gen_rl.algorithms.options.PolicyGradientOptions` (clip range, KL to the reference, log-prob
convention, step selection), so switching ``algorithm.name`` between them keeps those keys valid.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from gen_rl.algorithms.options import BUILTIN_OPTIONS, PolicyGradientOptions
from gen_rl.core.config import ConfigError, option


def _check_gaussian(options: PolicyGradientOptions, name: str) -> None:
    if options.log_prob_convention != "gaussian":
        raise ConfigError(
            f"{name} compares exact Gaussian step log-probs; set algorithm.log_prob_convention: gaussian"
        )


def _check_steps(steps: tuple[int, ...] | None, num_steps: int, key: str) -> None:
    if steps is None:
        return
    if not steps or list(steps) != sorted(set(steps)) or steps[0] < 0 or steps[-1] >= num_steps:
        raise ConfigError(
            f"algorithm.{key} {list(steps)} must be distinct, increasing step indices in [0, {num_steps}) "
            f"(sample.num_steps = {num_steps})"
        )


def _check_single_step_selection(options: PolicyGradientOptions, name: str) -> None:
    if options.step_selection != "all":
        raise ConfigError(
            f"{name} picks its own single SDE step per training step; set algorithm.step_selection: all"
        )


@dataclass
class GRPOGuardOptions(PolicyGradientOptions):
    """GRPO-Guard (Wang et al. 2025, arXiv 2510.22319): RatioNorm (the step log-ratio re-centred by its mean
    ``|mu - mu_old|^2 / (2 n^2)`` and scaled by the step std ``n``) and the per-step gradient reweighting."""

    step_reweight: Literal["inverse_dt", "none"] = option(
        "inverse_dt",
        "inverse_dt: each step's surrogate x 1/|dt| (paper Sec. 4.2 and verl-omni); none: Flow-Factory's code",
    )

    def validate(self, config: Any) -> None:
        """Policy-gradient checks, and the exact Gaussian convention RatioNorm is derived for."""
        super().validate(config)
        _check_gaussian(self, "grpo_guard")


@dataclass
class FlowDPPOOptions(PolicyGradientOptions):
    """Flow-DPPO (Ping et al. 2026, arXiv 2606.11025): no clipping; a step's surrogate is dropped only when the
    Gaussian KL of the new step to the old one reaches ``kl_threshold`` and the step moves the way its advantage
    pushes (ratio > 1 with A > 0, or ratio < 1 with A < 0). ``clip_low`` / ``clip_high`` are not used by the
    loss; ``clip_low`` only sets the tolerance of the ratio == 1 check before the first update."""

    kl_threshold: float = option(
        1.0e-5, "tau: mean-over-elements KL(old step || new step) at which an over-aggressive step is dropped"
    )

    def validate(self, config: Any) -> None:
        """Policy-gradient checks, a positive threshold, the Gaussian convention."""
        super().validate(config)
        _check_gaussian(self, "flow_dppo")
        if not self.kl_threshold > 0:
            raise ConfigError(f"algorithm.kl_threshold must be > 0, got {self.kl_threshold}")


@dataclass
class TempFlowGRPOOptions(PolicyGradientOptions):
    """TempFlow-GRPO (He et al. 2025, arXiv 2508.04324): every group shares its initial noise and its ODE prefix,
    branches with one SDE step at the training step's branch point, runs the ODE after it; that step trains,
    weighted by its noise level."""

    branch_steps: tuple[int, ...] | None = option(
        None, "steps a training step may branch at (one drawn per training step); null: every stochastic step"
    )
    noise_weighting: bool = option(
        True, "weight the branch step's surrogate by its step std / the mean step std of branch_steps"
    )

    def validate(self, config: Any) -> None:
        """Policy-gradient checks and the branch steps inside the schedule."""
        super().validate(config)
        _check_single_step_selection(self, "tempflow_grpo")
        _check_steps(self.branch_steps, config.sample.num_steps, "branch_steps")


@dataclass
class FlashGRPOOptions(PolicyGradientOptions):
    """Flash-GRPO (He et al. 2026, arXiv 2605.15980): one SDE step per sample (the same for a whole training step,
    iso-temporal), the step drawn stratified over training steps, its surrogate times the temporal-gradient
    rectification weight."""

    flash_steps: tuple[int, int] | None = option(
        None,
        "[lo, hi) steps the single SDE step is drawn from (reference: the first 10); null: all stochastic",
    )
    rectify: bool = option(
        True, "multiply by lambda_k = (1 / c_k) / mean_j (1 / c_j), c_k = |d mu / d v| / n_k"
    )

    def validate(self, config: Any) -> None:
        """Policy-gradient checks and the step range inside the schedule."""
        super().validate(config)
        _check_single_step_selection(self, "flash_grpo")
        if self.flash_steps is not None:
            low, high = self.flash_steps
            if not 0 <= low < high <= config.sample.num_steps:
                raise ConfigError(
                    f"algorithm.flash_steps {list(self.flash_steps)} must satisfy 0 <= lo < hi <= "
                    f"sample.num_steps ({config.sample.num_steps})"
                )


@dataclass
class BranchGRPOOptions(PolicyGradientOptions):
    """BranchGRPO (Li et al. 2025, arXiv 2509.06040): tree rollouts sharing their prefix, node reward = mean of its
    children, advantages normalised per depth, depth and width pruning; only non-pruned stochastic edges train."""

    branch_steps: tuple[int, ...] = option(
        (0, 1, 2), "denoising steps at which every node splits (default: 8 leaves, the demo's group of 8)"
    )
    branch_factor: int = option(
        2, "children per split; sample.group_size must be branch_factor ** len(steps)"
    )
    ode_between_branches: bool = option(
        False, "true: only the split steps are SDE (the reference's mixed mode); false: every step is SDE"
    )
    depth_pruning: tuple[int, ...] = option(
        (), "node depths (= step + 1 of the edge into them) never trained"
    )
    width_keep: float = option(
        1.0,
        "after the last split, keep the edges of the best and worst fraction of each tree's leaves (1: all)",
    )

    @property
    def leaves(self) -> int:
        """Leaves per tree: ``branch_factor ** len(branch_steps)``."""
        return self.branch_factor ** len(self.branch_steps)

    def validate(self, config: Any) -> None:
        """Policy-gradient checks, the tree fitting the schedule and the group size, pruning ranges."""
        super().validate(config)
        sample = config.sample
        _check_steps(self.branch_steps, sample.num_steps, "branch_steps")
        if self.branch_factor < 2:
            raise ConfigError(f"algorithm.branch_factor must be >= 2, got {self.branch_factor}")
        if sample.group_size != self.leaves:
            raise ConfigError(
                f"a BranchGRPO tree has branch_factor ** len(branch_steps) = {self.leaves} leaves, but "
                f"sample.group_size is {sample.group_size}; set sample.group_size: {self.leaves}"
            )
        if not 0.0 < self.width_keep <= 1.0:
            raise ConfigError(f"algorithm.width_keep must be in (0, 1], got {self.width_keep}")
        if self.step_selection != "all":
            raise ConfigError(
                "branch_grpo trains the tree's own edges; set algorithm.step_selection: all (the tree decides)"
            )


LIKELIHOOD_OPTIONS: dict[str, type[PolicyGradientOptions]] = {
    "grpo_guard": GRPOGuardOptions,
    "flow_dppo": FlowDPPOOptions,
    "tempflow_grpo": TempFlowGRPOOptions,
    "branch_grpo": BranchGRPOOptions,
    "flash_grpo": FlashGRPOOptions,
}
BUILTIN_OPTIONS.update(LIKELIHOOD_OPTIONS)  # options.py imports this module at its end, so either order works
