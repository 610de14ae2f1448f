"""A prompt-conditioned colour reward: does the image show the colour its prompt names? Weight-free.

The target colour is the first palette word in the prompt (whole word, case-insensitive: "bored" does not
name red), or ``metadata["colour"]`` / ``metadata["color"]`` when given (a palette name or an RGB triple in
[0, 1]). The score is

    score = 1 - mean over pixels of ||pixel_rgb - target_rgb||_2 / sqrt(3)

in [0, 1]: 1 when every pixel is exactly the target, 0 only when every pixel sits at the opposite corner of
the RGB cube. A prompt naming no palette colour (and no override) gets NaN: no score, dropped by the trainer.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from rewards.base import Reward, RewardOutput, register_reward

RGB = tuple[float, float, float]
MAX_RGB_DISTANCE = math.sqrt(3.0)  # the diagonal of the unit RGB cube
METADATA_KEYS = ("colour", "color")

DEFAULT_PALETTE: dict[str, RGB] = {
    "red": (1.0, 0.0, 0.0),
    "green": (0.0, 1.0, 0.0),
    "blue": (0.0, 0.0, 1.0),
    "yellow": (1.0, 1.0, 0.0),
    "cyan": (0.0, 1.0, 1.0),
    "magenta": (1.0, 0.0, 1.0),
    "orange": (1.0, 0.5, 0.0),
    "purple": (0.5, 0.0, 0.5),
    "pink": (1.0, 0.75, 0.8),
    "brown": (0.6, 0.3, 0.0),
    "white": (1.0, 1.0, 1.0),
    "black": (0.0, 0.0, 0.0),
    "grey": (0.5, 0.5, 0.5),
    "gray": (0.5, 0.5, 0.5),
}


def check_palette(colours: Mapping[str, Sequence[float]]) -> dict[str, RGB]:
    """Lower-cased names to RGB triples, each checked to be 3 numbers in [0, 1]."""
    if not colours:
        raise ValueError(
            "the colour palette is empty; give at least one name: [r, g, b] with values in [0, 1]"
        )
    return {
        " ".join(name.lower().split()): parse_rgb(rgb, f"colour {name!r}") for name, rgb in colours.items()
    }


def parse_rgb(rgb: Any, what: str) -> RGB:
    """``rgb`` as a float triple, or ``ValueError`` unless it is 3 numbers in [0, 1]."""
    try:
        values = tuple(float(value) for value in rgb)
    except (TypeError, ValueError):
        values = ()
    if len(values) != 3 or not all(0.0 <= value <= 1.0 for value in values):
        raise ValueError(f"{what} must be 3 numbers [r, g, b] in [0, 1]; got {rgb!r}")
    return values


def compile_colour_pattern(names: Sequence[str]) -> re.Pattern[str]:
    """Case-insensitive whole-word pattern for any of ``names`` (longest first; spaces match any spacing)."""
    alternatives = [
        r"\s+".join(map(re.escape, name.split())) for name in sorted(names, key=len, reverse=True)
    ]
    return re.compile(r"\b(" + "|".join(alternatives) + r")\b", re.IGNORECASE)


def colour_distances(pixels: Tensor, targets: Tensor) -> Tensor:
    """``[B]`` mean over pixels of the Euclidean RGB distance of ``pixels`` ``[B, 3, H, W]`` to ``targets`` [B, 3].

    A NaN target row gives a NaN distance. Differentiable in ``pixels`` (float32, or float64 kept as is); at a
    pixel exactly on its target the gradient is 0 (the norm's subgradient), never NaN.
    """
    dtype = torch.promote_types(pixels.dtype, torch.float32)
    targets = targets.to(device=pixels.device, dtype=dtype)[:, :, None, None]
    return torch.linalg.vector_norm(pixels.to(dtype) - targets, dim=1).mean(dim=(1, 2))


@register_reward("colour", "color")
class ColourReward(Reward):
    """Score = 1 - mean RGB distance to the prompt's colour / sqrt(3); NaN when the prompt names no colour.

    ``colours`` replaces the default palette (``DEFAULT_PALETTE``: red, green, blue, yellow, cyan, magenta,
    orange, purple, pink, brown, white, black, grey/gray); to extend it, pass the defaults plus yours.
    Differentiable: the scores keep the autograd graph to the pixels (d score / d pixel =
    -(pixel - target) / (||pixel - target|| H W sqrt 3)).
    """

    differentiable = True

    def __init__(self, colours: dict[str, list[float]] | None = None) -> None:
        self.palette = check_palette(DEFAULT_PALETTE if colours is None else colours)
        self._pattern = compile_colour_pattern(list(self.palette))

    def colour_in(self, prompt: str) -> str | None:
        """The first palette colour named in ``prompt`` as a whole word, or None."""
        match = self._pattern.search(prompt)
        return None if match is None else " ".join(match.group(1).lower().split())

    def target_rgb(self, prompt: str, record: Mapping[str, Any]) -> RGB | None:
        """The target colour: ``record["colour"]`` / ``record["color"]`` if set, else the prompt's, else None."""
        override = next((record[key] for key in METADATA_KEYS if record.get(key) is not None), None)
        if override is None:
            name = self.colour_in(prompt)
            return None if name is None else self.palette[name]
        if isinstance(override, str):
            name = " ".join(override.lower().split())
            if name not in self.palette:
                raise ValueError(
                    f"metadata colour {override!r} is not in the palette ({', '.join(self.palette)}); "
                    "give a palette name or [r, g, b] in [0, 1]"
                )
            return self.palette[name]
        return parse_rgb(override, "metadata colour")

    def score(self, pixels: Tensor, prompts: list[str], metadata: list[dict]) -> RewardOutput:
        """Colour agreement per image, the whole batch at once; components: ``colour_distance`` in [0, sqrt 3]."""
        if pixels.shape[1] != 3:
            raise ValueError(f"ColourReward needs RGB pixels [B, 3, H, W]; got {pixels.shape[1]} channels")
        nan = (math.nan,) * 3
        targets = [self.target_rgb(prompt, record) for prompt, record in zip(prompts, metadata, strict=True)]
        target_rgb = torch.tensor([nan if rgb is None else rgb for rgb in targets], dtype=torch.float32)
        distances = colour_distances(pixels, target_rgb)
        return RewardOutput(
            scores=1.0 - distances / MAX_RGB_DISTANCE, components={"colour_distance": distances}
        )
