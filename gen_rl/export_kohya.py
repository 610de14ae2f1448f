"""Export a UNet LoRA in the kohya-ss layout that ComfyUI, AUTOMATIC1111 / Forge and most web UIs read.

One ``.safetensors`` file, three tensors per adapted module, named after the diffusers UNet module path with its
dots turned into underscores::

    lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight   [r, in]   (peft A)
    lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q.lora_up.weight     [out, r]  (peft B)
    lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q.alpha              scalar

Kohya readers apply ``W + (alpha / r) up @ down``. The adapter's own scale (``lora_alpha / r``, rsLoRA,
``rank_pattern`` / ``alpha_pattern``) is folded into ``lora_up`` by :func:`gen_rl.export.lora_state_dict` and
``alpha`` is written as ``r``, so every reader applies exactly the trained update ``scale * B @ A``, including
readers that ignore ``alpha``. Only the UNet families (SD 1.x / 2.x, SDXL) have this layout.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from gen_rl.export import lora_state_dict

KOHYA_UNET_PREFIX = "lora_unet_"


def kohya_module_name(module_path: str) -> str:
    """``down_blocks.1.attentions.0...to_q`` -> ``lora_unet_down_blocks_1_attentions_0_..._to_q``."""
    return KOHYA_UNET_PREFIX + module_path.replace(".", "_")


def kohya_lora_state_dict(
    sampler: Any, adapter_name: str = "default", dtype: torch.dtype | None = None
) -> dict[str, Tensor]:
    """The sampler's UNet LoRA as kohya-ss tensors (``lora_down`` = A, ``lora_up`` = scale * B, ``alpha`` = r).

    ``dtype``: cast the weights (e.g. ``torch.float16``, what most shared LoRA files use); None keeps the
    trained dtype. ``alpha`` is stored in float32.
    """
    if getattr(sampler, "denoiser_component", None) != "unet":
        raise ValueError(
            f"the kohya LoRA layout names UNet modules (SD 1.x / 2.x, SDXL); the {sampler.family} family's "
            f"denoiser is a {sampler.denoiser_component}. Use gen_rl.export.save_lora (diffusers' layout) instead"
        )
    peft_tensors = lora_state_dict(sampler.denoiser, adapter_name)
    exported: dict[str, Tensor] = {}
    for key, tensor in peft_tensors.items():
        module_path, _, part = key.rpartition(".lora_")
        if part not in ("A.weight", "B.weight"):
            raise ValueError(
                f"cannot export {key!r} in the kohya layout: only plain LoRA (lora_A / lora_B) is supported; "
                "train without DoRA or other LoRA variants"
            )
        name = kohya_module_name(module_path)
        kind = "lora_down" if part == "A.weight" else "lora_up"
        exported[f"{name}.{kind}.weight"] = tensor if dtype is None else tensor.to(dtype)
        if kind == "lora_down":
            exported[f"{name}.alpha"] = torch.tensor(float(tensor.shape[0]), dtype=torch.float32)
    return exported


def save_kohya_lora(
    sampler: Any, path: str | Path, adapter_name: str = "default", dtype: torch.dtype | None = None
) -> Path:
    """Write :func:`kohya_lora_state_dict` to ``path`` (one ``.safetensors`` file, written whole then renamed
    into place) with kohya's ``ss_*`` metadata; returns the path. Call it on the main process only."""
    from safetensors.torch import save_file

    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(
            f"a kohya LoRA is one .safetensors file; got {str(path)!r} (name it <name>.safetensors)"
        )
    tensors = kohya_lora_state_dict(sampler, adapter_name, dtype)
    ranks = {int(tensor.item()) for key, tensor in tensors.items() if key.endswith(".alpha")}
    metadata = {
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(max(ranks)) if ranks else "0",
        "ss_network_alpha": str(max(ranks)) if ranks else "0",
        "ss_v_parameterization": str(getattr(sampler, "prediction_type", "epsilon") == "v_prediction"),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = path.with_name(f".{path.name}.tmp")
    try:
        save_file(tensors, str(staging), metadata=metadata)
        staging.replace(path)
    finally:
        staging.unlink(missing_ok=True)
    return path
