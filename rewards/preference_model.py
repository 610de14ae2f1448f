"""A preference reward model trained with ``task: reward_model`` (``gen_rl/reward_model``), loaded by path.

A checkpoint is a folder:

- ``preference_model.json``: the backbone kind (``clip`` or ``dino``), whether the prompt is used, the head
  kind and width, and the image preprocessing the model was trained with (an ``ImagePreprocess`` recipe);
- ``backbone/``: the backbone (transformers ``CLIPModel`` or ``Dinov2Model``, LoRA merged) and, for CLIP, its
  tokenizer;
- ``head.safetensors``: the head's weights and its feature standardisation (mean, std).

The score of an image ``x`` with prompt ``p`` is ``head(standardise(features(x, p)))``: the features are the
unit-norm image embedding, followed by its product with the unit-norm prompt embedding when the prompt is used
(``[e_x, e_x * e_p]``); the ``cosine`` head scores ``exp(logit_scale) * cos(e_x, e_p)`` as HPS / PickScore do.
Register name: ``preference_model`` (``kwargs: {path: <checkpoint folder>}``).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from gen_rl.core.dtypes import resolve_device, resolve_dtype
from rewards.base import Reward, RewardOutput, register_reward
from rewards.preprocess import ImagePreprocess

SPEC_FILE = "preference_model.json"
HEAD_FILE = "head.safetensors"
BACKBONE_FOLDER = "backbone"
FORMAT_VERSION = 1
BACKBONES = ("clip", "dino")
HEADS = ("linear", "mlp", "cosine")


@dataclass
class PreferenceModelSpec:
    """What a checkpoint's ``preference_model.json`` holds: enough to rebuild the scorer exactly."""

    backbone: str  # "clip" | "dino"
    use_text: bool
    head: str  # "linear" | "mlp" | "cosine"
    head_hidden: int
    feature_dim: int  # width of the backbone's (projected) embedding
    preprocess: dict[str, Any]  # an ImagePreprocess recipe
    max_text_length: int = 77
    trained_with: dict[str, Any] = field(
        default_factory=dict
    )  # provenance (mode, data, steps); not used to load
    format_version: int = FORMAT_VERSION

    def check(self) -> None:
        """ValueError naming the first field that cannot be used."""
        if self.backbone not in BACKBONES:
            raise ValueError(f"preference model backbone must be one of {BACKBONES}; got {self.backbone!r}")
        if self.head not in HEADS:
            raise ValueError(f"preference model head must be one of {HEADS}; got {self.head!r}")
        if self.use_text and self.backbone != "clip":
            raise ValueError(f"a {self.backbone} backbone has no text side; set use_text: false")
        if self.head == "cosine" and not self.use_text:
            raise ValueError("the cosine head compares image and prompt embeddings; it needs use_text: true")


def preprocess_to_dict(preprocess: ImagePreprocess) -> dict[str, Any]:
    """An ``ImagePreprocess`` as JSON-ready values (tuples as lists)."""
    return json.loads(json.dumps(asdict(preprocess)))


def preprocess_from_dict(recipe: dict[str, Any]) -> ImagePreprocess:
    """The ``ImagePreprocess`` a checkpoint was trained with."""
    resize = recipe.get("resize")
    crop = recipe.get("crop")
    return ImagePreprocess(
        resize=tuple(resize) if isinstance(resize, list) else resize,
        crop=None if crop is None else (int(crop[0]), int(crop[1])),
        mean=tuple(float(value) for value in recipe["mean"]),
        std=tuple(float(value) for value in recipe["std"]),
        interpolation=recipe.get("interpolation", "bicubic"),
        crop_rounding=recipe.get("crop_rounding", "round"),
        clamp=bool(recipe.get("clamp", False)),
    )


class ScoreHead(nn.Module):
    """Standardise the features with fixed statistics, then a linear layer or a one-hidden-layer MLP -> ``[B]``."""

    def __init__(self, in_features: int, kind: str, hidden: int) -> None:
        super().__init__()
        self.register_buffer("feature_mean", torch.zeros(in_features))
        self.register_buffer("feature_std", torch.ones(in_features))
        if kind == "mlp":
            self.layers = nn.Sequential(nn.Linear(in_features, hidden), nn.GELU(), nn.Linear(hidden, 1))
        else:
            self.layers = nn.Sequential(nn.Linear(in_features, 1))

    def forward(self, features: Tensor) -> Tensor:
        """Scores ``[B]`` of features ``[B, F]``."""
        standardised = (features - self.feature_mean) / self.feature_std
        return self.layers(standardised).squeeze(-1)


class PreferenceScorer(nn.Module):
    """Backbone + head: ``scorer(pixels, prompts)`` -> scores ``[B]`` for pixels ``[B, 3, H, W]`` in [0, 1].

    ``pixels`` may also be a list of ``[3, H, W]`` images of different sizes: each is preprocessed alone (the
    same arithmetic as a batch), then they go through the backbone together.
    """

    def __init__(self, spec: PreferenceModelSpec, backbone: nn.Module, tokenizer: Any | None = None) -> None:
        super().__init__()
        spec.check()
        self.spec = spec
        self.backbone = backbone
        self.tokenizer = tokenizer
        self.preprocess = preprocess_from_dict(spec.preprocess)
        in_features = spec.feature_dim * (2 if spec.use_text else 1)
        self.head = ScoreHead(in_features, spec.head, spec.head_hidden) if spec.head != "cosine" else None

    @property
    def device(self) -> torch.device:
        """The device of the backbone's weights."""
        return next(self.backbone.parameters()).device

    def prepare(self, pixels: Tensor | list[Tensor]) -> Tensor:
        """Preprocessed pixels ``[B, 3, h, w]`` on the backbone's device (the checkpoint's recipe)."""
        device = self.device
        if isinstance(pixels, Tensor):
            return self.preprocess(pixels.to(device))
        return torch.cat([self.preprocess(image[None].to(device)) for image in pixels])

    def image_embeddings(self, pixel_values: Tensor) -> Tensor:
        """Unit-norm image embeddings ``[B, D]`` float32 (CLIP: projected; DINOv2: the CLS ``pooler_output``)."""
        dtype = next(self.backbone.parameters()).dtype
        if self.spec.backbone == "clip":
            output = self.backbone.get_image_features(pixel_values=pixel_values.to(dtype))
            embedded = output if isinstance(output, Tensor) else output.pooler_output
        else:
            embedded = self.backbone(pixel_values=pixel_values.to(dtype)).pooler_output
        return nn.functional.normalize(embedded.float(), dim=-1)

    def text_embeddings(self, prompts: list[str]) -> Tensor:
        """Unit-norm projected CLIP text embeddings ``[B, D]`` float32."""
        tokens = self.tokenizer(
            prompts,
            padding="max_length",
            truncation=True,
            max_length=self.spec.max_text_length,
            return_tensors="pt",
        ).to(self.device)
        output = self.backbone.get_text_features(
            input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"]
        )
        embedded = output if isinstance(output, Tensor) else output.pooler_output
        return nn.functional.normalize(embedded.float(), dim=-1)

    def features(self, pixels: Tensor | list[Tensor], prompts: list[str]) -> Tensor:
        """Head input ``[B, F]``: ``e_x`` or ``[e_x, e_x * e_p]`` (not for the cosine head)."""
        image = self.image_embeddings(self.prepare(pixels))
        if not self.spec.use_text:
            return image
        return torch.cat([image, image * self.text_embeddings(prompts)], dim=-1)

    def forward(self, pixels: Tensor | list[Tensor], prompts: list[str]) -> Tensor:
        """Scores ``[B]`` float32."""
        if self.spec.head == "cosine":
            image = self.image_embeddings(self.prepare(pixels))
            text = self.text_embeddings(prompts)
            return self.backbone.logit_scale.float().exp() * (image * text).sum(dim=-1)
        return self.head(self.features(pixels, prompts))


# ----- checkpoints ----------------------------------------------------------------------------------------
def save_preference_model(scorer: PreferenceScorer, folder: str | Path) -> Path:
    """Write ``scorer`` as a checkpoint folder (LoRA must be merged into the backbone before)."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    scorer.backbone.save_pretrained(folder / BACKBONE_FOLDER)
    if scorer.tokenizer is not None:
        scorer.tokenizer.save_pretrained(folder / BACKBONE_FOLDER)
    if scorer.head is not None:
        head = {name: value.detach().cpu().contiguous() for name, value in scorer.head.state_dict().items()}
        save_file(head, str(folder / HEAD_FILE))
    (folder / SPEC_FILE).write_text(json.dumps(asdict(scorer.spec), indent=1) + "\n", encoding="utf-8")
    return folder


def read_spec(folder: str | Path) -> PreferenceModelSpec:
    """The checked ``PreferenceModelSpec`` of a checkpoint folder; ValueError naming what is missing."""
    folder = Path(folder).expanduser()
    spec_path = folder / SPEC_FILE
    if not spec_path.is_file():
        raise ValueError(
            f"preference model checkpoint {folder} has no {SPEC_FILE}; point `path` at the model folder that "
            "`task: reward_model` wrote (<log.output_dir>/model)"
        )
    data = json.loads(spec_path.read_text(encoding="utf-8"))
    version = data.get("format_version")
    if version != FORMAT_VERSION:
        raise ValueError(f"{spec_path} has format_version {version!r}; this code reads {FORMAT_VERSION}")
    spec = PreferenceModelSpec(**data)
    spec.check()
    return spec


def load_preference_model(
    folder: str | Path, device: str | torch.device | None = None, dtype: str = "float32"
) -> PreferenceScorer:
    """Rebuild the scorer a checkpoint folder holds, in eval mode with no gradients."""
    from safetensors.torch import load_file

    folder = Path(folder).expanduser()
    spec = read_spec(folder)
    backbone_path = folder / BACKBONE_FOLDER
    torch_dtype = resolve_dtype(dtype)
    tokenizer = None
    if spec.backbone == "clip":
        from transformers import AutoTokenizer, CLIPModel

        backbone = CLIPModel.from_pretrained(backbone_path, dtype=torch_dtype)
        if spec.use_text:
            tokenizer = AutoTokenizer.from_pretrained(backbone_path)
    else:
        from transformers import Dinov2Model

        backbone = Dinov2Model.from_pretrained(backbone_path, dtype=torch_dtype)
    scorer = PreferenceScorer(spec, backbone, tokenizer)
    if scorer.head is not None:
        scorer.head.load_state_dict(load_file(str(folder / HEAD_FILE)))
    return scorer.to(resolve_device(device)).eval().requires_grad_(False)


@register_reward("preference_model")
class PreferenceModelReward(Reward):
    """The score of a preference model trained with ``task: reward_model``, loaded from its folder by ``path``.

    The checkpoint's own preprocessing is applied to the pixels (resize, crop, normalise), so the reward sees
    images exactly as the model did in training and in its evaluation. ``batch_size`` images per forward.
    """

    def __init__(
        self, path: str, device: str | None = None, dtype: str = "float32", batch_size: int = 32
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"preference_model batch_size must be >= 1; got {batch_size}")
        self.path = str(path)
        self.batch_size = batch_size
        self.scorer = load_preference_model(path, device=device, dtype=dtype)

    @torch.no_grad()
    def score(self, pixels: Tensor, prompts: list[str], metadata: list[dict]) -> RewardOutput:
        """The model's score per image, ``batch_size`` images per forward."""
        chunks = [
            self.scorer(pixels[start : start + self.batch_size], prompts[start : start + self.batch_size])
            for start in range(0, pixels.shape[0], self.batch_size)
        ]
        scores = torch.cat(chunks) if chunks else torch.empty(0)
        return RewardOutput(scores=scores.float().cpu())


def score_images(
    scorer: PreferenceScorer, images: list[Tensor], prompts: list[str], batch_size: int
) -> Tensor:
    """Scores ``[N]`` of images of any sizes, ``batch_size`` per forward, in order (no gradients)."""
    with torch.no_grad():
        chunks = [
            scorer(images[start : start + batch_size], prompts[start : start + batch_size])
            for start in range(0, len(images), batch_size)
        ]
    return torch.cat(chunks).float().cpu() if chunks else torch.empty(0)
