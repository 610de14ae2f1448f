"""A user algorithm, written outside the package, trains through the same trainer from ``package.module:Class``.

The module below lives in a temporary folder on ``sys.path`` (as a user's own package would): a plain REINFORCE
over the SDE steps (no ratio, no clipping: ``loss = -mean_i w_i A_i log p(x_next | x)`` per step) with its own
option (``scale``). Nothing in gen_rl is edited or registered for it.
"""

from __future__ import annotations

import textwrap

import pytest
from trainer_helpers import small_config

from gen_rl.core.config import ConfigError, from_dict, to_dict
from gen_rl.trainer import GenerationTrainer
from gen_rl.trainer_config import GenerationConfig

USER_MODULE = """
from dataclasses import dataclass

import torch

from gen_rl.algorithms.base import Algorithm
from gen_rl.algorithms.options import AlgorithmOptions
from gen_rl.core.config import option


@dataclass
class ReinforceOptions(AlgorithmOptions):
    scale: float = option(1.0, "multiplies the loss")


class Reinforce(Algorithm):
    Options = ReinforceOptions
    needs = frozenset({"log_probs"})
    calls = 0

    def select(self, rollout, step):
        return torch.nonzero(rollout.stochastic[0]).flatten().expand(len(rollout), -1)

    def loss(self, batch, policy):
        type(self).calls += 1
        log_probs = policy.sampler.log_prob(batch.rollout, batch.units).log_probs[:, 0]
        loss = -(batch.weight * batch.advantages * log_probs).mean() * self.options.scale
        return loss, {"loss/total": loss.detach()}
"""

LEARNING = (
    "train.lr=3e-2",
    "train.samples_per_update=8",
    "train.microbatch_size=8",
    "sample.groups_per_step=4",
    "sample.groups_per_rollout=2",
    "checkpoint.every_steps=0",
    "eval.every_steps=0",
    "eval.max_prompts=4",
    "log.monitors=false",
)


def user_config(output_dir, algorithm: dict) -> GenerationConfig:
    """The small test config with its ``algorithm`` section replaced (the demo's Flow-GRPO keys removed)."""
    data = to_dict(small_config(output_dir, *LEARNING))
    data["algorithm"] = algorithm
    config = from_dict(GenerationConfig, data)
    config.validate()
    return config


@pytest.fixture
def user_package(tmp_path, monkeypatch):
    folder = tmp_path / "user_code"
    folder.mkdir()
    (folder / "my_algorithms.py").write_text(textwrap.dedent(USER_MODULE))
    monkeypatch.syspath_prepend(str(folder))
    yield "my_algorithms:Reinforce"


def test_a_user_algorithm_from_a_dotted_path_trains_in_the_right_direction(tmp_path, user_package):
    config = user_config(tmp_path / "run", {"name": user_package, "scale": 1.0})
    trainer = GenerationTrainer(config)
    assert type(trainer.algorithm).__name__ == "Reinforce" and trainer.algorithm.options.scale == 1.0
    before = trainer.evaluate(0)["eval/reward/mean"]
    for step in range(8):
        trainer.run_step(step)
    after = trainer.evaluate(8)["eval/reward/mean"]
    assert type(trainer.algorithm).calls > 0
    assert after - before > 0.005, (before, after)


def test_a_user_algorithm_flipped_sign_does_not_learn(tmp_path, user_package):
    """The same run with the loss's sign flipped (scale -1) moves the held-out reward the other way."""
    config = user_config(tmp_path / "run", {"name": user_package, "scale": -1.0})
    trainer = GenerationTrainer(config)
    before = trainer.evaluate(0)["eval/reward/mean"]
    for step in range(8):
        trainer.run_step(step)
    assert trainer.evaluate(8)["eval/reward/mean"] < before


def test_a_user_algorithm_option_typo_fails_at_config_time(tmp_path, user_package):
    with pytest.raises(
        ConfigError, match=r"unknown config key 'algorithm.scal'. Did you mean 'algorithm.scale'"
    ):
        user_config(tmp_path, {"name": user_package, "scal": 2})


def test_an_algorithm_needing_what_no_sampler_records_is_refused_at_start(tmp_path, user_package):
    """Tree rollouts (``branches``) are not recorded by any sampler yet: one line, before training."""
    import my_algorithms

    class Branching(my_algorithms.Reinforce):
        needs = frozenset({"log_probs", "branches"})

    my_algorithms.Branching = Branching
    config = user_config(tmp_path / "run", {"name": "my_algorithms:Branching"})
    with pytest.raises(
        ConfigError, match=r"needs rollouts that record \['branches'\], which the flux sampler"
    ):
        GenerationTrainer(config)


def test_an_unknown_algorithm_names_the_known_ones(tmp_path):
    with pytest.raises(
        ConfigError, match=r"unknown algorithm algorithm.name='flow_grp'. Did you mean 'flow_grpo'"
    ):
        small_config(tmp_path, "algorithm.name=flow_grp")
