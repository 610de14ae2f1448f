"""The LAION improved aesthetic predictor v2: an MLP on L2-normalised CLIP ViT-L/14 image embeddings.

``score(x) = MLP(E_I(x) / ||E_I(x)||)``, the 1-10 aesthetic rating regressed (MSE) on SAC + LOGOS + AVA
ratings (christophschuhmann/improved-aesthetic-predictor; the aesthetic reward of DDPO, Black et al. 2023).
The CLIP tower is transformers' ``CLIPVisionModelWithProjection`` loaded from a full CLIP save; the head is
the published torch state dict ``sac+logos+ava1-l14-linearMSE.pth`` (keys ``layers.{0,2,4,6,7}.*``).
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import CLIPConfig, CLIPVisionModelWithProjection

from gen_rl.core.dtypes import resolve_device, resolve_dtype
from rewards.base import Reward, RewardOutput, register_reward
from rewards.clip_similarity import CLIP_PUBLISHED
from rewards.preprocess import ImagePreprocess
from rewards.weights import load_pretrained, resolve_file

AESTHETIC_PUBLISHED = "https://github.com/christophschuhmann/improved-aesthetic-predictor"
AESTHETIC_HEAD_REPO = "camenduru/improved-aesthetic-predictor"
AESTHETIC_HEAD_FILE = "sac+logos+ava1-l14-linearMSE.pth"


class AestheticMLP(nn.Module):
    """The predictor's head: ``Linear(d,1024) Drop Linear(1024,128) Drop Linear(128,64) Drop Linear(64,16)
    Linear(16,1)`` as ``layers`` (no activations, as published), ``d`` = the CLIP projection width."""

    def __init__(self, input_size: int = 768):
        super().__init__()
        self.input_size = input_size
        self.layers = nn.Sequential(
            nn.Linear(input_size, 1024),
            nn.Dropout(0.2),
            nn.Linear(1024, 128),
            nn.Dropout(0.2),
            nn.Linear(128, 64),
            nn.Dropout(0.1),
            nn.Linear(64, 16),
            nn.Linear(16, 1),
        )

    def forward(self, embeds: Tensor) -> Tensor:
        """Ratings ``[N, 1]`` of unit-norm CLIP image embeddings ``[N, d]``."""
        return self.layers(embeds)


class _CLIPVisionTower(CLIPVisionModelWithProjection):
    """The vision half of a full CLIP save; the text half's weights are skipped without a load report."""

    _keys_to_ignore_on_load_unexpected = [r"^text_model\.", r"^text_projection\.", r"^logit_scale$"]


@register_reward("aesthetic")
class AestheticReward(Reward):
    """LAION aesthetic score ``MLP(E_I(x) / ||E_I(x)||)`` of CLIP ViT-L/14 image embeddings ``E_I``.

    ``clip_model``: a transformers CLIP save (folder or hub id); ``head``: the MLP state dict as a file path,
    a folder holding ``sac+logos+ava1-l14-linearMSE.pth``, or a hub repo id holding it.
    """

    def __init__(
        self,
        clip_model: str = "openai/clip-vit-large-patch14",
        head: str = AESTHETIC_HEAD_REPO,
        device: str | None = None,
        dtype: str = "float32",
        batch_size: int = 32,
    ):
        if batch_size < 1:
            raise ValueError(f"aesthetic batch_size must be >= 1; got {batch_size}")
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype)
        self.batch_size = batch_size
        head_path = resolve_file(
            head, AESTHETIC_HEAD_FILE, what="LAION aesthetic predictor head", published=AESTHETIC_PUBLISHED
        )
        self.clip = load_clip_vision(clip_model)
        self.clip.to(device=self.device, dtype=self.dtype).eval().requires_grad_(False)
        self.preprocess = ImagePreprocess.from_pretrained(
            clip_model, what=f"CLIP {clip_model!r}", published=CLIP_PUBLISHED
        )
        self.mlp = load_aesthetic_head(head_path, self.clip.config.projection_dim)
        self.mlp.to(device=self.device).eval().requires_grad_(False)

    def score(self, pixels: Tensor, prompts: list[str], metadata: list[dict]) -> RewardOutput:
        """The predicted aesthetic rating (about 1-10) of each image; the prompts are not used."""
        ratings = self.mlp(self.embed_images(pixels)).squeeze(-1)
        return RewardOutput(scores=ratings)

    def embed_images(self, pixels: Tensor) -> Tensor:
        """Unit-norm CLIP image embeddings ``[B, d]`` float32 of ``pixels`` ``[B, 3, H, W]`` in [0, 1]."""
        embeds = []
        for start in range(0, pixels.shape[0], self.batch_size):
            pixel_values = self.preprocess(pixels[start : start + self.batch_size].to(self.device))
            image_embeds = self.clip(pixel_values=pixel_values.to(self.dtype)).image_embeds
            embeds.append(F.normalize(image_embeds.float(), dim=-1))
        if not embeds:
            return torch.empty(0, self.clip.config.projection_dim, device=self.device)
        return torch.cat(embeds)


def load_clip_vision(source: str) -> CLIPVisionModelWithProjection:
    """The vision tower + projection of the full CLIP save ``source``, projecting to its ``projection_dim``."""
    what = f"CLIP model {source!r}"
    config = load_pretrained(CLIPConfig.from_pretrained, source, what=what, published=CLIP_PUBLISHED)
    vision_config = config.vision_config
    vision_config.projection_dim = config.projection_dim
    return load_pretrained(
        _CLIPVisionTower.from_pretrained, source, what=what, published=CLIP_PUBLISHED, config=vision_config
    )


def load_aesthetic_head(path: str | Path, input_size: int) -> AestheticMLP:
    """The MLP with the state dict at ``path`` loaded strictly; ValueError naming the misfit otherwise."""
    try:
        state_dict = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # not a torch file, or a pickled module rather than a state dict
        raise ValueError(
            f"LAION aesthetic head {path}: cannot read it as a torch state dict ({type(error).__name__}: "
            f"{error}). Expected {AESTHETIC_HEAD_FILE} as published at {AESTHETIC_PUBLISHED}."
        ) from error
    if not isinstance(state_dict, dict):
        raise ValueError(
            f"LAION aesthetic head {path}: expected a state dict, got {type(state_dict).__name__}"
        )
    mlp = AestheticMLP(input_size)
    try:
        mlp.load_state_dict(state_dict, strict=True)
    except RuntimeError as error:
        raise ValueError(
            f"LAION aesthetic head {path} does not fit the MLP layers.{{0,2,4,6,7}} with input width {input_size} "
            f"(the CLIP model's projection_dim): {error}"
        ) from error
    return mlp
