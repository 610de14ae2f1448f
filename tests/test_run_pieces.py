"""Unit tests of the trainer's pieces: step selection, checkpoint rotation, EMA, metrics file."""

from __future__ import annotations

import json
import math

import pytest
import torch

from gen_rl.checkpoint import CheckpointManager
from gen_rl.core.ema import ParameterEMA
from gen_rl.core.step_selection import sde_window, train_step_indices
from gen_rl.metrics import MetricsLog, plot_reward_curve

WINDOW = {"window_size": 3, "window_range": None, "stride": 2, "every": 2, "seed": 0}


def test_full_sde_strategies_have_no_window():
    for strategy in ("all", "random_fraction", "first"):
        assert sde_window(strategy, 5, 10, **WINDOW) is None


def test_random_window_stays_inside_its_range_and_depends_on_seed_and_step():
    windows = [
        sde_window("random_window", step, 10, **{**WINDOW, "window_range": (2, 8)}) for step in range(40)
    ]
    assert all(start >= 2 and end == start + 3 <= 8 for start, end in windows)
    assert len({start for start, _ in windows}) == 4  # every legal start (2..5) is drawn
    again = [
        sde_window("random_window", step, 10, **{**WINDOW, "window_range": (2, 8)}) for step in range(40)
    ]
    assert again == windows


def test_sliding_window_moves_by_stride_every_n_steps_and_wraps():
    starts = [sde_window("sliding_window", step, 8, **WINDOW)[0] for step in range(12)]
    # 8 steps, window 3: starts 0..5 (6 of them); +2 every 2 training steps, wrapping modulo 6
    assert starts == [0, 0, 2, 2, 4, 4, 0, 0, 2, 2, 4, 4]


def test_train_step_indices_per_strategy():
    stochastic = torch.ones(3, 10, dtype=torch.bool)
    stochastic[:, 9] = False  # e.g. the deterministic last step of CPS
    assert (
        train_step_indices(stochastic, "all", fraction=0.5, seed=0, step=0).tolist() == [list(range(9))] * 3
    )
    assert (
        train_step_indices(stochastic, "first", fraction=0.5, seed=0, step=0).tolist()
        == [[0, 1, 2, 3]] * 3  # floor(0.5 * 9) = 4, the papers' int(num_steps * timestep_fraction)
    )
    chosen = train_step_indices(stochastic, "random_fraction", fraction=0.5, seed=0, step=0)
    assert chosen.shape == (3, 4) and (chosen < 9).all()
    assert all(row.unique().numel() == 4 for row in chosen)  # distinct steps, sorted
    assert (chosen.diff(dim=1) > 0).all()
    assert len({tuple(row) for row in chosen.tolist()}) > 1  # each sample draws its own steps
    window = torch.zeros(2, 10, dtype=torch.bool)
    window[:, 4:7] = True
    assert (
        train_step_indices(window, "random_window", fraction=1.0, seed=0, step=0).tolist() == [[4, 5, 6]] * 2
    )
    with pytest.raises(ValueError, match="no stochastic step"):
        train_step_indices(torch.zeros(2, 4, dtype=torch.bool), "all", fraction=1.0, seed=0, step=0)


def test_checkpoints_commit_atomically_and_keep_the_last_k(tmp_path):
    manager = CheckpointManager(tmp_path, keep_last=2)
    for step in (10, 20, 30):
        (manager.staging_dir(step) / "state.bin").write_bytes(b"x" * step)
        manager.commit(step, "run-a")
    assert [path.name for path in manager.all()] == ["checkpoint-000020", "checkpoint-000030"]
    # a crash while writing checkpoint 40 leaves only its staging folder: it is not a checkpoint
    (manager.staging_dir(40) / "half").write_bytes(b"partial")
    assert manager.latest().name == "checkpoint-000030"
    assert CheckpointManager.step_of(manager.latest()) == 30
    manager.staging_dir(50)
    manager.commit(50, "run-a")  # the next successful save clears the leftovers
    assert sorted(path.name for path in manager.root.iterdir()) == ["checkpoint-000030", "checkpoint-000050"]


def test_ema_follows_the_closed_form_and_swaps_back():
    parameter = torch.nn.Parameter(torch.zeros(3))
    ema = ParameterEMA([parameter], decay=0.9)
    for value in (1.0, 2.0, 3.0):
        parameter.data.fill_(value)
        ema.update()
    expected = (
        (0.9 * 0 + 0.1 * 1) * 0.9 + 0.1 * 2
    ) * 0.9 + 0.1 * 3  # shadow_t = d shadow_{t-1} + (1 - d) p_t
    assert torch.allclose(ema.shadow[0], torch.full((3,), expected))
    with ema.swapped_in():
        assert torch.allclose(parameter, torch.full((3,), expected))
    assert torch.equal(parameter.data, torch.full((3,), 3.0))
    restored = ParameterEMA([parameter], decay=0.5)
    restored.load_state_dict(ema.state_dict())
    assert restored.decay == 0.9 and torch.equal(restored.shadow[0], ema.shadow[0])


def test_metrics_log_truncates_for_resume_and_draws_the_curve(tmp_path):
    log = MetricsLog(tmp_path / "metrics.jsonl")
    for step in range(5):
        log.append({"step": step, "reward/mean": step / 10, "reward/std": 0.01, "kl": float("nan")})
    log.append({"step": 5, "eval/reward/mean": 0.7})
    assert json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[0])["kl"] is None  # NaN -> null
    log.truncate_after(2)
    assert [record["step"] for record in log.read()] == [0, 1, 2]
    path = plot_reward_curve(log.read() + [{"step": 3, "eval/reward/mean": 0.5}], tmp_path / "curve.png")
    from PIL import Image

    image = Image.open(path)
    assert image.size == (720, 420) and not math.isnan(image.getextrema()[0][0])


def test_load_parts_restores_each_part_and_refuses_a_missing_or_non_finite_one(tmp_path):
    """The one save/load mechanism: every stateful part gets its saved state back; a part the checkpoint lacks, or a
    learning reward's state holding NaN, stops the resume with one line."""
    import torch

    from gen_rl.run_folder import ConfigChangeError
    from gen_rl.run_state import load_parts
    from rewards.base import RewardStateError

    class Part:
        def __init__(self) -> None:
            self.state: dict = {}

        def state_dict(self) -> dict:
            return self.state

        def load_state_dict(self, state: dict) -> None:
            self.state = dict(state)

    parts = {"algorithm": Part(), "reward/ref": Part()}
    saved = {"algorithm": {"updates": 3}, "reward/ref": {"reference": torch.ones(2)}}
    load_parts(parts, saved, tmp_path)
    assert parts["algorithm"].state == {"updates": 3} and torch.equal(
        parts["reward/ref"].state["reference"], torch.ones(2)
    )
    with pytest.raises(ConfigChangeError, match=r"holds no state for \['reward/ref'\]"):
        load_parts(parts, {"algorithm": {}}, tmp_path)
    with pytest.raises(RewardStateError, match="reference"):
        load_parts(
            parts, {"algorithm": {}, "reward/ref": {"reference": torch.tensor([1.0, float("nan")])}}, tmp_path
        )
