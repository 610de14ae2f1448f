"""A trained preference model in use: it loads by path as the ``preference_model`` reward of a generation run of
the demo config and scores exactly as in its evaluation; a generator trained against it moves towards the
preference's hidden answer (held-out distance to red, the gold criterion); the reward service serves it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from trainer_helpers import LEARNING, small_config

from gen_rl.reward_model.evaluation import load_image
from gen_rl.train import main
from rewards import build_reward
from rewards.preference_model import load_preference_model
from rewards.serve import RewardServer

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "reward_model" / "tiny_colour_preference_cpu.yaml"
BATCH = 8
# the gold criterion: 1 - mean RGB distance to red / sqrt(3), whatever colour the eval prompt names
GOLD = "eval.gold=[{name: colour, kwargs: {colours: {red: [1, 0, 0], blue: [1, 0, 0]}}}]"


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A tiny DINOv2 + linear head trained on the synthetic colour preference (the shipped config, shortened)."""
    run = tmp_path_factory.mktemp("reward_model") / "run"
    summary = main(
        [
            "--config",
            str(TINY),
            f"log.output_dir={run}",
            "model.head=linear",
            "train.num_steps=30",
            "eval.every_steps=0",
            f"eval.batch_size={BATCH}",
            "log.progress=false",
        ]
    )
    assert summary["eval/accuracy"] >= 0.9, summary
    return run


def _term(model: Path) -> str:
    return f"reward.terms=[{{name: preference_model, kwargs: {{path: {model}, batch_size: {BATCH}}}}}]"


def test_the_generation_run_scores_exactly_as_the_evaluation(trained, tmp_path):
    from gen_rl.trainer import GenerationTrainer

    trainer = GenerationTrainer(small_config(tmp_path / "gen", _term(trained / "model")))
    (reward,) = trainer.reward_models.values()
    rows = [json.loads(line) for line in (trained / "eval" / "scores.jsonl").read_text().splitlines()]
    for first in range(
        0, 16, BATCH // 2
    ):  # the evaluation's forwards: images a1, b1, a2, b2, ... 8 at a time
        batch = rows[first : first + BATCH // 2]
        paths = [path for row in batch for path in (row["image_a"], row["image_b"])]
        pixels = torch.stack([load_image(Path(path)) for path in paths])
        scores = reward(pixels, [row["prompt"] for row in batch for _ in range(2)]).scores
        expected = torch.tensor([score for row in batch for score in (row["score_a"], row["score_b"])])
        assert torch.equal(scores, expected), (scores, expected)
    # and the generator's own samples score the same through the run's reward and a fresh load of the folder
    rollout = trainer.sample(0).rollout
    fresh = load_preference_model(trained / "model")
    prompts = list(rollout.prompts)
    with torch.no_grad():
        direct = torch.cat(
            [fresh(rollout.pixels[i : i + BATCH], prompts[i : i + BATCH]) for i in range(0, 8, BATCH)]
        )
    assert torch.equal(reward(rollout.pixels, prompts).scores, direct)


def test_a_generator_trained_against_it_gets_closer_to_the_hidden_target(trained, tmp_path):
    """10 Flow-GRPO steps on the demo against the learned reward: measured gold +0.03 (distance to red falls)."""
    from gen_rl.trainer import GenerationTrainer

    config = small_config(tmp_path / "gen", *LEARNING, _term(trained / "model"), GOLD, "train.num_steps=10")
    trainer = GenerationTrainer(config)
    before = trainer.evaluate(0)
    for step in range(10):
        trainer.run_step(step)
    after = trainer.evaluate(10)
    assert after["eval/gold/colour"] - before["eval/gold/colour"] > 0.01, (before, after)
    assert after["eval/reward/mean"] > before["eval/reward/mean"]


def test_the_reward_service_serves_it(trained):
    local = build_reward("preference_model", path=str(trained / "model"), batch_size=BATCH)
    pixels = torch.rand(6, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    prompts = ["a red ball"] * 6
    server = RewardServer(local, name="preference_model")
    url = server.start()
    try:
        remote = build_reward("remote", url=url, timeout_s=10.0, retries=0, fmt="safetensors_float32")
        served = remote(pixels, prompts).scores
    finally:
        server.stop()
    assert torch.equal(served, local(pixels, prompts).scores)  # safetensors float32 on the wire: lossless
