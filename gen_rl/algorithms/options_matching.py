"""Options of the algorithms beyond step likelihoods (issue 16 items 2-4), torch-free like ``options.py``.

Forward-process algorithms (AWM, DGPO, Diffusion-DPO, SFT) train on ``x_t = (1 - t) x0 + t eps`` at the
rollout's own grid times; reward-backprop algorithms (DRaFT-K, ReFL, partial-chain editing) differentiate a
differentiable reward through the last denoising steps; ``few_step_grpo`` is Flow-GRPO on a 2-4 step grid.
Each class is registered in ``BUILTIN_OPTIONS`` (``options.py``) under its algorithm's name.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from gen_rl.algorithms.options import BUILTIN_OPTIONS, AlgorithmOptions, PolicyGradientOptions
from gen_rl.core.config import ConfigError, option


def _check(conditions: tuple[tuple[bool, str], ...]) -> None:
    for holds, message in conditions:
        if not holds:
            raise ConfigError(message)


def _refuse_cfg_and_ddim(name: str, sample: Any) -> None:
    """Forward-process and reward-backprop algorithms run CFG-free on a rectified-flow model."""
    if sample.cfg_scale > 1.0:
        raise ConfigError(
            f"{name} trains the CFG-free velocity, but sample.cfg_scale is {sample.cfg_scale}; set sample.cfg_scale: 1"
        )
    if sample.sde_type == "ddim":
        raise ConfigError(
            f"{name} trains on the rectified-flow forward process x_t = (1 - t) x0 + t eps; sample.sde_type: ddim "
            "(epsilon-prediction SD) cannot express it. Use a FLUX or SD3 model"
        )


def _refuse_kl_without_lora(kl_coef: float, config: Any) -> None:
    if kl_coef > 0 and not config.model.lora:
        raise ConfigError(
            "algorithm.kl_coef > 0 needs the frozen reference, the model with its LoRA disabled; with model.lora: "
            "false there is none. Set model.lora: true or algorithm.kl_coef: 0"
        )


def _require_whole_groups(name: str, config: Any) -> None:
    """Group-level losses see whole groups: the trainer orders each process's samples group by group
    (``Algorithm.whole_groups``), so updates and microbatches must be whole multiples of the group size."""
    sample, train = config.sample, config.train
    for key, value in (
        ("samples_per_update", train.samples_per_update),
        ("microbatch_size", train.microbatch_size),
    ):
        if value % sample.group_size:
            raise ConfigError(
                f"{name} compares the members of each group inside one microbatch; train.{key} ({value}) must be "
                f"a multiple of sample.group_size ({sample.group_size})"
            )


@dataclass
class AWMOptions(AlgorithmOptions):
    """Advantage Weighted Matching (Xue et al. 2025, arXiv 2509.25050): the flow-matching loss weighted by the
    advantage, as PPO's clipped surrogate of the ratio exp(l_old - l_theta) at shared time and noise."""

    clip_low: float = option(0.2, "ratio clip below 1 (1 - clip_low); PPO's 0.2, not from the paper")
    clip_high: float | None = option(None, "ratio clip above 1; null: equal to clip_low")
    weighting: Literal["uniform", "t"] = option(
        "uniform", "l = w(t) mean (v - (eps - x0))^2 with w = 1 (uniform) or t (Flow-Factory awm_weighting)"
    )
    kl_coef: float = option(0.0, "weight of mean (v_theta - v_ref)^2 to the LoRA-disabled reference")
    step_fraction: float = option(0.99, "floor(S x fraction) grid times trained per sample, drawn at random")

    @property
    def clip_high_or_low(self) -> float:
        """The upper clip epsilon (``clip_low`` when ``clip_high`` is null)."""
        return self.clip_low if self.clip_high is None else self.clip_high

    def validate(self, config: Any) -> None:
        """Ranges; CFG, DDIM and a KL without LoRA are refused."""
        _check(
            (
                (self.clip_low > 0, f"algorithm.clip_low must be > 0, got {self.clip_low}"),
                (self.clip_high is None or self.clip_high > 0, "algorithm.clip_high must be > 0 or null"),
                (self.kl_coef >= 0, f"algorithm.kl_coef must be >= 0, got {self.kl_coef}"),
                (
                    0 < self.step_fraction <= 1,
                    f"algorithm.step_fraction must be in (0, 1], got {self.step_fraction}",
                ),
            )
        )
        _refuse_cfg_and_ddim("awm", config.sample)
        _refuse_kl_without_lora(self.kl_coef, config)


@dataclass
class DGPOOptions(AlgorithmOptions):
    """Direct Group Preference Optimization (Luo et al. 2025, arXiv 2510.08425; Luo-Yihong/DGPO): a group-level
    DPO loss whose preference weights are the advantages, against the LoRA-disabled reference."""

    beta: float = option(100.0, "beta of the group preference (reference config beta_dpo = 100)")
    step_fraction: float = option(
        0.99, "floor(S x fraction) grid times trained, the same times for every sample of the step"
    )
    shared_noise: bool = option(True, "the members of a group share the forward-process noise (reference)")

    def validate(self, config: Any) -> None:
        """Ranges; CFG, DDIM, no LoRA (no reference) and minibatches that split groups are refused."""
        _check(
            (
                (self.beta > 0, f"algorithm.beta must be > 0, got {self.beta}"),
                (
                    0 < self.step_fraction <= 1,
                    f"algorithm.step_fraction must be in (0, 1], got {self.step_fraction}",
                ),
            )
        )
        _refuse_cfg_and_ddim("dgpo", config.sample)
        _refuse_kl_without_lora(1.0, config)
        _require_whole_groups("dgpo", config)


@dataclass
class DiffusionDPOOptions(AlgorithmOptions):
    """Diffusion-DPO (Wallace et al. 2023, eq. 14; the flow-matching form of diffusers' DPO scripts) against the
    LoRA-disabled reference: offline from preference pairs (``pairs``), or online, best against worst of each
    group of the rollout."""

    beta: float = option(2500.0, "beta of eq. 14 (the code's beta_dpo: 5000 for SD 1.5, 2500 for SDXL)")
    pairs: str | None = option(
        None,
        "JSONL of {prompt, chosen, rejected} image paths (offline DPO); null: online, best vs worst of each group",
    )
    step_fraction: float = option(0.99, "floor(S x fraction) grid times trained per sample, drawn at random")

    def validate(self, config: Any) -> None:
        """Ranges; CFG, DDIM, no LoRA; online pairs need whole groups; the pair file is read here (bad lines)."""
        _check(
            (
                (self.beta > 0, f"algorithm.beta must be > 0, got {self.beta}"),
                (
                    0 < self.step_fraction <= 1,
                    f"algorithm.step_fraction must be in (0, 1], got {self.step_fraction}",
                ),
            )
        )
        _refuse_cfg_and_ddim("diffusion_dpo", config.sample)
        _refuse_kl_without_lora(1.0, config)
        if self.pairs is None:
            _require_whole_groups("diffusion_dpo (online, algorithm.pairs: null)", config)
        else:
            from gen_rl.preference_pairs import load_preference_pairs

            load_preference_pairs(self.pairs, key="algorithm.pairs")


@dataclass
class SFTOptions(AlgorithmOptions):
    """Supervised fine-tuning on reference images: the flow-matching loss on their encoded latents."""

    images: str = option(
        "", "JSONL of {prompt, image} records: the reference images (paths relative to the file)"
    )
    step_fraction: float = option(0.99, "floor(S x fraction) grid times trained per sample, drawn at random")

    def validate(self, config: Any) -> None:
        """The image file is read here (line-numbered errors); CFG and DDIM are refused."""
        _check(
            (
                (
                    0 < self.step_fraction <= 1,
                    f"algorithm.step_fraction must be in (0, 1], got {self.step_fraction}",
                ),
            )
        )
        if not self.images:
            raise ConfigError(
                'algorithm.images is empty: sft needs a JSONL of reference images, one {"prompt": ..., '
                '"image": "path.png"} per line'
            )
        _refuse_cfg_and_ddim("sft", config.sample)
        from gen_rl.data import load_prompts

        records = load_prompts(self.images, "abort", "algorithm.images")
        missing = [i for i, record in enumerate(records.metadata) if "image" not in record]
        if missing:
            raise ConfigError(
                f"algorithm.images record {missing[0] + 1} ({records.prompts[missing[0]]!r}) has no 'image' key; "
                'give {"prompt": ..., "image": "path.png"}'
            )


@dataclass
class DraftOptions(AlgorithmOptions):
    """DRaFT-K (Clark et al. 2024): the reward's gradient through the last K ODE steps, checkpointed."""

    grad_steps: int = option(
        1, "K: the last K denoising steps carry gradients (DRaFT-1 = DRaFT-LV without LV)"
    )
    checkpointing: bool = option(
        True, "recompute each step's activations in the backward (torch.utils.checkpoint)"
    )

    def validate(self, config: Any) -> None:
        """K within the schedule; CFG and DDIM are refused."""
        steps = config.sample.num_steps
        _check(
            (
                (
                    1 <= self.grad_steps <= steps,
                    f"algorithm.grad_steps must be in [1, sample.num_steps = {steps}], got {self.grad_steps}",
                ),
            )
        )
        _refuse_cfg_and_ddim("draft", config.sample)


@dataclass
class ReFLOptions(AlgorithmOptions):
    """ReFL (Xu et al. 2023, ImageReward): from a random late step t, the one-step prediction x0 = x_t - t v
    is decoded and rewarded with gradients."""

    step_range: tuple[int, int] | None = option(
        None, "[lo, hi) denoising steps the start step is drawn from; null: the last half of the schedule"
    )

    def validate(self, config: Any) -> None:
        """The range lies inside the schedule; CFG and DDIM are refused."""
        steps = config.sample.num_steps
        low, high = self.step_range or (steps // 2, steps)
        _check(
            (
                (
                    0 <= low < high <= steps,
                    f"algorithm.step_range {[low, high]} must satisfy 0 <= lo < hi <= sample.num_steps ({steps})",
                ),
            )
        )
        _refuse_cfg_and_ddim("refl", config.sample)


@dataclass
class PartialEditOptions(AlgorithmOptions):
    """InstructVideo's reward fine-tuning as editing (Yuan et al. 2024): a rollout's clean sample is noised to
    an intermediate grid point, denoised to the end with gradients, and the result is rewarded."""

    edit_steps: int = option(
        2, "denoising steps of the edit: the sample is noised to grid point S - edit_steps"
    )
    grad_steps: int | None = option(
        None, "the last steps of the edit that carry gradients; null: all of them"
    )
    checkpointing: bool = option(
        True, "recompute each step's activations in the backward (torch.utils.checkpoint)"
    )

    def validate(self, config: Any) -> None:
        """Edit and gradient lengths inside the schedule; CFG and DDIM are refused."""
        steps = config.sample.num_steps
        _check(
            (
                (
                    1 <= self.edit_steps <= steps,
                    f"algorithm.edit_steps must be in [1, sample.num_steps = {steps}], got {self.edit_steps}",
                ),
                (
                    self.grad_steps is None or 1 <= self.grad_steps <= self.edit_steps,
                    f"algorithm.grad_steps must be null or in [1, edit_steps = {self.edit_steps}]",
                ),
            )
        )
        _refuse_cfg_and_ddim("partial_edit", config.sample)


@dataclass
class FewStepOptions(PolicyGradientOptions):
    """Flow-GRPO on the few-step model's own grid (2-4 steps, CFG-free, FLUX-schnell / Z-Image-Turbo style):
    every step of that grid is stochastic and trained."""

    max_steps: int = option(4, "the largest grid this few-step declaration accepts (sample.num_steps)")

    def validate(self, config: Any) -> None:
        """The Flow-GRPO checks, plus a grid of at most ``max_steps`` steps, no CFG, every step trained."""
        super().validate(config)
        sample = config.sample
        if not 1 <= sample.num_steps <= self.max_steps:
            raise ConfigError(
                f"few_step_grpo trains a few-step model on its own grid, but sample.num_steps is {sample.num_steps} "
                f"(> algorithm.max_steps = {self.max_steps}); set sample.num_steps to the model's 2-4 steps or use "
                "flow_grpo"
            )
        if sample.cfg_scale > 1.0:
            raise ConfigError(
                f"few_step_grpo is for distilled CFG-free models, but sample.cfg_scale is {sample.cfg_scale}; set "
                "sample.cfg_scale: 1"
            )
        if self.step_selection != "all":
            raise ConfigError(
                f"few_step_grpo trains every step of its {sample.num_steps}-step grid; algorithm.step_selection is "
                f"{self.step_selection!r}, set it to all"
            )


MATCHING_OPTIONS: dict[str, type[AlgorithmOptions]] = {
    "awm": AWMOptions,
    "dgpo": DGPOOptions,
    "diffusion_dpo": DiffusionDPOOptions,
    "sft": SFTOptions,
    "draft": DraftOptions,
    "refl": ReFLOptions,
    "partial_edit": PartialEditOptions,
    "few_step_grpo": FewStepOptions,
}
BUILTIN_OPTIONS.update(MATCHING_OPTIONS)  # options.py imports this module at its end, so either order works
