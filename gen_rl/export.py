"""Export trained LoRA adapters in diffusers' format, which ``pipe.load_lora_weights(folder)`` and ComfyUI read.

``save_lora`` writes ``pytorch_lora_weights.safetensors`` (keys ``<denoiser>.<module>.lora_A/B.weight``, where
``<denoiser>`` is ``transformer`` or ``unet``)
through the pipeline class's own ``save_lora_weights``. The adapter's scale (``lora_alpha / r``, or
``lora_alpha / sqrt(r)`` with rsLoRA, per module with ``alpha_pattern`` / ``rank_pattern``) is folded into
``lora_B``, and the stored adapter config says ``lora_alpha = r``: readers that honour the config
(diffusers) and readers that assume scale 1 when no alpha is stored (ComfyUI, most web UIs) then apply the
same update ``W + B A``.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"


def lora_target_modules(family: str) -> list[str]:
    """Default peft ``target_modules`` (module-name suffixes) of a registered family: its sampler's
    ``lora_target_modules`` (``pipelines.families.FAMILIES``)."""
    from pipelines.families import FAMILIES, load_object

    if family not in FAMILIES:
        raise ValueError(
            f"no default LoRA target modules for family {family!r}; known: {', '.join(FAMILIES)}. "
            "Give model.lora_target_modules explicitly."
        )
    return list(load_object(FAMILIES[family].sampler).lora_target_modules)


def save_lora(
    sampler: Any,
    directory: str | Path,
    adapter_name: str = "default",
    state_dict: dict[str, Tensor] | None = None,
) -> Path:
    """Write the denoiser's LoRA adapter to ``directory`` in diffusers' format and return the folder.

    The folder is written whole into a temporary sibling and renamed into place, so a crash never leaves a
    half-written export; an existing folder at ``directory`` is replaced. Load it back with
    ``pipeline.load_lora_weights(directory)``. Wan 2.2 with both experts trained writes ``high_noise/`` and
    ``low_noise/``: ``pipe.load_lora_weights(d / "high_noise")`` and ``pipe.load_lora_weights(d / "low_noise",
    load_into_transformer_2=True)``. Call it on the main process only.
    """
    denoiser = sampler.denoiser
    component = sampler.denoiser_component  # "transformer" or "unet": the key prefix diffusers expects
    config = _adapter_config(denoiser, adapter_name)
    if state_dict is None:
        state_dict = lora_state_dict(denoiser, adapter_name)
    metadata = _unit_scale_metadata(config)
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise FileExistsError(f"cannot export a LoRA to {directory}: a file of that name exists")
    directory.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", suffix=".tmp", dir=directory.parent))
    # an adapter over modules that load from separate files (Wan 2.2's two experts: high_noise/ and low_noise/) is
    # split by the sampler; one file otherwise
    split = getattr(sampler, "lora_export_parts", None)
    parts = split(state_dict) if split is not None else {"": state_dict}
    try:
        for folder, part in parts.items():
            type(sampler.pipeline).save_lora_weights(
                staging / folder,
                safe_serialization=True,
                **{f"{component}_lora_layers": part, f"{component}_lora_adapter_metadata": metadata},
            )
        _replace_directory(staging, directory)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return directory


def lora_state_dict(transformer: torch.nn.Module, adapter_name: str = "default") -> dict[str, Tensor]:
    """The adapter's ``<module>.lora_A/B.weight`` tensors (CPU, contiguous) with its scale folded into B."""
    from peft import get_peft_model_state_dict
    from peft.tuners.lora import LoraLayer
    from torch.distributed.tensor import DTensor

    _adapter_config(transformer, adapter_name)
    state_dict = get_peft_model_state_dict(transformer, adapter_name=adapter_name)
    scales = {
        name: float(module.scaling[adapter_name])
        for name, module in transformer.named_modules()
        if isinstance(module, LoraLayer) and adapter_name in module.scaling
    }
    exported = {}
    for key, tensor in state_dict.items():
        tensor = tensor.detach()
        if isinstance(tensor, DTensor):  # an FSDP2 shard: gathering is a collective, every process calls this
            tensor = tensor.full_tensor()
        module_name, is_lora_b, _ = key.rpartition(".lora_B.")
        if is_lora_b and scales.get(module_name, 1.0) != 1.0:
            tensor = (tensor.float() * scales[module_name]).to(tensor.dtype)
        exported[key] = tensor.cpu().contiguous().clone()  # a copy, never a view of the live parameter
    return exported


def merge_lora(sampler: Any, adapter_name: str = "default") -> None:
    """Fuse the adapter into the denoiser's base weights and remove the LoRA layers (for a full export)."""
    transformer = sampler.denoiser
    _adapter_config(transformer, adapter_name)
    others = sorted(set(transformer.peft_config) - {adapter_name})
    if others:
        raise ValueError(
            f"merge_lora fuses one adapter and removes all LoRA layers, but the transformer also has {others}; "
            "delete them first (transformer.delete_adapters([...]))"
        )
    transformer.fuse_lora(adapter_names=[adapter_name])
    transformer.unload_lora()


def _adapter_config(transformer: torch.nn.Module, adapter_name: str) -> Any:
    """The peft ``LoraConfig`` of ``adapter_name``, or a clear error when the transformer has none."""
    adapters = getattr(transformer, "peft_config", None) or {}
    if not adapters:
        raise ValueError(
            "the transformer has no LoRA adapter to export: train.lora is off, so the full weights are in the "
            "checkpoint; use sampler.pipeline.save_pretrained(directory) for a full diffusers folder instead"
        )
    if adapter_name not in adapters:
        raise ValueError(f"the transformer has no LoRA adapter {adapter_name!r}; it has {sorted(adapters)}")
    return adapters[adapter_name]


def _unit_scale_metadata(config: Any) -> dict[str, Any]:
    """The adapter config as diffusers stores it, with ``lora_alpha = r`` (scale 1: the scale is in B)."""
    metadata = config.to_dict()
    metadata.update(
        lora_alpha=metadata["r"],
        alpha_pattern=dict(metadata.get("rank_pattern") or {}),
        use_rslora=False,
    )
    return {key: value for key, value in metadata.items() if _json_like(value)}


def _json_like(value: Any) -> bool:
    return value is None or isinstance(value, (str, int, float, bool, list, tuple, dict, set))


def _replace_directory(staging: Path, directory: Path) -> None:
    """Move ``staging`` to ``directory``, replacing an existing folder (the old one is removed after the swap)."""
    if not directory.exists():
        staging.rename(directory)
        return
    retired = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", suffix=".old", dir=directory.parent))
    retired.rmdir()
    directory.rename(retired)
    try:
        staging.rename(directory)
    except OSError:
        retired.rename(directory)
        raise
    shutil.rmtree(retired, ignore_errors=True)


def export_checkpoint(checkpoint: str | Path, export_format: str, out: str | Path) -> Path:
    """Export a checkpoint (or a run folder's latest) as ``lora`` (diffusers' LoRA folder), ``merged`` (a full
    diffusers model folder with the LoRA fused into the base weights) or ``kohya`` (one ``.safetensors`` file in
    the kohya-ss layout that ComfyUI / A1111 read; SD 1.x / 2.x and SDXL). Returns the path written."""
    from gen_rl.evaluation import checkpoint_config
    from gen_rl.policy import load_sampler

    config, lora = checkpoint_config(checkpoint)
    out = Path(out)
    if export_format == "lora":
        staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=_parent(out)))
        shutil.copytree(lora, staging, dirs_exist_ok=True)
        _replace_directory(staging, out)
        return out
    if export_format not in ("merged", "kohya"):
        raise ValueError(f"unknown export format {export_format!r}; use lora, merged or kohya")
    sampler = load_sampler(config.model, torch.device("cpu"))
    sampler.pipeline.load_lora_weights(lora, adapter_name="default")
    if export_format == "kohya":
        from gen_rl.export_kohya import save_kohya_lora

        return save_kohya_lora(sampler, out)
    merge_lora(sampler, "default")
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=_parent(out)))
    sampler.pipeline.save_pretrained(staging)
    _replace_directory(staging, out)
    return out


def _parent(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    return path.parent
