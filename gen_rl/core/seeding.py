"""Deterministic seeds for initial noise and SDE noise.

Every random draw of a rollout derives from ``(run seed, epoch, prompt key, member, stream)`` through a
cryptographic hash, so seeds are unique across groups, epochs and processes (each process owns different
prompt keys / members) and do not depend on the order in which samples are generated.
"""

from __future__ import annotations

import hashlib

import torch

_SEED_BITS = 63


def derive_seed(*parts: object) -> int:
    """Hash any printable parts into a non-negative 63-bit integer seed (stable across runs and machines)."""
    text = "\x1f".join(repr(part) for part in parts)
    digest = hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << _SEED_BITS) - 1)


def make_generators(seeds: list[int], device: torch.device | str = "cpu") -> list[torch.Generator]:
    """One ``torch.Generator`` per seed on ``device``.

    CPU generators (the default) give the same numbers on every machine; generators on an accelerator draw
    there without a host copy, and their numbers are reproducible on the same kind of device.
    """
    return [torch.Generator(device).manual_seed(seed) for seed in seeds]


def draw_noise(
    generators: list[torch.Generator], shape: tuple[int, ...], device: torch.device | str | None = None
) -> torch.Tensor:
    """Standard normal noise ``[len(generators), *shape]`` in float32, one independent stream per sample.

    Each sample is drawn on its generator's device (so the numbers do not depend on the batch it sits in);
    the result is moved to ``device`` when given.
    """
    noise = torch.stack(
        [torch.randn(shape, generator=generator, device=generator.device) for generator in generators]
    )
    return noise if device is None else noise.to(device)
