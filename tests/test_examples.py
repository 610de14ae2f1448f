"""Every script under examples/ runs through its public-API main()."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
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


def test_notebook_example_samples_reports_log_probs_and_loads_the_trained_lora(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(EXAMPLES.parent)
    result = _load("notebook").main(["--out", str(tmp_path), "--train-steps", "2"])
    assert len(result["images"]) == 4 and result["images"][0].size == (16, 16)
    sde = result["sde"]
    assert sde.log_probs.shape == (1, 4) and torch.isfinite(sde.log_probs).all()
    assert result["max_log_prob_error"] <= 1e-4
    before, after = np.asarray(result["before"], dtype=float), np.asarray(result["after"], dtype=float)
    assert np.abs(after - before).max() > 0  # the LoRA changed the sample
    assert "recomputed log-probs match the stored ones" in capsys.readouterr().out


def test_sde_pipeline_equals_the_sampler_and_finds_the_family_of_a_saved_checkpoint(tmp_path):
    from pipelines import FluxSampler, RolloutOptions
    from pipelines.notebook import SDEPipeline, family_of
    from pipelines.tiny import tiny_flux_pipeline

    tiny_flux_pipeline(seed=0).save_pretrained(tmp_path / "flux")
    assert family_of(str(tmp_path / "flux")) == "flux"
    pipe = SDEPipeline.from_pretrained(str(tmp_path / "flux"))
    assert isinstance(pipe.sampler, FluxSampler)
    out = pipe("a red hat", num_inference_steps=3, height=32, width=32, noise_level=0.7, seed=5,
               return_trajectory=True)  # fmt: skip
    options = RolloutOptions(num_steps=3, height=32, width=32, noise_level=0.7, seed=5)
    direct = pipe.sampler.rollout(["a red hat"], options)
    torch.testing.assert_close(out.rollout.latents, direct.latents, rtol=0, atol=0)
    expected = (direct.pixels[0].clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    assert np.array_equal(np.asarray(out.images[0]), expected)
    with pytest.raises(ValueError, match="pass family="):
        family_of(str(tmp_path))
