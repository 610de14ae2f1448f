"""The ``algorithm`` config section: ``name`` picks a registered algorithm (or ``package.module:Class``), the other
keys are that algorithm's options, checked against its options dataclass when the config loads.

This module imports neither torch nor a model library, so a bad ``algorithm.*`` key fails in the first second.
Built-in algorithms declare their options here; a user algorithm class may carry an ``Options`` dataclass that
subclasses :class:`AlgorithmOptions` (its module is imported when the config loads).
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib
from dataclasses import dataclass
from typing import Any, Literal

from gen_rl.core.config import ConfigError, from_dict, option

STEP_SELECTIONS = ("all", "random_fraction", "first", "random_window", "sliding_window")


@dataclass
class AlgorithmOptions:
    """The training algorithm and its options (one section; ``name`` picks the algorithm)."""

    name: str = option(
        "flow_grpo",
        "grpo | flow_grpo | dance_grpo | diffusion_nft | awm | dgpo | diffusion_dpo | sft | draft | refl | "
        "partial_edit | few_step_grpo | grpo_guard | flow_dppo | tempflow_grpo | branch_grpo | flash_grpo | "
        "package.module:Class",
    )

    @classmethod
    def from_config_mapping(cls, data: Any, where: str) -> AlgorithmOptions:
        """The options dataclass of the algorithm that ``data['name']`` names, filled from ``data``."""
        data = {} if data is None else data
        if not isinstance(data, dict):
            raise ConfigError(f"{where} must be a mapping with a 'name' key, got {type(data).__name__}")
        name = data.get("name", AlgorithmOptions.name)
        if not isinstance(name, str):
            raise ConfigError(f"{where}.name must be a string, got {name!r}")
        chosen = options_class(name, where)
        _refuse_other_algorithms_options(chosen, name, data, where)
        return from_dict(chosen, data, where)

    def validate(self, config: Any) -> None:
        """Check these options against the whole run config (``ConfigError`` with one line naming the fix)."""


@dataclass
class PolicyGradientOptions(AlgorithmOptions):
    """Likelihood-ratio policy gradient over SDE steps: PPO's clipped surrogate per trained step (Flow-GRPO eq. 8,
    DanceGRPO eq. 9) plus an optional KL to the LoRA-disabled reference; the step selection picks which steps
    are stochastic and trained (Flow-GRPO-Fast and MixGRPO windows are selections)."""

    clip_low: float = option(1e-4, "PPO clip epsilon below 1: ratios under 1 - clip_low are clipped")
    clip_high: float | None = option(None, "PPO clip epsilon above 1; null: equal to clip_low")
    kl_coef: float = option(0.0, "beta of the KL to the reference (LoRA disabled); 0: no reference pass")
    kl_estimator: Literal["gaussian", "flow_grpo"] = option(
        "gaussian",
        "gaussian: exact step KL |mu-mu_ref|^2/(2 std^2); flow_grpo: Flow-GRPO's /(2 g^2) = exact x |ds|",
    )
    log_prob_convention: Literal["gaussian", "flow_grpo_cps"] = option(
        "gaussian", "gaussian: exact mean log-density; flow_grpo_cps: Flow-GRPO's CPS -mean((x-mu)^2)"
    )
    step_selection: Literal["all", "random_fraction", "first", "random_window", "sliding_window"] = option(
        "all", "which denoising steps are stochastic and trained (gen_rl/core/step_selection.py)"
    )
    step_fraction: float = option(1.0, "fraction of stochastic steps trained (random_fraction / first)")
    window_size: int = option(4, "SDE window length in steps (random_window / sliding_window)")
    window_range: tuple[int, int] | None = option(None, "[lo, hi) steps the window may cover; null: all")
    window_stride: int = option(1, "sliding_window: steps the window advances each time it moves")
    window_every: int = option(1, "sliding_window: training steps between moves")
    trainable_steps: tuple[int, int] | None = option(
        None, "[lo, hi) denoising steps that may be trained; null: all (DanceGRPO: [0, S-1))"
    )
    best_of_n_k: int | None = option(
        None,
        "DanceGRPO best-of-N: advantages on the whole group, only each group's top k and bottom k train; null: all",
    )

    @property
    def clip_high_or_low(self) -> float:
        """The upper clip epsilon (``clip_low`` when ``clip_high`` is null)."""
        return self.clip_low if self.clip_high is None else self.clip_high

    def validate(self, config: Any) -> None:
        """Clip, KL, convention and step-selection settings that cannot work with this sampling config."""
        sample = config.sample
        if self.kl_coef < 0:
            raise ConfigError(f"algorithm.kl_coef must be >= 0.0, got {self.kl_coef}")
        if self.kl_coef > 0 and not config.model.lora:
            raise ConfigError(
                "algorithm.kl_coef > 0 needs the frozen reference, which is the model with its LoRA disabled; with "
                "model.lora: false (full fine-tuning) there is none. Set model.lora: true or algorithm.kl_coef: 0"
            )
        if self.log_prob_convention == "flow_grpo_cps" and sample.sde_type != "cps":
            raise ConfigError(
                f"algorithm.log_prob_convention: flow_grpo_cps is Flow-GRPO's CPS log-prob, but sample.sde_type is "
                f"{sample.sde_type!r}; set sample.sde_type: cps or algorithm.log_prob_convention: gaussian"
            )
        if self.kl_estimator == "flow_grpo" and sample.sde_type == "ddim":
            raise ConfigError(
                "algorithm.kl_estimator: flow_grpo is Flow-GRPO's flow-SDE KL; with sample.sde_type: ddim use "
                "algorithm.kl_estimator: gaussian"
            )
        if sample.noise_level == 0:
            raise ConfigError(
                "sample.noise_level is 0: every step is the deterministic ODE and has no log-prob, so nothing can "
                "be trained; use e.g. 0.7 (Flow-GRPO a) or 0.3 (DanceGRPO eta)"
            )
        if not 0.0 < self.step_fraction <= 1.0:
            raise ConfigError(f"algorithm.step_fraction must be in (0, 1], got {self.step_fraction}")
        if self.step_selection in ("random_window", "sliding_window"):
            low, high = self.window_range or (0, sample.num_steps)
            if not (0 <= low < high <= sample.num_steps and self.window_size <= high - low):
                raise ConfigError(
                    f"algorithm.window_size ({self.window_size}) must fit in algorithm.window_range [{low}, {high}) "
                    f"inside the {sample.num_steps} sampling steps; shrink the window or widen the range."
                )
        if self.clip_low <= 0 or (self.clip_high is not None and self.clip_high <= 0):
            raise ConfigError("algorithm.clip_low and algorithm.clip_high must be > 0")
        if self.best_of_n_k is not None and not 1 <= 2 * self.best_of_n_k <= sample.group_size:
            raise ConfigError(
                f"algorithm.best_of_n_k ({self.best_of_n_k}) trains the top and bottom k of each group, so it must "
                f"satisfy 1 <= 2k <= sample.group_size ({sample.group_size}); lower it or set it to null"
            )
        if self._trainable_candidates(sample) == 0:
            raise ConfigError(
                f"this step selection trains no denoising step: algorithm.trainable_steps {self.trainable_steps} "
                f"holds no stochastic step of the {sample.num_steps}-step schedule (SDE window "
                f"{self.sde_range(sample.num_steps)}; CPS's last step is deterministic). Widen "
                "algorithm.trainable_steps or move the window"
            )

    def sde_range(self, num_steps: int) -> tuple[int, int]:
        """The widest range of steps the SDE may cover (a window strategy's range, else the whole schedule)."""
        if self.step_selection in ("random_window", "sliding_window"):
            return tuple(self.window_range or (0, num_steps))  # type: ignore[return-value]
        return 0, num_steps

    def _trainable_candidates(self, sample: Any) -> int:
        """How many steps can be trained: stochastic (inside the SDE range; CPS's last step has std 0), trainable."""
        steps = sample.num_steps
        low, high = self.sde_range(steps)
        if sample.sde_type == "cps":
            high = min(high, steps - 1)
        if self.trainable_steps is not None:
            trainable_low, trainable_high = self.trainable_steps
            if not 0 <= trainable_low < trainable_high <= steps:
                raise ConfigError(
                    f"algorithm.trainable_steps {self.trainable_steps} must satisfy 0 <= lo < hi <= "
                    f"sample.num_steps ({steps}) (hi exclusive)"
                )
            if self.step_selection in ("random_window", "sliding_window") and not (
                trainable_low <= low and high <= trainable_high
            ):
                raise ConfigError(
                    f"algorithm.trainable_steps {self.trainable_steps} must contain the window range [{low}, {high}) "
                    "(a window outside it would train nothing); widen it or set it to null"
                )
            low, high = max(low, trainable_low), min(high, trainable_high)
        return max(0, high - low)


@dataclass
class DiffusionNFTOptions(AlgorithmOptions):
    """DiffusionNFT (Zheng et al. 2025, NVlabs/DiffusionNFT): negative-aware fine-tuning on the forward process,
    no likelihoods. Defaults follow the reference code (``config/nft.py``, ``scripts/train_nft_sd3.py``); where it
    differs from the paper's text the option says so."""

    beta: float = option(
        1.0, "beta of the implicit policies v+- (paper eq. 5); reference 1.0 (0.1 for OCR and multi-reward)"
    )
    reward_clip: float = option(
        5.0,
        "c: r = 0.5 + clip(A, -c, c) / (2c), the loss is also scaled by c (reference adv_clip_max = 5; paper Z_c)",
    )
    kl_coef: float = option(
        1e-4,
        "weight of mean (v_theta - v_ref)^2 to the LoRA-disabled reference (reference code only); 0: no pass",
    )
    old_decay_rate: float = option(
        0.001, "soft update eta_i = min(rate * (i - flat), max) after optimizer update i (paper 0.001)"
    )
    old_decay_max: float = option(0.5, "cap of eta_i (paper / reference 0.5; 0.999 for OCR)")
    old_decay_flat: int = option(
        0, "updates with eta_i = 0 (a hard copy) before eta rises (reference OCR: 75)"
    )
    step_fraction: float = option(
        0.99,
        "floor(S x fraction) of the S sampling-grid times trained per sample, drawn at random (reference 0.99)",
    )
    adaptive_weight: bool = option(
        True,
        "x0 regression / stop-grad mean|x0_hat - x0| (paper Sec. 3.3); false: the plain velocity MSE of eq. 5",
    )

    def validate(self, config: Any) -> None:
        """Ranges, and a sampling config the forward process cannot use (CFG, epsilon-prediction DDIM)."""
        checks = (
            (self.beta > 0, f"algorithm.beta must be > 0, got {self.beta}"),
            (self.reward_clip > 0, f"algorithm.reward_clip must be > 0, got {self.reward_clip}"),
            (
                0.0 < self.step_fraction <= 1.0,
                f"algorithm.step_fraction must be in (0, 1], got {self.step_fraction}",
            ),
            (self.kl_coef >= 0, f"algorithm.kl_coef must be >= 0, got {self.kl_coef}"),
            (self.old_decay_rate >= 0, f"algorithm.old_decay_rate must be >= 0, got {self.old_decay_rate}"),
            (
                0.0 <= self.old_decay_max < 1.0,
                f"algorithm.old_decay_max must be in [0, 1), got {self.old_decay_max}",
            ),
            (self.old_decay_flat >= 0, f"algorithm.old_decay_flat must be >= 0, got {self.old_decay_flat}"),
        )
        for holds, message in checks:
            if not holds:
                raise ConfigError(message)
        sample = config.sample
        if sample.cfg_scale > 1.0:
            raise ConfigError(
                f"diffusion_nft trains CFG-free (the paper's setting), but sample.cfg_scale is {sample.cfg_scale}; "
                "set sample.cfg_scale: 1"
            )
        if sample.sde_type == "ddim":
            raise ConfigError(
                "diffusion_nft trains on the rectified-flow forward process x_t = (1 - t) x0 + t eps; "
                "sample.sde_type: ddim (epsilon-prediction SD) cannot express it. Use a FLUX or SD3 model"
            )
        if self.kl_coef > 0 and not config.model.lora:
            raise ConfigError(
                "algorithm.kl_coef > 0 needs the frozen reference, the model with its LoRA disabled; with model.lora: "
                "false there is none. Set model.lora: true or algorithm.kl_coef: 0"
            )


# name -> options class (the algorithm classes live in modules that import torch, see ALGORITHMS in __init__)
BUILTIN_OPTIONS: dict[str, type[AlgorithmOptions]] = {
    "grpo": PolicyGradientOptions,
    "flow_grpo": PolicyGradientOptions,
    "dance_grpo": PolicyGradientOptions,
    "diffusion_nft": DiffusionNFTOptions,
}
# the forward-process, reward-backprop, few-step (options_matching.py) and likelihood-ratio (options_likelihood.py)
# algorithms register themselves; imported last: they subclass the options above
import gen_rl.algorithms.options_likelihood  # noqa: E402, F401
import gen_rl.algorithms.options_matching  # noqa: E402, F401


def _refuse_other_algorithms_options(chosen: type, name: str, data: dict, where: str) -> None:
    """One line when the section holds options of another algorithm (switching ``name`` without removing them)."""
    own = {f.name for f in dataclasses.fields(chosen)}
    others = {f.name for options in BUILTIN_OPTIONS.values() for f in dataclasses.fields(options)} - own
    foreign = [key for key in data if key not in own and key in others]
    if foreign:
        raise ConfigError(
            f"{where}.{foreign[0]} is an option of another algorithm, not of {where}.name={name!r} (its options: "
            f"{', '.join(sorted(own - {'name'})) or 'none'}); remove {', '.join(foreign)} from the {where} section "
            "when switching algorithms"
        )


def options_class(name: str, where: str = "algorithm") -> type[AlgorithmOptions]:
    """The options dataclass for algorithm ``name`` (built-in or ``package.module:Class``); ConfigError if unknown."""
    if name in BUILTIN_OPTIONS:
        return BUILTIN_OPTIONS[name]
    if ":" in name:
        module_name, _, attribute = name.partition(":")
        try:
            algorithm = getattr(importlib.import_module(module_name), attribute)
        except (ImportError, AttributeError) as error:
            raise ConfigError(
                f"{where}.name {name!r} cannot be imported ({error}); make the module importable (pip install -e "
                "your package, or put it on PYTHONPATH)"
            ) from error
        options = getattr(algorithm, "Options", AlgorithmOptions)
        if not (isinstance(options, type) and issubclass(options, AlgorithmOptions)):
            raise ConfigError(f"{name}.Options must subclass gen_rl.algorithms.options.AlgorithmOptions")
        return options
    close = difflib.get_close_matches(name, list(BUILTIN_OPTIONS), n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    raise ConfigError(
        f"unknown algorithm {where}.name={name!r}.{hint} Known: {', '.join(sorted(BUILTIN_OPTIONS))}; or give "
        "'package.module:Class' of your own (see gen_rl/algorithms/base.py)"
    )
