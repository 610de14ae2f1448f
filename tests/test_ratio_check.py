"""The start-up ratio == 1 check: recomputed as training recomputes, a tolerance from the clip range, a logged floor."""

from __future__ import annotations

import pytest
import torch
from trainer_helpers import small_config

from gen_rl.trainer import GenerationTrainer, RatioCheckError


class _Jitter:
    """A forward hook that adds fresh noise of size ``scale`` to every denoiser output: a model call that is not
    reproducible (dropout left on, a non-deterministic kernel). Records the batch size of every call."""

    def __init__(self, scale: float) -> None:
        self.scale = scale
        self.batch_sizes: list[int] = []
        self.generator = torch.Generator().manual_seed(0)

    def __call__(self, module, args, kwargs, output):
        self.batch_sizes.append(int(kwargs["hidden_states"].shape[0]))
        if self.scale == 0:
            return output
        sample = output[0] if isinstance(output, tuple) else output.sample
        noisy = sample + self.scale * torch.randn(sample.shape, generator=self.generator)
        return (noisy,) if isinstance(output, tuple) else type(output)(sample=noisy)


def _hook(trainer: GenerationTrainer, scale: float) -> _Jitter:
    jitter = _Jitter(scale)
    trainer.sampler.transformer.register_forward_hook(jitter, with_kwargs=True)
    return jitter


def test_the_floor_is_logged_and_lies_far_below_the_tolerance_in_float32(tmp_path):
    trainer = GenerationTrainer(small_config(tmp_path, "algorithm.clip_low=1e-3"))
    record = trainer.run_step(0)
    assert record["ratio_check/tolerance"] == pytest.approx(0.1 * 1e-3)
    assert 0 <= record["ratio_check/floor"] < 1e-5
    assert "ratio_check/floor" not in trainer.run_step(1)  # measured once per run (and once per resume)


def test_a_non_reproducible_model_stops_the_run_before_the_first_update(tmp_path):
    trainer = GenerationTrainer(small_config(tmp_path, "algorithm.clip_low=1e-3"))
    _hook(trainer, 1e-2)
    before = [p.detach().clone() for p in trainer.parameters]
    with pytest.raises(
        RatioCheckError, match=r"denoising step \d.*float32.*microbatch 2.*algorithm.clip_low"
    ):
        trainer.run_step(0)
    assert all(torch.equal(p, b) for p, b in zip(trainer.parameters, before, strict=True))  # nothing trained


def test_the_tolerance_follows_the_clip_range(tmp_path):
    """The same mismatch passes a loose trust region and stops a tight one: the tolerance is derived, not fixed."""
    loose = GenerationTrainer(
        small_config(tmp_path / "loose", "algorithm.clip_low=1.0", "train.ratio_check_fraction=1")
    )
    _hook(loose, 1e-2)
    floor = loose.sample(0).ratio_check["ratio_check/floor"]
    assert 1e-5 < floor < 1.0

    tight = GenerationTrainer(small_config(tmp_path / "tight", f"algorithm.clip_low={floor / 0.2}"))
    _hook(tight, 1e-2)
    with pytest.raises(RatioCheckError):
        tight.sample(0)  # tolerance = 0.1 x clip = floor / 2


def test_the_check_recomputes_at_the_training_microbatch_size(tmp_path):
    trainer = GenerationTrainer(
        small_config(tmp_path, "train.microbatch_size=2", "train.samples_per_update=8")
    )
    jitter = _hook(trainer, 0.0)
    trainer.sample(0)
    rollout_calls = trainer.config.sample.num_steps * 2  # two groups per process, one rollout call each
    check_calls = jitter.batch_sizes[rollout_calls:]
    assert jitter.batch_sizes[:rollout_calls] == [4] * rollout_calls
    assert check_calls and set(check_calls) == {2}  # 8 samples x 4 steps in microbatches of 2


def test_the_check_runs_on_resume_too(tmp_path):
    config = small_config(tmp_path, "checkpoint.every_steps=1", "train.num_steps=1")
    GenerationTrainer(config).train()
    resumed = GenerationTrainer(
        small_config(tmp_path, "checkpoint.every_steps=1", "train.num_steps=2"), resume=True
    )
    _hook(resumed, 1e-2)
    with pytest.raises(RatioCheckError):
        resumed.run_step(1)
