"""The contract every model family's sampler keeps, written once and called by each family's test module.

- zero noise equals the diffusers pipeline's own output for the same seeds;
- log-probs recomputed from the stored record equal the stored ones (ratio == 1 before any update);
- a sample does not depend on the batch it was drawn in (a 2-prompt rollout equals two 1-prompt rollouts);
- the LoRA exported with ``gen_rl.export.save_lora`` loads with diffusers' ``load_lora_weights`` and reproduces
  the policy's own output;
- a short training run on the family changes the trained weights and writes its metrics.

Each family module supplies the tiny sampler, its options and, for the first check, a function that calls the
diffusers pipeline itself (``pipeline_images(rollout, options) -> pixels``).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig

from gen_rl.export import save_lora
from pipelines import Rollout, RolloutOptions

PipelineImages = Callable[[Rollout, RolloutOptions], torch.Tensor]


def _zero_noise(options: RolloutOptions) -> RolloutOptions:
    return dataclasses.replace(options, noise_level=0.0)


def assert_zero_noise_matches_pipeline(
    sampler: Any,
    prompts: Sequence[str],
    options: RolloutOptions,
    pipeline_images: PipelineImages,
    *,
    metadata: Sequence[dict[str, Any]] | None = None,
    atol: float = 1e-4,
) -> Rollout:
    """The ODE rollout (noise level 0) decodes to the diffusers pipeline's output for the same initial seeds."""
    zero = _zero_noise(options)
    rollout = sampler.rollout(list(prompts), zero, metadata=metadata)
    expected = pipeline_images(rollout, zero).float().cpu()
    assert rollout.pixels is not None
    assert rollout.pixels.shape == expected.shape, (tuple(rollout.pixels.shape), tuple(expected.shape))
    torch.testing.assert_close(rollout.pixels.float().cpu(), expected, rtol=0, atol=atol)
    assert expected.std() > 0  # a constant image would match anything
    return rollout


def assert_recomputed_log_probs_equal_stored(
    sampler: Any,
    prompts: Sequence[str],
    options: RolloutOptions,
    *,
    metadata: Sequence[dict[str, Any]] | None = None,
    group_size: int = 2,
    atol: float = 1e-5,
) -> Rollout:
    """Every stochastic step's log-prob recomputed from the stored record equals the stored one, and a perturbed
    record does not (so the check can fail)."""
    rollout = sampler.rollout(list(prompts), options, group_size=group_size, metadata=metadata)
    assert rollout.stochastic.any() and torch.isfinite(rollout.log_probs[rollout.stochastic]).all()
    assert sampler.check_log_probs(rollout, atol=atol) <= atol
    step = int(rollout.stochastic[0].nonzero()[0])
    shifted = dataclasses.replace(rollout, latents=rollout.latents.clone())
    shifted.latents[:, step + 1] += 0.5
    recomputed, _ = sampler.recompute_log_probs(shifted)
    assert (recomputed[:, step] - rollout.log_probs[:, step]).abs().min() > atol
    return rollout


def assert_batch_independent(
    sampler: Any,
    prompts: Sequence[str],
    options: RolloutOptions,
    *,
    metadata: Sequence[dict[str, Any]] | None = None,
    atol: float = 1e-5,
) -> None:
    """A rollout of two prompts equals the two one-prompt rollouts (noise from per-sample seeds)."""
    assert len(prompts) == 2, "give two prompts"
    both = sampler.rollout(list(prompts), options, metadata=metadata)
    for index, prompt in enumerate(prompts):
        alone = sampler.rollout([prompt], options, metadata=[metadata[index]] if metadata else None)
        assert both.seeds[index] == alone.seeds[0]
        torch.testing.assert_close(both.latents[index].float(), alone.latents[0].float(), rtol=0, atol=atol)
        torch.testing.assert_close(
            both.log_probs[index], alone.log_probs[0], rtol=0, atol=atol, equal_nan=True
        )
    assert not torch.allclose(both.latents[0, -1].float(), both.latents[1, -1].float())


def attach_random_lora(sampler: Any, target_modules: Sequence[str] | None = None, seed: int = 1) -> None:
    """A rank-4 adapter (alpha 8: scale 2, so an export that dropped the scale fails) with random non-zero B."""
    config = LoraConfig(
        r=4,
        lora_alpha=8,
        init_lora_weights="gaussian",
        target_modules=list(target_modules or sampler.lora_target_modules),
    )
    sampler.denoiser.add_adapter(config)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in sampler.denoiser.named_parameters():
            if "lora_B" in name:
                parameter.copy_(0.3 * torch.randn(parameter.shape, generator=generator))


def assert_lora_export_reproduces_policy(
    sampler: Any,
    reload: Callable[[], Any],
    prompts: Sequence[str],
    options: RolloutOptions,
    tmp_path: Path,
    *,
    metadata: Sequence[dict[str, Any]] | None = None,
    atol: float = 1e-5,
) -> None:
    """Attach a random LoRA, export it, load it into ``reload()`` (a fresh base pipeline) with diffusers'
    ``load_lora_weights``: the reloaded pipeline's sampler reproduces the policy's zero-noise final latents, and
    differs from the base model's."""
    zero = _zero_noise(dataclasses.replace(options, decode=False))
    base = sampler.rollout(list(prompts), zero, metadata=metadata).latents[:, -1]
    attach_random_lora(sampler)
    trained = sampler.rollout(list(prompts), zero, metadata=metadata).latents[:, -1]
    folder = save_lora(sampler, tmp_path / "lora")
    fresh = reload()
    fresh.load_lora_weights(folder)
    loaded = type(sampler)(fresh).rollout(list(prompts), zero, metadata=metadata).latents[:, -1]
    torch.testing.assert_close(loaded.float(), trained.float(), rtol=0, atol=atol)
    assert (trained.float() - base.float()).abs().max() > 100 * atol


def assert_short_run_trains(
    config_path: Path, tmp_path: Path, *overrides: str, num_steps: int = 2
) -> list[dict]:
    """A ``num_steps`` GenerationTrainer run on ``config_path`` (shrunk by ``tests.trainer_helpers.small_config``)
    changes some trained tensor and writes one metrics record per step; returns the training records."""
    from trainer_helpers import lora_weights, small_config

    from gen_rl.trainer import GenerationTrainer

    config = small_config(tmp_path, f"train.num_steps={num_steps}", *overrides, base_config=config_path)
    trainer = GenerationTrainer(config)
    before = lora_weights(trainer)
    assert before, "nothing is trained"
    trainer.train()
    after = lora_weights(trainer)
    changed = [name for name in before if not torch.equal(before[name], after[name])]
    assert changed, "no trained tensor changed"
    metrics = Path(config.log.output_dir) / "metrics.jsonl"
    records = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    train_records = [record for record in records if "reward/mean" in record]
    assert [record["step"] for record in train_records][-num_steps:] == list(range(num_steps))
    assert all(torch.isfinite(torch.tensor(record["loss/total"])) for record in train_records)
    return train_records
