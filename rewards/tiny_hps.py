"""A tiny random HPS (an open_clip ViT of the ViT-H-14 family) saved like the published HPS checkpoints.

``HPSReward(arch=<the JSON>, checkpoint=<the folder>)`` loads it through the same code as the real weights;
tests and benchmarks use it offline.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from rewards.hps import HPS_FILES, import_open_clip, open_clip_arch

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
