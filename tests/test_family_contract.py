"""The family contract (``tests/family_contract.py``) run on the tiny FLUX, so the shared checks are themselves
checked: each passes on a correct sampler and the tampering tests inside them can fail."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from family_contract import (
    assert_batch_independent,
    assert_lora_export_reproduces_policy,
    assert_recomputed_log_probs_equal_stored,
    assert_short_run_trains,
    assert_zero_noise_matches_pipeline,
)
from trainer_helpers import DEMO

from gen_rl.core.seeding import make_generators
from pipelines import FluxSampler, RolloutOptions
from pipelines.tiny import tiny_flux_pipeline

PROMPTS = ["a red apple", "a blue sky"]
OPTIONS = RolloutOptions(num_steps=3, height=32, width=32, max_sequence_length=16, noise_level=0.7)


def _flux():
    pipeline = tiny_flux_pipeline(seed=0)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def _pipeline_images(sampler):
    def images(rollout, options):
        return sampler.pipeline(
            rollout.prompts,
            num_inference_steps=options.num_steps,
            height=options.height,
            width=options.width,
            generator=make_generators(rollout.seeds.tolist()),
            output_type="pt",
            max_sequence_length=options.max_sequence_length,
            guidance_scale=3.5,
        ).images

    return images


def test_the_contract_holds_for_flux(tmp_path):
    sampler = FluxSampler(_flux())
    assert_zero_noise_matches_pipeline(sampler, PROMPTS, OPTIONS, _pipeline_images(sampler))
    assert_recomputed_log_probs_equal_stored(sampler, PROMPTS, OPTIONS)
    assert_batch_independent(sampler, PROMPTS, OPTIONS)
    assert_lora_export_reproduces_policy(sampler, _flux, PROMPTS, OPTIONS, tmp_path)


def test_the_zero_noise_check_fails_on_another_pipeline_output():
    sampler = FluxSampler(_flux())
    images = _pipeline_images(sampler)

    def shifted(rollout, options):  # one more denoising step than the rollout took
        return images(rollout, dataclasses.replace(options, num_steps=options.num_steps + 1))

    with pytest.raises(AssertionError):
        assert_zero_noise_matches_pipeline(sampler, PROMPTS, OPTIONS, shifted)


def test_the_export_check_fails_when_the_reloaded_model_differs(tmp_path):
    sampler = FluxSampler(_flux())
    with pytest.raises(AssertionError):
        assert_lora_export_reproduces_policy(
            sampler, lambda: tiny_flux_pipeline(seed=5), PROMPTS, OPTIONS, tmp_path
        )


def test_a_short_run_trains_and_writes_metrics(tmp_path):
    records = assert_short_run_trains(DEMO, tmp_path)
    assert torch.isfinite(torch.tensor(records[-1]["reward/mean"]))
