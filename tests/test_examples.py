"""Every script under examples/ runs through its public-API main()."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import torch
from PIL import Image

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_sample_example_writes_grid_and_prints_log_probs(tmp_path, capsys):
    result = _load("sample").main(
        ["--out", str(tmp_path), "--steps", "4", "--height", "32", "--width", "32", "--group-size", "3"]
    )
    grid = np.asarray(Image.open(tmp_path / "samples.png"))
    assert grid.shape == (2 * 34 + 2, 3 * 34 + 2, 3)
    rollout = result["rollout"]
    assert rollout.log_probs.shape == (6, 4) and torch.isfinite(rollout.log_probs).all()
    assert result["max_log_prob_error"] <= 1e-4
    printed = capsys.readouterr().out
    assert "'a red circle':" in printed and f"{rollout.log_probs[0, 0].item():+.3f}" in printed


def test_custom_algorithm_example_trains_with_its_own_algorithm(tmp_path, capsys, monkeypatch):
    """The example's REINFORCE runs through the trainer by its dotted path (its learning is asserted, on the same
    module, in test_user_algorithm.py)."""
    monkeypatch.syspath_prepend(str(EXAMPLES))
    import custom_algorithm

    result = custom_algorithm.main(["--steps", "1", "--out", str(tmp_path / "run")])
    assert isinstance(result["algorithm"], custom_algorithm.Reinforce)
    assert (
        f"held-out reward {result['before']:.4f} -> {result['after']:.4f} in 1 steps"
        in capsys.readouterr().out
    )
