"""Settings that cannot work together are refused by validation, before any model loads, with the fix named."""

from __future__ import annotations

import pytest
from trainer_helpers import small_config

from gen_rl.core.config import ConfigError


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            ("model.lora=false", "algorithm.kl_coef=0.01"),
            "there is none. Set model.lora: true or algorithm.kl_coef: 0",
        ),
        (("algorithm.log_prob_convention=flow_grpo_cps",), "sample.sde_type: cps"),
        (("sample.noise_level=0",), "nothing can be trained"),
        (("algorithm.trainable_steps=[3,3]",), "0 <= lo < hi"),
        (("algorithm.trainable_steps=[0,9]",), r"0 <= lo < hi <= sample.num_steps \(4\)"),
        (("sample.sde_type=cps", "algorithm.trainable_steps=[3,4]"), "trains no denoising step"),
        (
            (
                "algorithm.step_selection=random_window",
                "algorithm.window_size=2",
                "algorithm.trainable_steps=[0,2]",
            ),
            "must contain the window range",
        ),
        (
            ("algorithm.step_selection=random_window", "algorithm.window_size=5"),
            "must fit in algorithm.window_range",
        ),
        (("reward.per_prompt_tracker=true", "reward.std_mode=global"), "would be ignored"),
        (("reward.std_ddof=2",), "std_ddof must be 0"),
        (("train.ratio_check_fraction=0",), "ratio_check_fraction must be in"),
        (("sample.sde_type=ddim",), "'ddim' is not a step of the flux family"),
        (
            ("algorithm.name=diffusion_nft",),  # the demo's Flow-GRPO options stay in the section
            r"algorithm.step_selection is an option of another algorithm, not of algorithm.name='diffusion_nft'",
        ),
        (("model.family=sd", "model.pretrained=tiny:sd"), "'flow_grpo' is not a step of the sd family"),
        (
            (
                "algorithm.kl_estimator=flow_grpo",
                "model.family=sd",
                "model.pretrained=tiny:sd",
                "sample.sde_type=ddim",
            ),
            "with sample.sde_type: ddim use algorithm.kl_estimator: gaussian",
        ),
    ],
)
def test_impossible_combinations_are_refused_before_any_model_loads(tmp_path, overrides, message):
    with pytest.raises(ConfigError, match=message):
        small_config(tmp_path, *overrides).validate()  # loading validates already; validate() again otherwise


def test_the_shipped_combinations_pass(tmp_path):
    small_config(tmp_path, "sample.sde_type=cps", "algorithm.log_prob_convention=flow_grpo_cps").validate()
    small_config(
        tmp_path, "algorithm.trainable_steps=[0,3]", "algorithm.step_selection=random_fraction"
    ).validate()
    small_config(tmp_path, "model.lora=false").validate()  # full fine-tuning without KL is fine
