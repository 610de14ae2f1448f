"""SRUM's global + local self-reward (Jin et al. 2025, "SRUM: Fine-Grained Self-Rewarding for Unified Multimodal
Models"); registered ``srum``.

A judge VLM (a separate one here; the policy's own understanding for a unified model, see
``gen_rl.vlm.unified``) answers yes / no questions: one *global* question about the whole image against the
prompt, and one *local* question per object or region listed in the sample's metadata
(``metadata[objects_key]``: a list of ``{"name": ..., "box": [x0, y0, x1, y1], "question": ...}``, box in
fractions of the width / height, question optional), asked about the cropped region (``local_view="crop"``)
or the whole image with the region outlined (``"box"``). With ``P`` the judge's ``P(yes)`` and the paper's
scores ``s = 2P - 1`` in [-1, 1], the combination follows SRUM's code
(``data/regional_reward_dataset.py: _parse_vlm_output_to_reward_map``): a reward map over the pixels

    M(x) = (s_g + 1) / 2 * max(1/2, max_{k: x in box_k} (s_k + 1) / 2)  =  P_g * max(1/2, max_k P_k),

(neutral 1/2 outside every box; overlapping boxes keep the larger weight; the global score scales the whole
map), and the sample's scalar reward is its mean ``mean_x M(x)`` (SRUM weights its training loss per pixel by
``M``; a GRPO policy takes one number per sample). A sample without objects gets ``P_g / 2``, as in the code.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

from rewards.base import Reward, RewardOutput, register_reward
from rewards.vlm_judge import VLMJudge, format_question

DEFAULT_GLOBAL_QUESTION = "Does this image show {prompt}? Answer yes or no."
DEFAULT_LOCAL_QUESTION = "Does this image show {name}? Answer yes or no."
LOCAL_VIEWS = ("crop", "box")
NEUTRAL = 0.5


def pixel_box(box: Sequence[float], height: int, width: int) -> tuple[int, int, int, int]:
    """``(x0, y0, x1, y1)`` in fractions -> pixel bounds clamped to the image (rounded), ``x1 > x0, y1 > y0``."""
    x0, y0, x1, y1 = (float(value) for value in box)
    left, right = max(0, round(x0 * width)), min(width, round(x1 * width))
    top, bottom = max(0, round(y0 * height)), min(height, round(y1 * height))
    if right <= left or bottom <= top:
        raise ValueError(
            f"srum: object box {list(box)} covers no pixel of a {height}x{width} image; give [x0, y0, x1, y1] as "
            "fractions of the width and height with x0 < x1 and y0 < y1"
        )
    return left, top, right, bottom


def reward_map(
    global_probability: float,
    local: Sequence[tuple[float, tuple[int, int, int, int]]],
    height: int,
    width: int,
) -> Tensor:
    """SRUM's map ``M = P_g * max(1/2, max_k P_k on box_k)`` ``[H, W]`` (``local``: ``(P_k, pixel box)``)."""
    weights = torch.full((height, width), NEUTRAL, dtype=torch.float64)
    for probability, (left, top, right, bottom) in local:
        region = weights[top:bottom, left:right]
        torch.maximum(region, torch.full_like(region, float(probability)), out=region)
    return weights * float(global_probability)


def outlined(image: Tensor, box: tuple[int, int, int, int], width: int = 2) -> Tensor:
    """A copy of ``image`` ``[3, H, W]`` with a red rectangle of ``width`` pixels along ``box``."""
    left, top, right, bottom = box
    marked = image.clone()
    red = torch.tensor([1.0, 0.0, 0.0], dtype=image.dtype, device=image.device)[:, None, None]
    for rows, cols in (
        (slice(top, min(bottom, top + width)), slice(left, right)),
        (slice(max(top, bottom - width), bottom), slice(left, right)),
        (slice(top, bottom), slice(left, min(right, left + width))),
        (slice(top, bottom), slice(max(left, right - width), right)),
    ):
        marked[:, rows, cols] = red.expand(-1, marked[:, rows, cols].shape[1], marked[:, rows, cols].shape[2])
    return marked


def region_view(image: Tensor, box: tuple[int, int, int, int], view: str) -> Tensor:
    """The region as the judge sees it: cropped and resized back to the image size, or outlined in place."""
    if view == "box":
        return outlined(image, box)
    left, top, right, bottom = box
    crop = image[:, top:bottom, left:right][None]
    return F.interpolate(crop, size=image.shape[-2:], mode="bilinear", align_corners=False)[0].clamp(0, 1)


@register_reward("srum")
class SRUMReward(Reward):
    """SRUM: mean over the pixels of ``P_global * max(1/2, P_local of the boxes covering the pixel)``."""

    weight_sources: ClassVar[dict[str, str]] = {"model": "config.json"}

    def __init__(
        self,
        model: str,
        processor: str | None = None,
        global_question: str = DEFAULT_GLOBAL_QUESTION,
        local_question: str = DEFAULT_LOCAL_QUESTION,
        objects_key: str = "objects",
        local_view: str = "crop",
        normalise: str = "yes_no",
        yes_words: Sequence[str] = ("yes", "Yes"),
        no_words: Sequence[str] = ("no", "No"),
        device: str | None = None,
        dtype: str = "float32",
        batch_size: int = 8,
    ) -> None:
        if local_view not in LOCAL_VIEWS:
            raise ValueError(f"srum: local_view must be one of {LOCAL_VIEWS}; got {local_view!r}")
        self.global_question, self.local_question = global_question, local_question
        self.objects_key, self.local_view = objects_key, local_view
        self.judge = VLMJudge(
            model,
            processor,
            questions=global_question,
            normalise=normalise,
            yes_words=yes_words,
            no_words=no_words,
            device=device,
            dtype=dtype,
            batch_size=batch_size,
        )

    def queries(self, pixels: Tensor, prompts: list[str], metadata: list[dict]) -> tuple[list, list, list]:
        """Every question of the batch: views ``[3, H, W]``, texts, and ``(sample, pixel box or None)``."""
        height, width = pixels.shape[-2:]
        views, texts, owners = [], [], []
        for index, (prompt, record) in enumerate(zip(prompts, metadata, strict=True)):
            views.append(pixels[index])
            texts.append(format_question(self.global_question, prompt, record))
            owners.append((index, None))
            for item in record.get(self.objects_key) or []:
                item = _object(item)
                box = pixel_box(item.get("box", (0, 0, 1, 1)), height, width)
                template = item.get("question") or self.local_question
                views.append(region_view(pixels[index], box, self.local_view))
                texts.append(format_question(template, prompt, {**record, **item}))
                owners.append((index, box))
        return views, texts, owners

    def score(self, pixels: Tensor, prompts: list[str], metadata: list[dict]) -> RewardOutput:
        """``mean_x M(x)`` per sample; components: ``P_global`` and the mean ``P_local`` (NaN without objects)."""
        views, texts, owners = self.queries(pixels, prompts, metadata)
        probabilities = self.judge.ask(views, texts).double().tolist()
        height, width = pixels.shape[-2:]
        batch = pixels.shape[0]
        global_p = [0.0] * batch
        local: list[list[tuple[float, tuple[int, int, int, int]]]] = [[] for _ in range(batch)]
        for probability, (index, box) in zip(probabilities, owners, strict=True):
            if box is None:
                global_p[index] = probability
            else:
                local[index].append((probability, box))
        scores = torch.stack([reward_map(global_p[i], local[i], height, width).mean() for i in range(batch)])
        local_mean = [sum(p for p, _ in items) / len(items) if items else float("nan") for items in local]
        return RewardOutput(
            scores=scores.float(),
            components={"srum_global": torch.tensor(global_p), "srum_local": torch.tensor(local_mean)},
        )


def _object(item: Any) -> dict:
    if isinstance(item, str):
        return {"name": item}
    if not isinstance(item, dict):
        raise ValueError(f"srum: each object must be a name or a dict with 'name' (and 'box'); got {item!r}")
    return item
