"""The family tables in ``pipelines.families``: torch-free to import, and true of the samplers and tiny models."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from gen_rl.export import lora_target_modules
from pipelines import FAMILIES, SAMPLERS, TINY_MODELS, Sampler, build_sampler
from pipelines.families import build_tiny_pipeline

ROOT = Path(__file__).resolve().parents[1]


def test_the_tables_import_without_torch():
    """gen_rl/inputs.py reads them before torch is imported (the fast start-up error path)."""
    code = (
        "import sys; import pipelines, pipelines.families, gen_rl.inputs; "
        "pipelines.FAMILIES, pipelines.TINY_MODELS, gen_rl.inputs.TINY_GENERATORS; "
        "print('TORCH_IMPORTED' if 'torch' in sys.modules else 'TORCH_NOT_IMPORTED')"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert result.stdout.strip() == "TORCH_NOT_IMPORTED", result.stdout + result.stderr


def test_every_family_names_its_sampler():
    assert set(SAMPLERS) == set(FAMILIES)
    for family, sampler_class in SAMPLERS.items():
        assert issubclass(sampler_class, Sampler) and sampler_class.family == family
        assert FAMILIES[family].step_kinds == sampler_class.step_kinds  # the torch-free copy the config reads
        assert lora_target_modules(family) == list(sampler_class.lora_target_modules)
    with pytest.raises(ValueError, match=f"known: {', '.join(FAMILIES)}"):
        lora_target_modules("no_such_family")


@pytest.mark.parametrize("name", sorted(TINY_MODELS))
def test_every_tiny_model_builds_for_its_family_with_its_image_multiple(name):
    tiny = TINY_MODELS[name]
    sampler = build_sampler(tiny.family, build_tiny_pipeline(name, tiny.family))
    pipeline = sampler.pipeline
    patch = FAMILIES[tiny.family].patch_size
    if patch is None:
        patch = sampler.denoiser.config.patch_size
    scale = getattr(pipeline, "vae_scale_factor", None) or pipeline.vae_scale_factor_spatial  # video: spatial
    if isinstance(patch, (tuple, list)):  # video transformers patch (frames, height, width)
        patch = patch[-1]
    assert tiny.image_multiple == scale * patch
    names = {module_name for module_name, _ in sampler.denoiser.named_modules()}
    missing = set()
    for target in sampler.lora_target_modules:  # the default LoRA targets exist and are Linear layers
        matches = [module for module in names if module.endswith("." + target)]
        missing |= set() if matches else {target}
        assert all(isinstance(sampler.denoiser.get_submodule(m), torch.nn.Linear) for m in matches)
    # the one-block tiny SD3's only block is context-pre-only, which has no to_add_out (tests/test_export.py)
    assert missing == ({"attn.to_add_out"} if tiny.family == "sd3" else set())
    other = next(family for family in FAMILIES if family != tiny.family)
    with pytest.raises(ValueError, match=f"is a {tiny.family} model but model.family='{other}'"):
        build_tiny_pipeline(name, other)


def test_unknown_tiny_model():
    with pytest.raises(ValueError, match="unknown tiny model 'tiny:nope'; use one of .*tiny:flux, "):
        build_tiny_pipeline("tiny:nope")
