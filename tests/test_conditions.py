"""Conditioning images (image-to-video, editing): the sampler hook, the image loader and the JSONL media paths.

A toy image family conditions each sample on a source image through ``Sampler.encode_conditions``; the tests check
that the source reaches the denoiser at sampling and, from the stored record alone, at training (ratio == 1), that
changing the source changes the samples, and the clear errors for a missing source.
"""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
from diffusers import DiffusionPipeline, FlowMatchEulerDiscreteScheduler
from PIL import Image

from gen_rl.core.images import load_condition_image
from gen_rl.data import DataError, load_prompts
from pipelines import FlowMatchSampler, RolloutOptions

CHANNELS, SIDE = 3, 8


class ToyEditSampler(FlowMatchSampler):
    """Latents [B, 3, 8, 8]; the 'velocity' is a seeded conv of (latents, source) plus a per-prompt offset."""

    family = "toy_edit"
    pipeline_class = DiffusionPipeline
    required_components = ("transformer",)
    conditions = ("image",)
    dtype = torch.float32  # a plain Conv2d has no .dtype

    def encode_prompts(self, prompts, options, num_per_prompt):
        codes = torch.tensor([float(len(prompt)) for prompt in prompts]).repeat_interleave(num_per_prompt)
        return {"prompt_embeds": codes[:, None] / 10}

    def encode_conditions(self, metadata, options, num_per_prompt, image_size, num_frames):
        height, width = image_size
        sources = torch.stack([load_condition_image(item["image"], height, width) for item in metadata])
        return {"source_latents": sources.repeat_interleave(num_per_prompt, dim=0) * 2 - 1}

    def initial_latents(self, generators, image_size, num_frames=None):
        shape = (CHANNELS, *image_size)
        return torch.stack([torch.randn(shape, generator=generator) for generator in generators])

    def grid(self, options, latents):
        scheduler = FlowMatchEulerDiscreteScheduler.from_config(self.scheduler.config)
        scheduler.set_timesteps(options.num_steps)
        return scheduler.sigmas.float(), scheduler.timesteps.float()

    def model_output(self, latents, timesteps, conditioning, image_size):
        both = torch.cat([latents, conditioning["source_latents"]], dim=1)
        offset = conditioning["prompt_embeds"] + timesteps[:, None] / 1000
        return self.active_denoiser(both) + offset[:, :, None, None]

    def decode(self, latents, image_size):
        return torch.sigmoid(latents.float())


@pytest.fixture(scope="module")
def sampler():
    torch.manual_seed(0)
    pipeline = SimpleNamespace(
        transformer=torch.nn.Conv2d(2 * CHANNELS, CHANNELS, kernel_size=3, padding=1),
        scheduler=FlowMatchEulerDiscreteScheduler(),
        _execution_device=torch.device("cpu"),
    )
    return ToyEditSampler(pipeline)


OPTIONS = RolloutOptions(num_steps=3, height=SIDE, width=SIDE, noise_level=0.7)


def _source(colour: tuple[int, int, int], path) -> str:
    Image.new("RGB", (SIDE * 2, SIDE * 2), colour).save(path)
    return str(path)


def test_the_source_is_stored_and_training_recomputes_with_it(sampler, tmp_path):
    red, blue = _source((255, 0, 0), tmp_path / "red.png"), _source((0, 0, 255), tmp_path / "blue.png")
    rollout = sampler.rollout(
        ["a cat", "a dog"], OPTIONS, group_size=2, metadata=[{"image": red}, {"image": blue}]
    )
    stored = rollout.conditioning["source_latents"]
    assert stored.shape == (4, CHANNELS, SIDE, SIDE)  # resized 16 -> 8, one row per sample
    assert torch.allclose(stored[0, :, 0, 0], torch.tensor([1.0, -1.0, -1.0]))  # red in [-1, 1]
    assert torch.equal(stored[2], stored[3]) and not torch.equal(stored[1], stored[2])
    assert sampler.check_log_probs(rollout, atol=1e-5) < 1e-5  # ratio == 1 from the stored record
    rows = rollout.select([1, 2])
    assert torch.equal(rows.conditioning["source_latents"], stored[[1, 2]])
    tampered = rollout.select([0, 1, 2, 3])
    tampered.conditioning = {**tampered.conditioning, "source_latents": stored.flip(0)}
    with pytest.raises(RuntimeError, match="log-prob mismatch"):
        sampler.check_log_probs(tampered, atol=1e-5)


def test_the_source_changes_the_sample(sampler, tmp_path):
    red, blue = _source((255, 0, 0), tmp_path / "red.png"), _source((0, 0, 255), tmp_path / "blue.png")
    first = sampler.rollout(["a cat"], OPTIONS, metadata=[{"image": red}])
    second = sampler.rollout(["a cat"], OPTIONS, metadata=[{"image": blue}])
    assert torch.equal(first.latents[:, 0], second.latents[:, 0])  # same seed, same start
    assert not torch.allclose(first.latents[:, -1], second.latents[:, -1])


def test_a_missing_source_is_named(sampler, tmp_path):
    with pytest.raises(
        ValueError, match=r"conditions every sample on metadata 'image', but prompt 1 \('b'\)"
    ):
        sampler.rollout(["a", "b"], OPTIONS, metadata=[{"image": _source((0, 0, 0), tmp_path / "k.png")}, {}])
    with pytest.raises(ValueError, match="conditions every sample on metadata 'image'"):
        sampler.rollout(["a"], OPTIONS)
    with pytest.raises(FileNotFoundError, match="cannot read the condition image"):
        sampler.rollout(["a"], OPTIONS, metadata=[{"image": str(tmp_path / "gone.png")}])


def test_load_condition_image_accepts_paths_pil_and_tensors(tmp_path):
    path = _source((255, 128, 0), tmp_path / "orange.png")
    from_path = load_condition_image(path, 4, 6)
    assert from_path.shape == (3, 4, 6) and from_path.dtype == torch.float32
    assert torch.allclose(from_path[:, 0, 0], torch.tensor([1.0, 128 / 255, 0.0]))
    from_pil = load_condition_image(Image.open(path), 4, 6)
    assert torch.equal(from_path, from_pil)
    tensor = torch.rand(3, 4, 6)
    assert torch.equal(load_condition_image(tensor, 4, 6), tensor)
    assert load_condition_image(tensor, 2, 3).shape == (3, 2, 3)
    with pytest.raises(ValueError, match=r"must be \[3, H, W\]"):
        load_condition_image(torch.rand(4, 4), 4, 4)


def test_jsonl_media_paths_resolve_against_the_prompt_file(tmp_path):
    folder = tmp_path / "data"
    (folder / "sources").mkdir(parents=True)
    _source((1, 2, 3), folder / "sources" / "a.png")
    lines = [
        {"prompt": "make it blue", "image": "sources/a.png"},
        {"prompt": "make it red", "image": "sources/missing.png"},
        {"prompt": "no source"},
    ]
    records = folder / "edits.jsonl"
    records.write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    with pytest.raises(DataError, match=r"edits.jsonl:2: 'image' file .*missing.png does not exist"):
        load_prompts(records)
    prompts = load_prompts(records, bad_records="skip")
    assert prompts.prompts == ["make it blue", "no source"]
    assert prompts.metadata[0]["image"] == str(folder / "sources" / "a.png")
