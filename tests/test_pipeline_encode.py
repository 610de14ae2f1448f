"""``Sampler.encode`` (pixels -> latents) for every family: the VAE, scaling / shift and FLUX packing, checked
against a hand-written formula on an identity VAE and by the round trip through ``decode``."""

from __future__ import annotations

import pytest
import torch

from pipelines import build_sampler
from pipelines.tiny import _pixel_vae, tiny_flux_pipeline, tiny_sd3_pipeline, tiny_sd_pipeline

SCALE, SHIFT = 1.5035, 0.0609  # SD3 / FLUX-style VAE factors; SD has no shift


def _pixel_pipeline(family: str):
    """A tiny pipeline whose VAE is the identity (latent == image in [-1, 1]) with non-trivial scaling/shift."""
    if family == "sd":
        pipeline, shift = tiny_sd_pipeline(seed=0, pixel_decoder=True), None
    elif family == "flux":
        pipeline, shift = tiny_flux_pipeline(seed=0, pixel_decoder=True), SHIFT
    else:
        pipeline, shift = tiny_sd3_pipeline(seed=0), SHIFT
        pipeline.vae = _pixel_vae()
    pipeline.vae.register_to_config(scaling_factor=SCALE, shift_factor=shift)
    return pipeline


def _pack(latents: torch.Tensor) -> torch.Tensor:
    """FLUX's 2x2 packing written out: [B, C, H, W] -> [B, (H/2)(W/2), 4C], channel-major within a patch."""
    batch, channels, height, width = latents.shape
    patches = latents.reshape(batch, channels, height // 2, 2, width // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return patches.reshape(batch, (height // 2) * (width // 2), channels * 4)


@pytest.mark.parametrize("family", ["sd", "sd3", "flux"])
def test_encode_is_the_scaled_vae_latent_and_decode_inverts_it(family):
    sampler = build_sampler(family, _pixel_pipeline(family))
    pixels = 0.05 + 0.9 * torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    latents = sampler.encode(pixels)
    expected = (2 * pixels - 1 - (SHIFT if family != "sd" else 0.0)) * SCALE
    if family == "flux":
        expected = _pack(expected)
    torch.testing.assert_close(latents, expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(sampler.decode(latents, (16, 16)), pixels, atol=1e-5, rtol=0)


def test_encode_with_a_generator_samples_the_latent_distribution():
    """The tiny SD VAE is random (log-variance not clamped), so a sample differs from the mean, reproducibly."""
    sampler = build_sampler("sd", tiny_sd_pipeline(seed=0))
    pixels = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    mean = sampler.encode(pixels)
    assert mean.shape == (1, 4, 8, 8)
    first = sampler.encode(pixels, torch.Generator().manual_seed(2))
    again = sampler.encode(pixels, torch.Generator().manual_seed(2))
    assert torch.equal(first, again) and not torch.allclose(first, mean)
    with pytest.raises(ValueError, match=r"encode expects pixels \[B, 3, H, W\]"):
        sampler.encode(pixels[:, :1])
