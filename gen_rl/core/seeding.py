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


def make_generators(seeds: list[int]) -> list[torch.Generator]:
    """One CPU ``torch.Generator`` per seed (CPU draws give the same numbers on every device)."""
    return [torch.Generator("cpu").manual_seed(seed) for seed in seeds]


def draw_noise(
    generators: list[torch.Generator], shape: tuple[int, ...], device: torch.device
) -> torch.Tensor:
    """Standard normal noise ``[len(generators), *shape]`` in float32, one independent stream per sample."""
    noise = torch.stack([torch.randn(shape, generator=generator) for generator in generators])
    return noise.to(device)
