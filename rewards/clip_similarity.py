"""Image-text similarity rewards on a transformers ``CLIPModel``: CLIPScore and PickScore.

Both score ``scale * cos(E_I(x), E_T(c))`` with ``E_I`` / ``E_T`` the projected CLIP image / text embeddings:

- ``clip_score``: OpenAI CLIP ViT-L/14; plain cosine by default, or CLIPScore ``w * max(cos, 0)`` with
  ``w = 2.5`` (Hessel et al. 2021, eq. 1) through ``scale=2.5, clip_at_zero=True``;
- ``pickscore``: the PickScore CLIP-H/14 fine-tune, ``s(x, c) = exp(t) * cos`` with its learned logit scale
  ``t`` (Kirstain et al. 2023, eq. 1), optionally divided by a constant (Flow-GRPO divides by 26).

The image preprocessing is read from the model's image processor and runs on tensors on the model's device
(``rewards.preprocess``); the text goes through the model's tokenizer as PickScore's reference code does
(padding, truncation to 77 tokens).
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor
from transformers import AutoProcessor, CLIPModel

from gen_rl.core.dtypes import resolve_device, resolve_dtype
from rewards.base import Reward, RewardOutput, deduplicate, register_reward
from rewards.preprocess import ImagePreprocess
from rewards.weights import load_pretrained

CLIP_PUBLISHED = "https://huggingface.co/openai/clip-vit-large-patch14"
PICKSCORE_PUBLISHED = "https://huggingface.co/yuvalkirstain/PickScore_v1"
PICKSCORE_PROCESSOR_PUBLISHED = "https://huggingface.co/laion/CLIP-ViT-H-14-laion2B-s32B-b79K"
TEXT_MAX_LENGTH = 77  # CLIP's context length


class CLIPSimilarity(Reward):
    """``scale * cos(E_I(x), E_T(prompt))`` per sample, or ``scale * max(cos, 0)`` with ``clip_at_zero``.

    ``model``: a transformers CLIP save (folder or hub id); ``processor``: where its tokenizer and image
    processor live (None: the same source). ``scale`` is a number or ``"logit_scale"`` for the model's own
    ``exp(t)``, read in float32 before any cast to ``dtype``. Components: ``clip_cosine`` (the raw cosine).
    """

    model_label: ClassVar[str] = "CLIP model"  # names the model in missing-weights errors

    def __init__(
        self,
        model: str,
        processor: str | None = None,
        scale: float | str = 1.0,
        clip_at_zero: bool = False,
        device: str | None = None,
        dtype: str = "float32",
        batch_size: int = 32,
        published: str = CLIP_PUBLISHED,
        processor_published: str | None = None,
    ):
        if batch_size < 1:
            raise ValueError(f"{type(self).__name__} batch_size must be >= 1; got {batch_size}")
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype)
        self.batch_size = batch_size
        self.clip_at_zero = clip_at_zero
        self.model = load_pretrained(
            CLIPModel.from_pretrained, model, what=f"{self.model_label} {model!r}", published=published
        )
        self.scale = _resolve_scale(self.model, scale)
        self.model.to(device=self.device, dtype=self.dtype).eval().requires_grad_(False)
        processor_source = model if processor is None else processor
        self.processor = load_pretrained(
            AutoProcessor.from_pretrained,
            processor_source,
            what=f"{self.model_label} processor (tokenizer + image processor) {processor_source!r}",
            published=processor_published or published,
        )
        _check_processor(self.processor, processor_source)
        self.preprocess = ImagePreprocess.from_image_processor(self.processor.image_processor)

    def score(self, pixels: Tensor, prompts: list[str], metadata: list[dict]) -> RewardOutput:
        """``scale * cos`` of each image with its own prompt (the diagonal of the similarity matrix)."""
        image_embeds = self.embed_images(pixels)  # [B, D]
        text_embeds = self.embed_texts(prompts)  # [B, D]
        cosine = (image_embeds * text_embeds).sum(dim=-1)
        clipped = cosine.clamp(min=0.0) if self.clip_at_zero else cosine
        return RewardOutput(scores=self.scale * clipped, components={"clip_cosine": cosine})

    def embed_images(self, pixels: Tensor) -> Tensor:
        """Unit-norm projected image embeddings ``[B, D]`` float32 of ``pixels`` ``[B, 3, H, W]`` in [0, 1]."""
        embeds = []
        for start in range(0, pixels.shape[0], self.batch_size):
            pixel_values = self.preprocess(pixels[start : start + self.batch_size].to(self.device))
            features = self.model.get_image_features(pixel_values=pixel_values.to(self.dtype))
            embeds.append(F.normalize(_projected(features).float(), dim=-1))
        return torch.cat(embeds) if embeds else self._empty_embeds()

    def embed_texts(self, prompts: list[str]) -> Tensor:
        """Unit-norm projected text embeddings ``[N, D]`` float32, one per prompt (repeats encoded once)."""
        unique_prompts, rows = deduplicate(prompts)
        embeds = []
        for start in range(0, len(unique_prompts), self.batch_size):
            tokens = self.processor.tokenizer(
                unique_prompts[start : start + self.batch_size],
                padding=True,
                truncation=True,
                max_length=TEXT_MAX_LENGTH,
                return_tensors="pt",
            ).to(self.device)
            features = self.model.get_text_features(
                input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"]
            )
            embeds.append(F.normalize(_projected(features).float(), dim=-1))
        if not embeds:
            return self._empty_embeds()
        return torch.cat(embeds)[torch.tensor(rows, device=self.device)]

    def _empty_embeds(self) -> Tensor:
        return torch.empty(0, self.model.config.projection_dim, device=self.device)


@register_reward("clip_score")
class CLIPScore(CLIPSimilarity):
    """CLIPScore (Hessel et al. 2021, eq. 1): ``scale * cos(E_I(x), E_T(c))``, clamped at 0 with ``clip_at_zero``.

    The defaults give the plain cosine of OpenAI CLIP ViT-L/14; ``scale=2.5, clip_at_zero=True`` gives the
    paper's ``2.5 * max(cos, 0)``.
    """

    def __init__(
        self,
        model: str = "openai/clip-vit-large-patch14",
        processor: str | None = None,
        scale: float = 1.0,
        clip_at_zero: bool = False,
        device: str | None = None,
        dtype: str = "float32",
        batch_size: int = 32,
    ):
        super().__init__(
            model,
            processor=processor,
            scale=float(scale),
            clip_at_zero=clip_at_zero,
            device=device,
            dtype=dtype,
            batch_size=batch_size,
            published=CLIP_PUBLISHED,
        )


@register_reward("pickscore")
class PickScore(CLIPSimilarity):
    """PickScore (Kirstain et al. 2023, eq. 1): ``exp(t) * cos(E_I(x), E_T(c)) / divide_by``.

    ``exp(t)`` is the model's learned ``logit_scale.exp()`` (about 100), as PickScore's reference code scores;
    Flow-GRPO uses ``divide_by=26`` to bring the reward near 1. The processor (tokenizer + image processor)
    lives in the LAION CLIP-H/14 repository, the model in PickScore's.
    """

    model_label = "PickScore model"

    def __init__(
        self,
        model: str = "yuvalkirstain/PickScore_v1",
        processor: str | None = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K",
        divide_by: float = 1.0,
        device: str | None = None,
        dtype: str = "float32",
        batch_size: int = 32,
    ):
        if not divide_by > 0:
            raise ValueError(f"pickscore divide_by must be > 0; got {divide_by}")
        super().__init__(
            model,
            processor=processor,
            scale="logit_scale",
            device=device,
            dtype=dtype,
            batch_size=batch_size,
            published=PICKSCORE_PUBLISHED,
            processor_published=PICKSCORE_PROCESSOR_PUBLISHED,
        )
        self.logit_scale = self.scale
        self.scale = self.logit_scale / float(divide_by)


def _resolve_scale(model: CLIPModel, scale: float | str) -> float:
    """A fixed scale, or the model's ``logit_scale.exp()`` in float32 for ``"logit_scale"``."""
    if scale == "logit_scale":
        return float(model.logit_scale.detach().float().exp())
    if isinstance(scale, str):
        raise ValueError(f"CLIP similarity scale must be a number or 'logit_scale'; got {scale!r}")
    return float(scale)


def _projected(features: Any) -> Tensor:
    """The projected embeddings: transformers 5 returns an output whose ``pooler_output`` holds them."""
    return features if isinstance(features, Tensor) else features.pooler_output


def _check_processor(processor: Any, source: str) -> None:
    """ValueError unless ``processor`` has both a tokenizer and an image processor (a ``CLIPProcessor``)."""
    missing = [part for part in ("tokenizer", "image_processor") if getattr(processor, part, None) is None]
    if missing:
        raise ValueError(
            f"the processor loaded from {source!r} ({type(processor).__name__}) has no {' or '.join(missing)}; "
            "point `processor` at a CLIP processor save (tokenizer + preprocessor_config.json)"
        )
