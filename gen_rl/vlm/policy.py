"""The VLM policy: loading through the Auto classes, LoRA, frozen vision tower, checkpointing, KL reference.

``load_policy`` is the only loading path: hub ids and folders saved with ``save_pretrained`` (the tiny test
model included) go through ``AutoModelForImageTextToText`` and ``AutoProcessor``.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator, Sequence

from torch import nn
from transformers import AutoModelForImageTextToText, GenerationConfig

from gen_rl.core.dtypes import DTYPES, resolve_dtype
from gen_rl.vlm.compat import load_processor

__all__ = [
    "DTYPES",
    "VISION_MODULE_NAMES",
    "load_policy",
    "freeze_vision_tower",
    "apply_lora",
    "enable_gradient_checkpointing",
    "eos_token_ids",
    "ReferencePolicy",
]

# submodules holding the vision encoder and its projector in transformers VLMs (Qwen2/2.5-VL: ``visual``)
VISION_MODULE_NAMES = ("visual", "vision_tower", "vision_model", "vision_encoder", "multi_modal_projector")


def load_policy(
    name_or_path: str,
    dtype: str = "float32",
    attn_implementation: str = "sdpa",
    min_pixels: int = 0,
    max_pixels: int = 0,
):
    """``(model, processor)`` from a hub id or folder through ``AutoModelForImageTextToText`` / ``AutoProcessor``.

    The model's generation config is reduced to its special-token ids, so the trainer's sampling settings are
    the only ones in force; the tokenizer pads on the left.
    """
    model = AutoModelForImageTextToText.from_pretrained(
        name_or_path, dtype=resolve_dtype(dtype), attn_implementation=attn_implementation
    )
    image_kwargs = {}
    if min_pixels:
        image_kwargs["min_pixels"] = min_pixels
    if max_pixels:
        image_kwargs["max_pixels"] = max_pixels
    processor = load_processor(name_or_path, image_kwargs)
    processor.tokenizer.padding_side = "left"
    loaded = model.generation_config
    model.generation_config = GenerationConfig(
        bos_token_id=loaded.bos_token_id, eos_token_id=loaded.eos_token_id, pad_token_id=loaded.pad_token_id
    )
    return model, processor


def eos_token_ids(model, processor) -> list[int]:
    """Every id that ends a completion: the generation config's EOS id(s) and the tokenizer's."""
    ids = set()
    configured = model.generation_config.eos_token_id
    if isinstance(configured, int):
        ids.add(configured)
    elif configured is not None:
        ids.update(int(value) for value in configured)
    if processor.tokenizer.eos_token_id is not None:
        ids.add(int(processor.tokenizer.eos_token_id))
    return sorted(ids)


def vision_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``(name, module)`` of the vision encoder / projector submodules (outermost matches only)."""
    found = []
    for name, module in model.named_modules():
        if name.split(".")[-1] in VISION_MODULE_NAMES and not any(
            name.startswith(f"{kept}.") for kept, _ in found
        ):
            found.append((name, module))
    return found


def freeze_vision_tower(model: nn.Module) -> int:
    """Stop gradients into the vision encoder and its projector; returns the number of frozen parameters."""
    modules = vision_modules(model)
    if not modules:
        raise ValueError(
            f"no vision tower found (looked for submodules named {', '.join(VISION_MODULE_NAMES)}); "
            "set model.freeze_vision_tower=false for this architecture"
        )
    frozen = 0
    for _, module in modules:
        for parameter in module.parameters():
            parameter.requires_grad_(False)
            frozen += parameter.numel()
    return frozen


def lora_target_pattern(target_modules: Sequence[str]) -> str:
    """peft ``target_modules`` regex: the listed linear layers inside the language model only."""
    names = "|".join(sorted(set(target_modules)))
    return rf".*language_model.*\.({names})$"


def apply_lora(
    model: nn.Module, r: int, alpha: int, dropout: float, target_modules: Sequence[str]
) -> nn.Module:
    """Wrap ``model`` with peft LoRA adapters on the language model's ``target_modules`` (base weights frozen)."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=r,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=lora_target_pattern(target_modules),
        bias="none",
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, config)


def enable_gradient_checkpointing(model: nn.Module) -> None:
    """Non-reentrant activation checkpointing (works with frozen embeddings and LoRA); disables the KV cache
    for training forwards (generation passes its own ``use_cache``)."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x name
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    model.config.use_cache = False


class ReferencePolicy:
    """The KL reference: the policy with its LoRA adapters disabled, or a frozen copy of the initial weights.

    Use ``with reference.active() as ref_model: ...`` to get the model that computes reference log-probs.
    """

    def __init__(
        self, mode: str, policy: nn.Module | None = None, frozen_copy: nn.Module | None = None
    ) -> None:
        if mode not in ("disable_adapter", "frozen_copy"):
            raise ValueError(f"unknown reference mode {mode!r}; valid: disable_adapter, frozen_copy")
        self.mode = mode
        self.policy = policy
        self.frozen_copy = frozen_copy

    @classmethod
    def copy_of(cls, model: nn.Module) -> ReferencePolicy:
        """A frozen deep copy of ``model`` as it is now (call before training)."""
        reference = copy.deepcopy(model).eval()
        for parameter in reference.parameters():
            parameter.requires_grad_(False)
        return cls("frozen_copy", frozen_copy=reference)

    @classmethod
    def adapter_disabled(cls, peft_model: nn.Module) -> ReferencePolicy:
        """The peft ``peft_model`` with its adapters switched off while active."""
        if not hasattr(peft_model, "disable_adapter"):
            raise ValueError("reference mode disable_adapter needs a peft model (model.lora.enabled=true)")
        return cls("disable_adapter", policy=peft_model)

    @contextlib.contextmanager
    def active(self, policy: nn.Module | None = None) -> Iterator[nn.Module]:
        """The reference model for the duration of the block; ``policy`` is the (possibly wrapped) policy to
        run with adapters disabled (defaults to the one given at construction)."""
        if self.mode == "frozen_copy":
            yield self.frozen_copy
            return
        peft_model = self.policy
        runner = policy if policy is not None else peft_model
        with peft_model.disable_adapter():
            yield runner
