"""DINOv2 image features (transformers ``Dinov2Model``) and the similarity-to-references reward.

Features are the final-layer-normed CLS token (``pooler_output``), L2-normalised. The preprocessing is read
from the model's own image processor (BitImageProcessor: shortest edge 256, bicubic, centre crop 224, ImageNet
mean / std) and run on tensors.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from transformers import Dinov2Model

from gen_rl.core.dtypes import resolve_device, resolve_dtype
from rewards.base import Reward, RewardOutput, register_reward
from rewards.preprocess import ImagePreprocess
from rewards.weights import load_pretrained

DINO_PUBLISHED = "https://huggingface.co/facebook/dinov2-base (also -small, -large, -giant)"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


class DinoEmbedder:
    """L2-normalised DINOv2 CLS features of pixels ``[N, 3, H, W]`` in [0, 1]."""

    def __init__(
        self, model: str = "facebook/dinov2-base", device: str | None = None, dtype: str = "float32"
    ):
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype)
        what = f"DINOv2 model {model!r}"
        self.model = load_pretrained(Dinov2Model.from_pretrained, model, what=what, published=DINO_PUBLISHED)
        self.model.to(device=self.device, dtype=self.dtype).eval().requires_grad_(False)
        self.preprocess = ImagePreprocess.from_pretrained(model, what=what, published=DINO_PUBLISHED)

    def embed(self, pixels: Tensor, batch_size: int = 64) -> Tensor:
        """Unit-norm features ``[N, D]`` float32 of ``pixels`` ``[N, 3, H, W]`` in [0, 1]."""
        features = []
        for start in range(0, pixels.shape[0], batch_size):
            chunk = self.preprocess(pixels[start : start + batch_size].to(self.device))
            pooled = self.model(pixel_values=chunk.to(self.dtype)).pooler_output
            features.append(torch.nn.functional.normalize(pooled.float(), dim=-1))
        return (
            torch.cat(features)
            if features
            else torch.empty(0, self.model.config.hidden_size, device=self.device)
        )


@register_reward("dino_similarity")
class DinoSimilarity(Reward):
    """Cosine similarity of DINOv2 features to reference images, averaged (or maxed) over the references.

    ``references``: a folder of images, one image path, or a list of paths; loaded once here.
    """

    def __init__(
        self,
        references: str | list[str],
        model: str = "facebook/dinov2-base",
        reduce: str = "mean",
        device: str | None = None,
        dtype: str = "float32",
    ):
        if reduce not in ("mean", "max"):
            raise ValueError(f"dino_similarity reduce must be 'mean' or 'max'; got {reduce!r}")
        self.reduce = reduce
        self.embedder = DinoEmbedder(model, device=device, dtype=dtype)
        with torch.no_grad():  # each reference at its own size: the processor's resize + crop keeps aspect
            features = [self.embedder.embed(image[None]) for image in load_reference_images(references)]
        self.reference_features = torch.cat(features)

    def score(self, pixels: Tensor, prompts: list[str], metadata: list[dict]) -> RewardOutput:
        """Mean (or max) over references of cos(f(x), f(ref))."""
        similarity = self.embedder.embed(pixels) @ self.reference_features.T  # [B, R]
        scores = similarity.mean(dim=1) if self.reduce == "mean" else similarity.max(dim=1).values
        return RewardOutput(scores=scores, components={"dino_max_similarity": similarity.max(dim=1).values})


def load_reference_images(references: str | list[str]) -> list[Tensor]:
    """Reference images as pixels ``[3, H, W]`` in [0, 1], each at its own size."""
    images = []
    for path in _reference_paths(references):
        with Image.open(path) as image:
            array = np.asarray(image.convert("RGB"))
        images.append(torch.from_numpy(array.copy()).permute(2, 0, 1).float() / 255.0)
    return images


def _reference_paths(references: str | list[str]) -> list[Path]:
    given = [references] if isinstance(references, str) else list(references)
    paths: list[Path] = []
    for item in given:
        path = Path(item).expanduser()
        if path.is_dir():
            paths.extend(sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES))
        elif path.is_file():
            paths.append(path)
        else:
            raise FileNotFoundError(
                f"dino_similarity reference {item!r} does not exist; give image files or a folder"
            )
    if not paths:
        raise ValueError(
            f"dino_similarity found no reference images ({', '.join(IMAGE_SUFFIXES)}) in {given}"
        )
    return paths
