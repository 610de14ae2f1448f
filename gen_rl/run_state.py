"""Save and restore a generation run: accelerate's state (trained weights, optimizer, RNG) plus the trainer's.

Only the trainable parameters are written (a LoRA run's checkpoint holds the adapter, not the frozen base):
accelerate's save/load pre-hooks swap the model's full state dict for the trainable part. The folder also
holds ``trainer_state.pt`` (step, LR schedule, EMA, per-prompt tracker), the resolved ``config.yaml`` and, for
LoRA runs, ``lora/pytorch_lora_weights.safetensors`` in diffusers' format (EMA weights when EMA is on).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch
import yaml
from safetensors.torch import load_file

from gen_rl.config import to_dict

if TYPE_CHECKING:
    from accelerate import Accelerator

    from gen_rl.trainer import GenerationTrainer

TRAINER_STATE = "trainer_state.pt"
ACCELERATE_DIR = "accelerate"


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The parameters that require grad, by their state-dict name."""
    return {name: param.detach() for name, param in model.named_parameters() if param.requires_grad}


def install_hooks(accelerator: Accelerator) -> None:
    """Make accelerate save / load only the trainable parameters of the prepared models (any trainer)."""

    def save_hook(models, weights, output_dir):
        for index, model in enumerate(models):
            weights[index] = trainable_state(accelerator.unwrap_model(model))

    def load_hook(models, input_dir):
        for index, model in enumerate(list(models)):
            _load_trainable(accelerator.unwrap_model(model), Path(input_dir), index)
        models.clear()

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)


def _load_trainable(model: torch.nn.Module, input_dir: Path, index: int) -> None:
    path = input_dir / ("model.safetensors" if index == 0 else f"model_{index}.safetensors")
    saved = load_file(str(path))
    expected = trainable_state(model)
    if set(saved) != set(expected):
        missing, extra = sorted(set(expected) - set(saved)), sorted(set(saved) - set(expected))
        raise ValueError(
            f"checkpoint {input_dir} does not match the trained parameters (missing {missing[:3]}, unexpected "
            f"{extra[:3]}); resume with the model / LoRA settings (lora, rank, target modules, frozen parts) it was "
            "saved with."
        )
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name in saved:
                param.copy_(saved[name].to(param.device, param.dtype))


def save(trainer: GenerationTrainer, step: int) -> Path | None:
    """Write checkpoint ``step`` atomically (every process takes part; the main process commits)."""
    accelerator, manager = trainer.accelerator, trainer.checkpoints
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        manager.staging_dir(step)
    accelerator.wait_for_everyone()
    staging = manager.root / f".tmp-checkpoint-{step:06d}"
    accelerator.save_state(str(staging / ACCELERATE_DIR))
    if accelerator.is_main_process:
        state = {
            "step": step,
            "lr_scheduler": trainer.lr_scheduler.state_dict(),
            "ema": trainer.ema.state_dict() if trainer.ema is not None else None,
            "stat_tracker": trainer.stat_tracker.state_dict() if trainer.stat_tracker is not None else None,
        }
        torch.save(state, staging / TRAINER_STATE)
        (staging / "config.yaml").write_text(yaml.safe_dump(to_dict(trainer.config), sort_keys=False))
        if trainer.config.model.lora:
            _export_lora(trainer, staging / "lora")
    accelerator.wait_for_everyone()
    final = manager.commit(step) if accelerator.is_main_process else None
    accelerator.wait_for_everyone()
    return final


def _export_lora(trainer: GenerationTrainer, directory: Path) -> None:
    from gen_rl.export import save_lora

    if trainer.ema is not None:
        with trainer.ema.swapped_in():
            save_lora(trainer.sampler, directory)
    else:
        save_lora(trainer.sampler, directory)


def load(trainer: GenerationTrainer) -> int:
    """Restore the latest checkpoint; returns the step to continue from (0 if there is none)."""
    latest = trainer.checkpoints.latest()
    if latest is None:
        if trainer.accelerator.is_main_process:
            print(f"[gen-rl] --resume: no checkpoint under {trainer.checkpoints.root}; starting from step 0")
        return 0
    trainer.accelerator.load_state(str(latest / ACCELERATE_DIR))
    state = torch.load(latest / TRAINER_STATE, map_location="cpu", weights_only=False)
    trainer.lr_scheduler.load_state_dict(state["lr_scheduler"])
    if trainer.ema is not None and state["ema"] is not None:
        trainer.ema.load_state_dict(state["ema"])
    if trainer.stat_tracker is not None and state["stat_tracker"] is not None:
        trainer.stat_tracker.load_state_dict(state["stat_tracker"])
    step = int(state["step"])
    if trainer.accelerator.is_main_process:
        trainer.metrics.truncate_after(step - 1)
    return step
