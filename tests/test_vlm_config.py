"""VLM config: every YAML under configs/vlm loads and validates; invariants fail with the key and the fix."""

from __future__ import annotations

from pathlib import Path

import pytest

from gen_rl.core.config import ConfigError, describe, load_config, to_dict
from gen_rl.vlm.config import LOSS_NAMES, VLMConfig

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs" / "vlm"
MINIMAL = ["data.stages=[{synthetic: colour}]", "reward.functions=[{name: exact}]"]


@pytest.mark.parametrize("path", sorted(CONFIG_DIR.glob("*.yaml")), ids=lambda path: path.name)
def test_every_vlm_config_loads(path):
    config = load_config(VLMConfig, path)
    assert config.task == "vlm"
    assert config.train.loss in LOSS_NAMES
    first_line = path.read_text().splitlines()[0]
    assert first_line.startswith("# accelerate launch") and f"--config configs/vlm/{path.name}" in first_line
    assert from_round_trip(config) == config


def from_round_trip(config: VLMConfig) -> VLMConfig:
    from gen_rl.core.config import from_dict

    return from_dict(VLMConfig, to_dict(config))


def test_there_is_a_tiny_config_and_a_real_recipe():
    names = {path.name for path in CONFIG_DIR.glob("*.yaml")}
    assert {"tiny_colour_cpu.yaml", "qwen2_5_vl_3b_grounding.yaml"} <= names


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["task=generation"], "task must be 'vlm'"),
        (["sample.group_size=1"], "group_size must be >= 2"),
        (
            ["sample.prompts_per_step=3", "sample.group_size=4", "train.mini_batch_size=8"],
            "must divide the rollout",
        ),
        (["train.mini_batch_size=8", "train.micro_batch_size=3"], "micro_batch_size=3 must divide"),
        (["train.loss=dapo", "train.clip_low=0.2"], "clip-higher"),
        (["train.loss=ppo"], "train.loss must be one of"),
        (["model.reference=disable_adapter"], "needs model.lora.enabled"),
        (["data.stages=[]"], "data.stages is empty"),
        (
            ["data.stages=[{name: a, synthetic: colour}, {name: b, synthetic: colour, steps: 3}]"],
            "steps is 0",
        ),
        (["reward.functions=[]"], "reward.functions is empty"),
        (["sample.temperature=0"], "temperature must be > 0"),
        (["train.lr=-1e-6"], r"train.lr must be > 0 \(the AdamW learning rate\), got -1e-06"),
        (["train.lr=.nan"], "train.lr is nan; give a finite number"),
        (["reward.functions=[{name: exact, weight: .inf}]"], r"reward.functions\[0\].weight is inf"),
        (["train.adam_betas=[0.9, 1.5]"], "train.adam_betas must be two numbers in"),
        (["data.bad_records=ignore"], "data.bad_records must be 'abort' or 'skip'"),
        (["model.lora.dropout=1.0"], "model.lora.dropout must be in"),
        (["model.lora.enabled=true", "model.lora.r=0"], "model.lora.r must be >= 1"),
        (["model.min_pixels=1000", "model.max_pixels=10"], "exceeds model.max_pixels"),
        (["train.weight_decay=-0.1"], "train.weight_decay must be >= 0"),
        (["log.output_dir="], "log.output_dir is empty"),
    ],
)
def test_invalid_configs_name_the_key(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(VLMConfig, None, [*MINIMAL, *overrides])


def test_minimal_config_defaults():
    config = load_config(VLMConfig, None, MINIMAL)
    assert config.batch_size == 64 and config.mini_batch_size == 64
    assert config.clip_high == config.train.clip_low  # unset clip_high mirrors clip_low
    config = load_config(VLMConfig, None, [*MINIMAL, "train.loss=dapo", "train.clip_high=0.28"])
    assert config.clip_high == 0.28


def test_unknown_key_suggests_the_right_one():
    with pytest.raises(ConfigError, match="Did you mean 'sample.group_size'"):
        load_config(VLMConfig, None, [*MINIMAL, "sample.group_sise=4"])


def test_describe_documents_every_key():
    lines = describe(VLMConfig)
    assert any(line.startswith("train.loss = 'grpo'  # objective") for line in lines)
    assert all("#" in line or line.startswith("[") for line in lines)


def test_dtype_names_match_the_torch_table_without_importing_torch():
    from gen_rl.core.dtypes import DTYPES as TORCH_DTYPES
    from gen_rl.vlm.config import DTYPES

    assert tuple(TORCH_DTYPES) == DTYPES  # vlm/config.py lists them itself so that it imports no torch
