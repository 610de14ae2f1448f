"""Tiny random reward backbones of the real architectures, saved in the real formats (tests and benchmarks).

DINOv2, CLIP (with the real BPE tokenizer), the LAION aesthetic head and an HPS-family open_clip ViT.

Each ``save_tiny_*`` writes a folder that the reward heads load through the same code as real weights.
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import torch
from torch import nn
from transformers import (
    BitImageProcessor,
    CLIPConfig,
    CLIPImageProcessor,
    CLIPModel,
    CLIPProcessor,
    CLIPTokenizer,
    Dinov2Config,
    Dinov2Model,
)

from rewards.hps import HPS_FILES, import_open_clip, open_clip_arch
from rewards.preprocess import IMAGENET_MEAN, IMAGENET_STD, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD


def save_tiny_dino(folder: str | Path, seed: int = 0) -> Path:
    """A 2-layer DINOv2 (hidden 32, patch 8) + a BitImageProcessor (shortest edge 40, crop 32) in ``folder``."""
    folder = Path(folder)
    torch.manual_seed(seed)
    config = Dinov2Config(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=37,
        patch_size=8,
        image_size=32,
    )
    Dinov2Model(config).save_pretrained(folder)
    processor = BitImageProcessor(
        size={"shortest_edge": 40},
        crop_size={"height": 32, "width": 32},
        resample=3,
        do_center_crop=True,
        image_mean=list(IMAGENET_MEAN),
        image_std=list(IMAGENET_STD),
    )
    processor.save_pretrained(folder)
    return folder


def save_tiny_clip(folder: str | Path, seed: int = 0, projection_dim: int = 32) -> Path:
    """A 2-layer CLIP (hidden 32, patch 8, image 32) + a ``CLIPProcessor`` with the real CLIP BPE tokenizer.

    The image processor resizes the shortest edge to 40 (bicubic) and centre-crops 32x32 with OpenAI's
    mean / std; the tokenizer is built from open_clip's bundled BPE file, so its ids are CLIP's.
    """
    folder = Path(folder)
    torch.manual_seed(seed)
    tower = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 37}
    config = CLIPConfig(
        text_config={
            **tower,
            "vocab_size": 49408,
            "max_position_embeddings": 77,
            "projection_dim": projection_dim,
        },
        vision_config={**tower, "patch_size": 8, "image_size": 32, "projection_dim": projection_dim},
        projection_dim=projection_dim,
    )
    CLIPModel(config).save_pretrained(folder)
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": 40},
        crop_size={"height": 32, "width": 32},
        resample=3,
        do_center_crop=True,
        image_mean=list(OPENAI_CLIP_MEAN),
        image_std=list(OPENAI_CLIP_STD),
    )
    CLIPProcessor(image_processor=image_processor, tokenizer=clip_bpe_tokenizer()).save_pretrained(folder)
    return folder


def clip_bpe_tokenizer() -> CLIPTokenizer:
    """CLIP's tokenizer from open_clip's ``bpe_simple_vocab_16e6.txt.gz``, built as CLIP's ``SimpleTokenizer``.

    Vocabulary: the 256 byte characters, the same with ``</w>``, the first 49152 - 256 - 2 merges joined,
    then ``<|startoftext|>`` (49406) and ``<|endoftext|>`` (49407): 49408 tokens.
    """
    from open_clip.tokenizer import bytes_to_unicode, default_bpe

    with gzip.open(default_bpe(), "rt", encoding="utf-8") as bpe_file:
        merge_lines = bpe_file.read().split("\n")[1 : 49152 - 256 - 2 + 1]
    merges = [tuple(line.split()) for line in merge_lines]
    byte_chars = list(bytes_to_unicode().values())
    tokens = byte_chars + [char + "</w>" for char in byte_chars] + ["".join(merge) for merge in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {token: index for index, token in enumerate(tokens)}
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=77)


def save_tiny_aesthetic(folder: str | Path, seed: int = 0, projection_dim: int = 32) -> tuple[Path, Path]:
    """A tiny CLIP (``save_tiny_clip``) and a random LAION aesthetic head ``.pth`` on its ``projection_dim``.

    The head has the real hidden widths 1024/128/64/16 and key names, so the file format is the real one.
    Returns ``(clip_folder, head_file)``.
    """
    from rewards.aesthetic import AESTHETIC_HEAD_FILE, AestheticMLP

    folder = Path(folder)
    clip_folder = save_tiny_clip(folder / "clip", seed=seed, projection_dim=projection_dim)
    torch.manual_seed(seed + 1)
    head_file = folder / AESTHETIC_HEAD_FILE
    torch.save(AestheticMLP(projection_dim).state_dict(), head_file)
    return clip_folder, head_file


TINY_HPS_NAME = "tiny-hps-ViT-H-14-family"
# The keys of open_clip's model_configs/ViT-H-14.json, every size shrunk (vision heads = width / head_width).
TINY_HPS_CONFIG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 32, "head_width": 16, "patch_size": 8},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 4, "layers": 2},
}


def save_tiny_hps(folder: str | Path, seed: int = 0) -> tuple[Path, Path]:
    """Write ``<name>.json`` (open_clip model config) and random HPS checkpoints into ``folder``.

    ``HPS_v2.1_compressed.pt`` (from ``seed``) and ``HPS_v2_compressed.pt`` (from ``seed + 1``) each hold
    ``{"state_dict": ...}``, as the files published at https://huggingface.co/xswu/HPSv2. Returns the config
    path and the v2.1 checkpoint path.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config_path = folder / f"{TINY_HPS_NAME}.json"
    config_path.write_text(json.dumps(TINY_HPS_CONFIG, indent=2))
    name = open_clip_arch(str(config_path))
    paths = {}
    for offset, version in enumerate(("v2.1", "v2")):
        paths[version] = folder / HPS_FILES[version]
        torch.save({"state_dict": random_open_clip(name, seed + offset).state_dict()}, paths[version])
    return config_path, paths["v2.1"]


def random_open_clip(name: str, seed: int) -> nn.Module:
    """open_clip model ``name`` with every parameter perturbed (layer norms too), reproducibly from ``seed``."""
    torch.manual_seed(seed)
    model = import_open_clip().create_model(name, pretrained=None)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.05 * torch.randn(parameter.shape, generator=generator))
    return model.eval()
