"""``task: unified`` through the entry point (``gen_rl.train.main``) on the tiny Janus built in code: the
self-rewarded run raises its own reward with the gold reward reported beside it, a resumed run continues
bit-exactly, and a bad key or a term without a judge is one line before any model loads."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from gen_rl.train import cli, main

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "configs" / "unified" / "tiny_janus_self_reward_cpu.yaml")


@pytest.fixture
def one_thread():
    """A few hundred tiny ops per step: one thread avoids oversubscribing a shared CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def records(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]


def test_self_rewarded_run_raises_its_own_reward_with_gold_beside_it(tmp_path, one_thread):
    summary = main(["--config", TINY, f"log.output_dir={tmp_path}"])
    rows = records(tmp_path)
    own = [row["reward/mean"] for row in rows if "reward/mean" in row]
    assert len(own) == 15
    assert sum(own[-3:]) / 3 > sum(own[:3]) / 3 + 0.1  # measured 0.26 -> 0.55
    evals = [row for row in rows if "eval/reward/mean" in row]
    assert [row["step"] for row in evals] == [0, 5, 10, 15]
    assert (
        evals[-1]["eval/reward/mean"] > evals[0]["eval/reward/mean"] + 0.05
    )  # held-out own reward 0.21 -> 0.33
    assert all(
        math.isfinite(row["eval/gold/colour"]) for row in evals
    )  # gold beside it (flat: 0.487 -> 0.486)
    assert summary["last/reward/mean"] == own[-1] and "last/eval/gold/colour" in summary
    grids = sorted(path.name for path in (tmp_path / "eval_images").iterdir())
    assert grids == [f"step_{step:05d}.png" for step in (0, 5, 10, 15)]
    assert (tmp_path / "checkpoints" / "checkpoint-000015").is_dir()


def trained_weights(folder: Path, step: int) -> dict[str, torch.Tensor]:
    return load_file(
        str(folder / "checkpoints" / f"checkpoint-{step:06d}" / "accelerate" / "model.safetensors")
    )


def test_resumed_run_continues_bit_exactly(tmp_path, one_thread):
    """4 steps straight == 2 steps + --resume + 2 steps: records (rewards, losses, evals) and weights equal."""
    small = [
        "sample.group_size=4", "train.samples_per_update=4", "train.microbatch_size=2", "train.inner_epochs=2",
        "eval.every_steps=2", "eval.samples_per_prompt=2", "checkpoint.every_steps=0",
    ]  # fmt: skip
    straight, split = tmp_path / "straight", tmp_path / "split"
    main(["--config", TINY, f"log.output_dir={straight}", "train.num_steps=4", *small])
    main(["--config", TINY, f"log.output_dir={split}", "train.num_steps=2", *small])
    main(["--resume", "--config", TINY, f"log.output_dir={split}", "train.num_steps=4", *small])

    def values(folder):
        return [
            {k: v for k, v in row.items() if not k.startswith(("time/", "perf/"))} for row in records(folder)
        ]

    assert values(split) == values(straight)
    assert [row["step"] for row in values(split)] == [0, 1, 2, 3, 4]
    first, second = trained_weights(straight, 4), trained_weights(split, 4)
    assert first.keys() == second.keys() and any("generation_head" in key for key in first)
    for key in first:
        assert torch.equal(first[key], second[key]), key
    assert not torch.equal(trained_weights(split, 2)[key], first[key])  # the resumed steps did train


@pytest.mark.parametrize(
    ("override", "message"),
    [
        (
            "reward.terms=[{name: srum}]",
            "reward.terms[0] (srum) has no judge: set reward.terms[0].kwargs.judge: self",
        ),
        ("reward.terms=[{name: colour, kwargs: {judge: self}}]", "'colour' is not a self-reward"),
        ("train.beta=0.1", "config key 'train.beta' was renamed to 'algorithm.kl_coef'"),
        ("train.num_stepz=3", "train.num_stepz"),
        ("eval.gold=[{name: no_such_reward}]", "eval.gold[0]"),
    ],
)
def test_bad_inputs_are_one_line_before_any_model_loads(tmp_path, capsys, monkeypatch, override, message):
    def no_model(*args, **kwargs):
        raise AssertionError("the model loaded before the input error")

    monkeypatch.setattr("rewards.tiny_judges.tiny_janus", no_model)
    assert cli(["--config", TINY, f"log.output_dir={tmp_path}", override]) == 2
    error = capsys.readouterr().err
    assert error.startswith("error: ") and error.count("\n") == 1 and message in error
