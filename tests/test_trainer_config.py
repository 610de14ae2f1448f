"""Config loading and validation: every YAML under configs/, overrides, and one clear error per bad input."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
from trainer_helpers import small_config

from gen_rl.core.config import ConfigError, describe, load_config
from gen_rl.data import DataError, load_prompts, prompt_indices_for_step
from gen_rl.train import main, task_of
from gen_rl.trainer_config import GenerationConfig

CONFIGS_ROOT = Path(__file__).resolve().parents[1] / "configs"
CONFIGS = sorted(CONFIGS_ROOT.rglob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=[str(p.relative_to(p.parents[1])) for p in CONFIGS])
def test_every_config_file_loads_and_validates(path):
    from gen_rl.train import config_class_of

    task = task_of(str(path), [])
    config = load_config(config_class_of(task), path)
    assert config.task == task
    first_line = path.read_text().splitlines()[0]
    assert first_line.startswith("# ")  # the file opens with the exact command that runs it
    assert f"gen_rl/train.py --config {path.relative_to(CONFIGS_ROOT.parent)}" in first_line


def test_generation_configs_name_registered_rewards_and_families():
    from pipelines import SAMPLERS
    from rewards import REWARDS
    from rewards.base import _check_arguments

    for path in CONFIGS:
        if task_of(str(path), []) != "generation":
            continue
        config = load_config(GenerationConfig, path)
        assert config.model.family in SAMPLERS
        for term in [*config.reward.terms, *config.eval.gold]:
            assert term.name in REWARDS, (path, term.name)
            _check_arguments(REWARDS[term.name], term.name, term.kwargs)  # the kwargs fit the constructor


def test_overrides_change_values_and_keep_types(tmp_path):
    config = small_config(tmp_path, "train.lr=1e-5", "algorithm.window_range=[0,3]", "sample.guidance=null")
    assert config.train.lr == 1e-5 and isinstance(config.train.lr, float)
    assert config.algorithm.window_range == (0, 3)
    assert config.sample.guidance is None


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("train.lrr=1", "unknown config key 'train.lrr'. Did you mean 'train.lr'"),
        ("sampel.group_size=2", "unknown config key 'sampel'. Did you mean 'sample'"),
        ("sample.sde_type=ddpm", "sample.sde_type must be one of 'flow_grpo', 'dance_grpo', 'cps'"),
        ("train.lr=fast", "train.lr must be float"),
        (
            "sample.groups_per_rollout=3",
            r"groups per process \(2 = groups_per_step / processes\) must be divisible "
            r"by sample.groups_per_rollout \(3\)",
        ),
        (
            "train.samples_per_update=3",
            r"samples per process per step \(8 .*\) must be divisible by "
            r"train.samples_per_update \(3\)",
        ),
        (
            "train.microbatch_size=3",
            r"samples_per_update \(4\) must be divisible by train.microbatch_size \(3\)",
        ),
        ("algorithm.step_fraction=0", r"step_fraction must be in \(0, 1\]"),
        ("data.train_prompts=", "data.train_prompts is empty"),
    ],
)
def test_bad_config_gives_one_clear_error(tmp_path, override, message):
    with pytest.raises(ConfigError, match=message):
        small_config(tmp_path, override)


def test_group_split_across_processes_is_validated(tmp_path):
    config = small_config(tmp_path)
    with pytest.raises(
        ConfigError, match=r"groups_per_step \(2\) must be divisible by the number of processes \(4\)"
    ):
        config.validate(num_processes=4)


def test_window_must_fit_the_schedule(tmp_path):
    with pytest.raises(ConfigError, match="window_size .* must fit"):
        small_config(tmp_path, "algorithm.step_selection=random_window", "algorithm.window_size=9")


def test_every_field_is_documented():
    lines = describe(GenerationConfig)
    fields = [line for line in lines if not line.startswith("[")]
    assert all("  # " in line and not line.endswith("# ") for line in fields)
    assert any(line.startswith("algorithm.clip_low = 0.0001  # ") for line in lines)


def test_describe_and_missing_config_from_the_command_line(capsys, tmp_path):
    assert main(["--describe"]) == {}
    assert "sample.group_size = 8" in capsys.readouterr().out
    with pytest.raises(ConfigError, match="--config is required"):
        main([])
    with pytest.raises(ConfigError, match="does not exist"):
        main(["--config", str(tmp_path / "missing.yaml")])


def test_unknown_reward_name_is_reported(tmp_path):
    from gen_rl.trainer import GenerationTrainer

    config = small_config(tmp_path)
    config.reward.terms[0] = dataclasses.replace(config.reward.terms[0], name="colr")
    with pytest.raises(ValueError, match="unknown reward 'colr'. Did you mean 'colo"):
        GenerationTrainer(config)


def test_prompt_files(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n")
    with pytest.raises(ValueError, match="is empty"):
        load_prompts(empty)
    with pytest.raises(DataError, match=f"prompt file {tmp_path / 'nope.txt'} .* does not exist"):
        load_prompts(tmp_path / "nope.txt")
    records = tmp_path / "p.jsonl"
    records.write_text('{"prompt": "a red cat", "colour": "blue"}\n\n{"prompt": "a dog"}\n')
    prompts = load_prompts(records)
    assert prompts.prompts == ["a red cat", "a dog"] and prompts.metadata == [{"colour": "blue"}, {}]
    records.write_text('{"text": "a red cat"}\n')
    with pytest.raises(DataError, match=r"p.jsonl:1: each JSONL record needs a non-empty string 'prompt'"):
        load_prompts(records)


def test_prompt_schedule_walks_epochs_without_repeats():
    seen = [index for step in range(5) for index in prompt_indices_for_step(10, step, 4, seed=3)]
    assert sorted(seen[:10]) == list(range(10)) and sorted(seen[10:20]) == list(range(10))
    assert seen[:10] != list(range(10))  # shuffled
    assert prompt_indices_for_step(10, 2, 4, seed=3) == seen[8:12]  # depends only on (seed, step)
