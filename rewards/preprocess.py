"""Backbone preprocessing on tensors: resize, centre crop and normalise pixels [B, 3, H, W] in [0, 1].

Every step runs on the pixels' device and is differentiable (no PIL round trip, no files). The recipes match
the references they replace:

- ``open_clip`` / torchvision (``Resize(s)`` + ``CenterCrop(s)``): shortest edge to ``s`` with the long edge
  ``int(s * long / short)``, antialiased bicubic, crop offset ``round((H - s) / 2)``;
- transformers image processors (CLIP, PickScore, DINOv2's BitImageProcessor): the same resize, crop offset
  ``floor((H - s) / 2)``; their resize works on uint8, so they agree with this float path to one grey level.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# PIL resampling codes used in image processor configs
PIL_INTERPOLATION = {0: "nearest", 2: "bilinear", 3: "bicubic"}


@dataclass(frozen=True)
class ImagePreprocess:
    """Resize -> centre crop -> normalise, on tensors.

    ``resize``: an int resizes the shortest edge to it (aspect kept); ``(H, W)`` resizes to exactly that;
    None keeps the size. ``crop``: ``(H, W)`` centre crop or None. ``crop_rounding``: ``round`` (torchvision,
    open_clip) or ``floor`` (transformers). ``clamp`` clips the resized pixels to [0, 1], as a uint8 pipeline
    does (bicubic overshoots).
    """

    resize: int | tuple[int, int] | None
    crop: tuple[int, int] | None
    mean: tuple[float, ...]
    std: tuple[float, ...]
    interpolation: Literal["bicubic", "bilinear", "nearest"] = "bicubic"
    crop_rounding: Literal["round", "floor"] = "round"
    clamp: bool = False

    def __call__(self, pixels: Tensor) -> Tensor:
        """Normalised float32 pixels ``[B, 3, h, w]`` ready for the backbone, on ``pixels.device``."""
        images = pixels.float()
        if self.resize is not None:
            images = resize(images, self.resize, self.interpolation)
            if self.clamp:
                images = images.clamp(0.0, 1.0)
        if self.crop is not None:
            images = center_crop(images, self.crop, self.crop_rounding)
        return normalize(images, self.mean, self.std)

    @classmethod
    def from_pretrained(cls, source: str, *, what: str, published: str) -> ImagePreprocess:
        """The recipe of the image processor saved with a model (folder or hub id), via ``AutoImageProcessor``."""
        from transformers import AutoImageProcessor

        from rewards.weights import load_pretrained

        processor = load_pretrained(
            AutoImageProcessor.from_pretrained, source, what=f"{what} image processor", published=published
        )
        return cls.from_image_processor(processor)

    @classmethod
    def from_image_processor(cls, processor: Any) -> ImagePreprocess:
        """The recipe of a transformers image processor (reads its size, crop, resample, mean and std)."""
        size = _size_dict(getattr(processor, "size", None))
        resize_to: int | tuple[int, int] | None = None
        if getattr(processor, "do_resize", True) and size:
            if "shortest_edge" in size and size["shortest_edge"]:
                resize_to = int(size["shortest_edge"])
            elif size.get("height") and size.get("width"):
                resize_to = (int(size["height"]), int(size["width"]))
            else:
                raise ValueError(
                    f"unsupported image processor size {size}; expected shortest_edge or height/width"
                )
        crop_size = _size_dict(getattr(processor, "crop_size", None))
        crop = None
        if getattr(processor, "do_center_crop", False) and crop_size:
            crop = (int(crop_size["height"]), int(crop_size["width"]))
        resample = getattr(processor, "resample", 3)
        resample_code = int(getattr(resample, "value", resample))
        if resample_code not in PIL_INTERPOLATION:
            raise ValueError(f"unsupported resample mode {resample!r}; supported: {PIL_INTERPOLATION}")
        mean = processor.image_mean if getattr(processor, "do_normalize", True) else (0.0, 0.0, 0.0)
        std = processor.image_std if getattr(processor, "do_normalize", True) else (1.0, 1.0, 1.0)
        return cls(
            resize=resize_to,
            crop=crop,
            mean=tuple(float(value) for value in _triple(mean)),
            std=tuple(float(value) for value in _triple(std)),
            interpolation=PIL_INTERPOLATION[resample_code],  # type: ignore[arg-type]
            crop_rounding="floor",
            clamp=True,
        )


def resized_shape(height: int, width: int, size: int | tuple[int, int]) -> tuple[int, int]:
    """Output ``(H, W)`` of a shortest-edge resize to ``size`` (long edge ``int(size * long / short)``)."""
    if not isinstance(size, int):
        return int(size[0]), int(size[1])
    if height <= width:
        return size, int(size * width / height)
    return int(size * height / width), size


def resize(pixels: Tensor, size: int | tuple[int, int], interpolation: str = "bicubic") -> Tensor:
    """Antialiased resize of ``[B, C, H, W]`` (torchvision's tensor ``Resize`` without rounding to uint8)."""
    height, width = pixels.shape[-2:]
    target = resized_shape(height, width, size)
    if target == (height, width):
        return pixels
    if interpolation == "nearest":
        return F.interpolate(pixels, size=target, mode="nearest")
    return F.interpolate(pixels, size=target, mode=interpolation, align_corners=False, antialias=True)


def center_crop(pixels: Tensor, size: tuple[int, int], rounding: str = "round") -> Tensor:
    """Centre crop ``[..., H, W]`` to ``size``; ``rounding`` picks torchvision's or transformers' offset."""
    height, width = pixels.shape[-2:]
    crop_height, crop_width = size
    if crop_height > height or crop_width > width:
        raise ValueError(f"cannot centre-crop {height}x{width} pixels to {crop_height}x{crop_width}")
    if rounding == "round":
        top, left = int(round((height - crop_height) / 2.0)), int(round((width - crop_width) / 2.0))
    elif rounding == "floor":
        top, left = (height - crop_height) // 2, (width - crop_width) // 2
    else:
        raise ValueError(f"crop rounding must be 'round' or 'floor'; got {rounding!r}")
    return pixels[..., top : top + crop_height, left : left + crop_width]


def normalize(pixels: Tensor, mean: Sequence[float], std: Sequence[float]) -> Tensor:
    """``(pixels - mean) / std`` per channel of ``[B, C, H, W]``."""
    mean_tensor = torch.tensor(mean, dtype=pixels.dtype, device=pixels.device).view(1, -1, 1, 1)
    std_tensor = torch.tensor(std, dtype=pixels.dtype, device=pixels.device).view(1, -1, 1, 1)
    return (pixels - mean_tensor) / std_tensor


def frames_as_images(pixels: Tensor) -> Tensor:
    """Video pixels ``[B, C, T, H, W]`` as images ``[B * T, C, H, W]`` (frame-major within each sample)."""
    batch, channels, frames, height, width = pixels.shape
    return pixels.permute(0, 2, 1, 3, 4).reshape(batch * frames, channels, height, width)


def _size_dict(size: Any) -> dict[str, int]:
    if size is None:
        return {}
    if isinstance(size, int):
        return {"height": size, "width": size}
    if hasattr(size, "items"):
        return {key: value for key, value in dict(size).items() if value is not None}
    # transformers SizeDict
    return {
        key: getattr(size, key) for key in ("shortest_edge", "height", "width") if getattr(size, key, None)
    }


def _triple(values: Any) -> tuple[float, float, float]:
    if isinstance(values, int | float):
        return (float(values),) * 3
    return tuple(values)  # type: ignore[return-value]
