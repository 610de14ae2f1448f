"""Human Preference Score v2 / v2.1 (Wu et al. 2023, "Human Preference Score v2: A Solid Benchmark for
Evaluating Human Preferences of Text-to-Image Synthesis", https://github.com/tgxs002/HPSv2).

HPS is an open_clip ViT-H-14 fine-tuned on human preference pairs (HPD v2). The score of an image and its
prompt is the cosine similarity of their unit-norm CLIP features, without the logit scale, as in the
reference ``hpsv2/img_score.py``::

    score = diag(encode_image(x, normalize=True) @ encode_text(tokens, normalize=True).T)

The architecture comes from stock ``open_clip`` (no ``hpsv2`` package: its bundled open_clip fork has the
same parameter names for this family) and the published checkpoints ``HPS_v2_compressed.pt`` /
``HPS_v2.1_compressed.pt`` (a dict with a ``state_dict``) are loaded strictly. The reference preprocessing
(``open_clip.transform.image_transform`` of the fork, eval branch) is ``ToTensor -> Resize(s, bicubic) on the
float tensor -> CenterCrop(s) -> Normalize(OpenAI mean / std)``: no uint8 rounding and no clamp, which
``ImagePreprocess`` reproduces on tensors, differentiably.
"""

from __future__ import annotations

import difflib
import json
import pickle
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from gen_rl.core.dtypes import resolve_device, resolve_dtype
from rewards.base import Reward, RewardOutput, deduplicate, register_reward
from rewards.preprocess import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, ImagePreprocess
from rewards.weights import resolve_file


def import_open_clip() -> Any:
    """The ``open_clip`` module, or an ImportError naming the extra that installs it."""
    try:
        import open_clip
    except ImportError as error:
        raise ImportError(
            "the HPS reward needs open-clip-torch (and torchvision): pip install 'gen-rl[clip]'"
        ) from error
    return open_clip


HPS_REPO = "xswu/HPSv2"
HPS_PUBLISHED = "https://huggingface.co/xswu/HPSv2"
HPS_FILES = {
    "v2": "HPS_v2_compressed.pt",
    "v2.0": "HPS_v2_compressed.pt",
    "v2.1": "HPS_v2.1_compressed.pt",
}
HPS_ARCH = "ViT-H-14"
CONFIG_KEYS = ("embed_dim", "vision_cfg", "text_cfg")


class CheckpointMismatchError(ValueError):
    """The checkpoint's parameter names or shapes do not fit the open_clip architecture."""


def hps_filename(version: str) -> str:
    """The published checkpoint file of HPS ``version`` (``v2`` / ``v2.0`` / ``v2.1``)."""
    if version not in HPS_FILES:
        raise ValueError(f"unknown HPS version {version!r}; valid: {', '.join(HPS_FILES)}")
    return HPS_FILES[version]


def open_clip_arch(arch: str) -> str:
    """The open_clip model name for ``arch``: a built-in name, or a model-config JSON file registered here.

    A JSON file is registered with ``open_clip.add_model_config`` under its file stem (open_clip's naming);
    a stem that already names a different config is refused rather than silently replaced.
    """
    if arch.endswith(".json"):
        return _register_config_file(Path(arch).expanduser())
    if import_open_clip().get_model_config(arch) is None:
        close = difflib.get_close_matches(arch, import_open_clip().list_models(), n=3)
        hint = f" Close: {', '.join(close)}." if close else ""
        raise ValueError(
            f"unknown open_clip architecture {arch!r}.{hint} Give a built-in name (HPS v2 / v2.1 use "
            f"{HPS_ARCH!r}) or the path of an open_clip model-config JSON file"
        )
    return arch


def _register_config_file(path: Path) -> str:
    if not path.is_file():
        raise FileNotFoundError(f"open_clip model config {path} does not exist")
    config = json.loads(path.read_text())
    missing = [key for key in CONFIG_KEYS if key not in config]
    if missing:
        raise ValueError(f"open_clip model config {path} lacks {missing}; it needs {list(CONFIG_KEYS)}")
    registered = import_open_clip().get_model_config(path.stem)
    if registered == config:
        return path.stem
    if registered is not None:
        raise ValueError(
            f"open_clip already has a different model config named {path.stem!r}; rename {path} (the file "
            "stem is the model name)"
        )
    import_open_clip().add_model_config(path)
    return path.stem


def load_hps_state_dict(path: str | Path) -> dict[str, Tensor]:
    """The parameters in an HPS checkpoint: ``{"state_dict": ...}`` as published, or a bare state dict.

    Loaded with ``weights_only=True`` (tensors and plain containers only); a DDP ``module.`` prefix is dropped.
    """
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        raise ValueError(
            f"HPS checkpoint {path} holds more than tensors and plain containers and was not loaded "
            f"(torch.load weights_only=True): {error}"
        ) from error
    state = loaded.get("state_dict", loaded) if isinstance(loaded, Mapping) else None
    if not isinstance(state, Mapping) or not all(isinstance(value, Tensor) for value in state.values()):
        raise ValueError(f"HPS checkpoint {path} is not a state dict nor a dict with a 'state_dict' entry")
    if state and all(key.startswith("module.") for key in state):
        state = {key.removeprefix("module."): value for key, value in state.items()}
    return dict(state)


def check_state_dict_fits(model: nn.Module, state: Mapping[str, Tensor], arch: str, source: Any) -> None:
    """``CheckpointMismatchError`` naming a few missing, unexpected and mis-shaped keys, if there are any."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    shapes = [
        f"{key} {tuple(state[key].shape)} vs {tuple(expected[key].shape)}"
        for key in sorted(set(state) & set(expected))
        if state[key].shape != expected[key].shape
    ]
    found = {
        "missing keys": missing,
        "unexpected keys": unexpected,
        "shape mismatches (checkpoint vs model)": shapes,
    }
    problems = [f"{len(keys)} {what} (e.g. {', '.join(keys[:4])})" for what, keys in found.items() if keys]
    if problems:
        raise CheckpointMismatchError(
            f"HPS checkpoint {source} does not fit the open_clip architecture {arch!r}: {'; '.join(problems)}. "
            f"HPS v2 / v2.1 checkpoints are {HPS_ARCH}; give the arch the checkpoint was trained with"
        )


def load_hps_model(arch: str, checkpoint_path: str | Path) -> nn.Module:
    """open_clip model ``arch`` (a name or config JSON) with the checkpoint's weights, strictly, in eval mode."""
    name = open_clip_arch(arch)
    state = load_hps_state_dict(checkpoint_path)
    model = import_open_clip().create_model(name, pretrained=None)
    check_state_dict_fits(model, state, name, checkpoint_path)
    model.load_state_dict(state, strict=True)
    return model.eval().requires_grad_(False)


def hps_preprocess(image_size: int | tuple[int, int]) -> ImagePreprocess:
    """The HPS eval transform on tensors: bicubic antialiased float resize, centre crop, OpenAI normalise.

    A square size resizes the shortest edge (aspect kept), as the reference passes an int to ``Resize``.
    """
    height, width = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
    return ImagePreprocess(
        resize=height if height == width else (height, width),
        crop=(height, width),
        mean=OPENAI_CLIP_MEAN,
        std=OPENAI_CLIP_STD,
        interpolation="bicubic",
        crop_rounding="round",
        clamp=False,
    )


@register_reward("hps")
class HPSReward(Reward):
    """Human Preference Score v2 / v2.1 (Wu et al. 2023): cosine of the image and prompt CLIP features.

    ``version``: ``v2.1`` (default) or ``v2`` / ``v2.0``, picking the published checkpoint file.
    ``checkpoint``: None for the hub repo ``xswu/HPSv2``, else a hub repo id, a local file or a folder
    holding the version's file. ``arch``: an open_clip model name (``ViT-H-14``) or a model-config JSON path.
    The reference scores under CUDA amp (float16); ``dtype`` float32 is the default here. The score is
    differentiable with respect to the pixels.
    """

    def __init__(
        self,
        version: str = "v2.1",
        checkpoint: str | None = None,
        arch: str = HPS_ARCH,
        device: str | None = None,
        dtype: str = "float32",
        batch_size: int = 32,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"hps batch_size must be >= 1; got {batch_size}")
        self.version = version
        self.batch_size = batch_size
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype)
        self.arch = open_clip_arch(arch)  # cheap checks first, then the checkpoint, then the model
        filename = hps_filename(version)
        what = f"HPS {version} checkpoint"
        self.checkpoint_path = resolve_file(
            checkpoint or HPS_REPO, filename, what=what, published=HPS_PUBLISHED
        )
        self.model = load_hps_model(self.arch, self.checkpoint_path).to(device=self.device, dtype=self.dtype)
        self.tokenizer = import_open_clip().get_tokenizer(self.arch)
        self.preprocess = hps_preprocess(self.model.visual.image_size)

    def embed_images(self, pixels: Tensor) -> Tensor:
        """Unit-norm image features ``[B, D]`` float32 of pixels ``[B, 3, H, W]`` in [0, 1] (differentiable)."""
        features = [
            self.model.encode_image(self.preprocess(chunk.to(self.device)).to(self.dtype), normalize=True)
            for chunk in pixels.split(self.batch_size)
        ]
        return torch.cat(features).float()

    @torch.no_grad()
    def embed_texts(self, prompts: list[str]) -> Tensor:
        """Unit-norm text features ``[N, D]`` float32 of ``prompts`` (open_clip BPE tokens, 77 long)."""
        features = [
            self.model.encode_text(self.tokenizer(chunk).to(self.device), normalize=True)
            for chunk in _chunks(prompts, self.batch_size)
        ]
        return torch.cat(features).float()

    def score(self, pixels: Tensor, prompts: list[str], metadata: list[dict]) -> RewardOutput:
        """HPS per sample: ``<f_img(x_i), f_txt(p_i)>`` of unit-norm features (no logit scale)."""
        unique_prompts, rows = deduplicate(prompts)  # a group shares its prompt: encode it once
        text_features = self.embed_texts(unique_prompts)
        index = torch.tensor(rows, device=text_features.device)
        image_features = self.embed_images(pixels)
        return RewardOutput(scores=(image_features * text_features[index]).sum(dim=-1))


def _chunks(items: list[str], size: int) -> list[list[str]]:
    return [items[start : start + size] for start in range(0, len(items), size)]
