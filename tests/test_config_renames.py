"""Renamed config keys (``renamed_keys`` on a root config class): an old key fails with one line naming the new one,
from a YAML file and from a command-line override, before any dataclass is built."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import pytest

from gen_rl.core.config import ConfigError, load_config, option, section

BUILT: list[str] = []  # section classes constructed (to prove the check runs before any is built)


@dataclass
class Train:
    """Training."""

    num_steps: int = option(10, "steps")
    lr: float = option(1e-3, "learning rate")

    def __post_init__(self) -> None:
        BUILT.append("train")


@dataclass
class Algorithm:
    """Objective."""

    kl_coef: float = option(0.0, "KL coefficient")


@dataclass
class Checkpoint:
    """Checkpoints."""

    every_steps: int = option(0, "period")


@dataclass
class Root:
    """A root config with renamed keys (old dotted key -> new dotted key)."""

    renamed_keys: ClassVar[dict[str, str]] = {
        "train.steps": "train.num_steps",
        "train.beta": "algorithm.kl_coef",
        "log.checkpoint_every": "checkpoint.every_steps",
    }
    seed: int = option(0, "seed")
    train: Train = section(Train)
    algorithm: Algorithm = section(Algorithm)
    checkpoint: Checkpoint = section(Checkpoint)


@pytest.fixture(autouse=True)
def _clear_built():
    BUILT.clear()


def _message(error: pytest.ExceptionInfo) -> str:
    return str(error.value)


def test_an_old_key_in_a_yaml_names_the_new_key_in_one_line(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("train:\n  lr: 0.1\n  beta: 0.04\n")
    with pytest.raises(ConfigError) as error:
        load_config(Root, path)
    assert _message(error) == (
        "config key 'train.beta' was renamed to 'algorithm.kl_coef'; rename it in your YAML or command-line override"
    )
    assert BUILT == []  # refused before any dataclass was built


def test_an_old_key_in_an_override_gives_the_same_line(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("train:\n  num_steps: 3\n")
    with pytest.raises(ConfigError) as error:
        load_config(Root, path, ["train.steps=5"])
    assert (
        _message(error)
        == "config key 'train.steps' was renamed to 'train.num_steps'; rename it in your YAML or command-line override"
    )


def test_a_key_moved_to_another_section_is_named_even_when_the_old_section_is_gone():
    # 'log' is not a section of Root at all: without the rename table this would be "unknown config key 'log'"
    expected = r"^config key 'log\.checkpoint_every' was renamed to 'checkpoint\.every_steps'"
    with pytest.raises(ConfigError, match=expected):
        load_config(Root, None, ["log.checkpoint_every=5"])


def test_the_first_old_key_in_file_order_is_reported(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("log:\n  checkpoint_every: 2\ntrain:\n  steps: 4\n")
    with pytest.raises(ConfigError, match="'log.checkpoint_every' was renamed"):
        load_config(Root, path)


def test_the_new_keys_load_and_other_unknown_keys_keep_their_own_message():
    config = load_config(
        Root, None, ["train.num_steps=7", "algorithm.kl_coef=0.04", "checkpoint.every_steps=3"]
    )
    assert (config.train.num_steps, config.algorithm.kl_coef, config.checkpoint.every_steps) == (7, 0.04, 3)
    with pytest.raises(
        ConfigError, match=r"unknown config key 'train\.num_step'\. Did you mean 'train\.num_steps'"
    ):
        load_config(Root, None, ["train.num_step=7"])


def test_a_class_without_renamed_keys_reports_old_keys_as_unknown():
    @dataclass
    class Plain:
        """No rename table."""

        train: Train = section(Train)

    with pytest.raises(ConfigError, match=r"unknown config key 'train\.beta'"):
        load_config(Plain, None, ["train.beta=0.1"])
