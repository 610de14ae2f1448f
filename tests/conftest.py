"""Shared fixtures: tiny FLUX / SD3 pipelines saved to disk and loaded back through the real loading code."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# The tensors here are tiny: intra-op threads only add overhead (up to 10x when other work shares the cores).
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def saved_pipelines(tmp_path_factory):
    """Folders holding tiny FLUX-dev, FLUX-schnell and SD3 pipelines in diffusers format."""
    from pipelines.tiny import tiny_flux_pipeline, tiny_sd3_pipeline

    root = tmp_path_factory.mktemp("tiny_pipelines")
    builders = {
        "flux": lambda: tiny_flux_pipeline(seed=0),
        "flux_schnell": lambda: tiny_flux_pipeline(seed=1, guidance_embeds=False),
        "sd3": lambda: tiny_sd3_pipeline(seed=0),
    }
    paths = {}
    for name, build in builders.items():
        paths[name] = root / name
        build().save_pretrained(paths[name])
    return paths


@pytest.fixture(scope="session")
def samplers(saved_pipelines):
    """Samplers loaded from the saved folders by family name, as a config would load real weights."""
    from pipelines import build_sampler

    return {
        name: build_sampler("sd3" if name == "sd3" else "flux", str(path))
        for name, path in saved_pipelines.items()
    }


@pytest.fixture
def fresh_accelerator():
    """Reset accelerate's process-wide state before and after a test that builds a trainer with another mixed
    precision (``Accelerator`` refuses to change it within one process otherwise)."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)
