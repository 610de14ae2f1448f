"""VLM config: every YAML under configs/vlm loads and validates; invariants fail with the key and the fix."""

from __future__ import annotations

from pathlib import Path

import pytest

from gen_rl.core.config import ConfigError, describe, load_config, to_dict
from gen_rl.vlm.config import LOSS_NAMES, RENAMED_KEYS, VLMConfig

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs" / "vlm"
MINIMAL = ["data.stages=[{synthetic: colour}]", "reward.terms=[{name: exact}]"]


@pytest.mark.parametrize("path", sorted(CONFIG_DIR.glob("*.yaml")), ids=lambda path: path.name)
def test_every_vlm_config_loads(path):
    config = load_config(VLMConfig, path)
    assert config.task == "vlm"
    assert config.algorithm.name in LOSS_NAMES
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
            ["sample.groups_per_step=3", "sample.group_size=4", "train.samples_per_update=8"],
            "must divide the rollout",
        ),
        (["train.samples_per_update=8", "train.microbatch_size=3"], "microbatch_size=3 must divide"),
        (["algorithm.name=dapo", "algorithm.clip_low=0.2"], "clip-higher"),
        (["algorithm.name=ppo"], "algorithm.name must be one of"),
        (["algorithm.clip_high=0"], r"algorithm.clip_high must be > 0, or null for clip_low"),
        (["reward.advantage_clip=0"], r"reward.advantage_clip must be > 0 .* or null \(no clamp\)"),
        (["reward.std_mode=batch"], "reward.std_mode must be one of null, 'group'"),
        (["checkpoint.keep_last=0"], "checkpoint.keep_last must be >= 1"),
        (["checkpoint.every_steps=-1"], "checkpoint.every_steps must be >= 0"),
        (["model.reference=disable_adapter"], "needs model.lora.enabled"),
        (["data.stages=[]"], "data.stages is empty"),
        (
            ["data.stages=[{name: a, synthetic: colour}, {name: b, synthetic: colour, steps: 3}]"],
            "steps is 0",
        ),
        (["reward.terms=[]"], "reward.terms is empty"),
        (["sample.temperature=0"], "temperature must be > 0"),
        (["train.lr=-1e-6"], r"train.lr must be > 0 \(the AdamW learning rate\), got -1e-06"),
        (["train.lr=.nan"], "train.lr is nan; give a finite number"),
        (["reward.terms=[{name: exact, weight: .inf}]"], r"reward.terms\[0\].weight is inf"),
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
    assert config.batch_size == 64
    assert config.samples_per_update(1) == 64 and config.samples_per_update(4) == 16  # 0: a process's share
    assert config.algorithm.clip_high is None
    assert config.algorithm.clip_high_or_low == config.algorithm.clip_low  # null clip_high mirrors clip_low
    assert config.reward.advantage_clip is None and config.reward.std_mode is None
    assert (config.checkpoint.every_steps, config.checkpoint.keep_last) == (0, 2)
    config = load_config(VLMConfig, None, [*MINIMAL, "algorithm.name=dapo", "algorithm.clip_high=0.28"])
    assert config.algorithm.clip_high_or_low == 0.28
    config = load_config(VLMConfig, None, [*MINIMAL, "train.samples_per_update=8"])
    assert config.samples_per_update(1) == config.samples_per_update(4) == 8  # per process, any count


def test_unknown_key_suggests_the_right_one():
    with pytest.raises(ConfigError, match="Did you mean 'sample.group_size'"):
        load_config(VLMConfig, None, [*MINIMAL, "sample.group_sise=4"])


def test_describe_documents_every_key():
    lines = describe(VLMConfig)
    assert any(line.startswith("algorithm.name = 'grpo'  # objective") for line in lines)
    assert all("#" in line or line.startswith("[") for line in lines)


def test_dtype_names_match_the_torch_table_without_importing_torch():
    from gen_rl.core.dtypes import DTYPES as TORCH_DTYPES
    from gen_rl.vlm.config import DTYPES

    assert tuple(TORCH_DTYPES) == DTYPES  # vlm/config.py lists them itself so that it imports no torch


def _is_field(config_class: type, dotted: str) -> bool:
    import dataclasses
    import typing

    for name in dotted.split("."):
        fields = {field.name for field in dataclasses.fields(config_class)}
        if name not in fields:
            return False
        config_class = typing.get_type_hints(config_class)[name]
    return True


@pytest.mark.parametrize(("old", "new"), sorted(RENAMED_KEYS.items()))
def test_every_old_key_names_its_new_key(old, new):
    """The vocabulary shared with the generation trainer: each old key fails with one line naming a real key."""
    assert _is_field(VLMConfig, new) and not _is_field(VLMConfig, old)
    with pytest.raises(ConfigError) as error:
        load_config(VLMConfig, None, [*MINIMAL, f"{old}=1"])
    assert (
        str(error.value)
        == f"config key {old!r} was renamed to {new!r}; rename it in your YAML or command-line override"
    )


def test_the_shared_keys_carry_the_generation_trainers_names():
    """The keys VOCABULARY.md lists exist under the same section and name as in the generation trainer."""
    shared = (
        "train.num_steps", "train.inner_epochs", "train.samples_per_update", "train.microbatch_size",
        "train.warmup_updates", "algorithm.name", "algorithm.clip_low", "algorithm.clip_high", "algorithm.kl_coef",
        "algorithm.kl_estimator", "reward.terms", "reward.std_mode", "reward.std_eps", "reward.advantage_clip",
        "sample.groups_per_step", "log.progress", "checkpoint.every_steps",
    )  # fmt: skip
    assert [key for key in shared if not _is_field(VLMConfig, key)] == []


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["sample.groups_per_step=3"], "sample.groups_per_step=3 must be divisible by the 2 processes"),
        (["train.samples_per_update=8"], r"samples_per_update=8 must divide each process's share .* = 12\)"),
        (
            ["train.microbatch_size=5"],
            r"microbatch_size=5 must divide the 12 completions of an optimizer update",
        ),
    ],
)
def test_samples_per_update_is_per_process(overrides, message):
    """train.samples_per_update counts one process's completions: 24 per step over 2 processes is 12 each, so 12
    and 6 fit and 8 (which divides 24) does not."""
    from types import SimpleNamespace

    from gen_rl.vlm.trainer import VLMTrainer

    def check(*extra: str) -> None:
        config = load_config(
            VLMConfig, None, [*MINIMAL, "sample.groups_per_step=6", "sample.group_size=4", *extra]
        )
        VLMTrainer._check_process_split(
            SimpleNamespace(config=config, accelerator=SimpleNamespace(num_processes=2))
        )

    check("train.samples_per_update=12")
    check("train.samples_per_update=6", "train.microbatch_size=3")
    with pytest.raises(ConfigError, match=message):
        check(*overrides)
