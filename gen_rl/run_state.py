"""Save and restore a generation run: accelerate's state (trained weights, optimizer, RNG) plus the trainer's.

Only the trainable parameters are written (a LoRA run's checkpoint holds the adapter, not the frozen base):
accelerate's save/load pre-hooks swap the model's full state dict for the trainable part. The folder also
holds ``trainer_state.pt`` (step, LR schedule, EMA, per-prompt tracker), the resolved ``config.yaml`` and, for
LoRA runs, ``lora/pytorch_lora_weights.safetensors`` in diffusers' format (EMA weights when EMA is on). The
commit protocol (fsync, manifest last, rename) is :class:`gen_rl.checkpoint.CheckpointManager`'s. Nothing is
unpickled on load: tensors come from safetensors, ``trainer_state.pt`` and accelerate's optimizer / RNG files
are read with ``torch.load(weights_only=True)`` (accelerate 1.x's default, which refuses arbitrary objects).
"""

from __future__ import annotations

import pickle
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import yaml
from safetensors.torch import load_file

from gen_rl.checkpoint import ACCELERATE_DIR, CheckpointManager, RunError, write_checkpoint
from gen_rl.core.config import to_dict
from gen_rl.run_folder import (
    ConfigChangeError,
    RunFolder,
    check_resume_config,
    claim,
    describe_changes,
    record_history,
)
from rewards.base import check_reward_state

if TYPE_CHECKING:
    from accelerate import Accelerator


TRAINER_STATE = "trainer_state.pt"


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The parameters that require grad, by their state-dict name."""
    return {name: param.detach() for name, param in model.named_parameters() if param.requires_grad}


def install_hooks(accelerator: Accelerator) -> None:
    """Make accelerate save / load only the trainable parameters of the prepared models (any trainer)."""

    def save_hook(models, weights, output_dir):
        if not weights:  # FSDP: accelerate wrote the model itself (save_fsdp_model), nothing to filter
            return
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


def open_run(
    accelerator: Accelerator,
    config: Any,
    *,
    resume: bool,
    overwrite: bool,
    keep_last: int,
    tunables: tuple[str, ...],
) -> RunFolder:
    """Claim ``config.log.output_dir`` for this run and, on resume, pick and check the checkpoint (any trainer).

    Runs before any model loads: the main process claims the folder, chooses the newest complete checkpoint
    (naming each newer one it skips and why), refuses config changes the saved state depends on and prints and
    records the tunable ones; every process gets the same answer.
    """

    def work() -> RunFolder:
        run = claim(config.log.output_dir, resume=resume, overwrite=overwrite)
        current = to_dict(config)
        if resume:
            run.resume_from = _resume_point(run, current, keep_last, tunables)
        if run.resume_from is None:
            record_history(run.root, {"event": "start", "step": 0, "config": current})
        return run

    return _on_main_then_share(accelerator, work)


def _resume_point(
    run: RunFolder, current: dict[str, Any], keep_last: int, tunables: tuple[str, ...]
) -> Path | None:
    """The checkpoint to continue from (None: start at step 0); prints what was skipped, taken and changed, and
    records the resume with its changes in the config history."""
    manager = CheckpointManager(run.root, keep_last)
    checkpoint, skipped = manager.newest_complete(run.run_id)
    manager.clear_leftovers()  # what is left of interrupted saves is older or broken
    for line in skipped:
        print(f"[gen-rl] --resume: skipped {line}")
    if checkpoint is None:
        print(f"[gen-rl] --resume: no complete checkpoint under {manager.root}; starting at step 0")
        return None
    changes = {}
    if (checkpoint / "config.yaml").is_file():
        saved = yaml.safe_load((checkpoint / "config.yaml").read_text(encoding="utf-8"))
        changes = check_resume_config(saved, current, tunables, checkpoint)
    else:
        print(f"[gen-rl] --resume: {checkpoint} has no config.yaml; the config was not compared")
    step = CheckpointManager.step_of(checkpoint)
    print(f"[gen-rl] --resume: continuing from {checkpoint} (step {step})")
    if changes:
        print(f"[gen-rl] --resume: applying changed settings: {describe_changes(changes)}")
    changed = {key: {"from": old, "to": new} for key, (old, new) in changes.items()}
    record_history(
        run.root, {"event": "resume", "step": step, "checkpoint": checkpoint.name, "changes": changed}
    )
    return checkpoint


def _on_main_then_share(accelerator: Accelerator, work: Callable[[], RunFolder]) -> RunFolder:
    """Run ``work`` on the main process; every process returns its result or raises its RunError."""
    result: RunFolder | RunError | None = None
    if accelerator.is_main_process:
        try:
            result = work()
        except RunError as error:
            result = error
    if accelerator.num_processes > 1:
        from accelerate.utils import broadcast_object_list

        result = broadcast_object_list([result])[0]
    if isinstance(result, RunError):
        raise result
    return result


def apply_optimizer_settings(
    optimizer: torch.optim.Optimizer, scheduler: torch.optim.lr_scheduler.LambdaLR, lr: float, **settings: Any
) -> None:
    """Make the config's learning rate (and other group settings) the ones used after a resume.

    Restoring the optimizer and scheduler state brings back the saved base learning rate; here the base becomes
    ``lr`` and each group's current rate ``lr * factor(updates so far)``, exactly what the schedule's next step
    would compute, so an unchanged ``lr`` gives back the saved rate bit for bit.
    """
    scheduler.base_lrs = [lr] * len(optimizer.param_groups)
    for group, factor in zip(optimizer.param_groups, scheduler.lr_lambdas, strict=True):
        group.update(settings)
        group["initial_lr"] = lr
        group["lr"] = lr * factor(scheduler.last_epoch)
    scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]


def save(trainer: Any, step: int) -> Path | None:
    """Write checkpoint ``step`` and commit it (every process takes part; the main process commits).

    A failed write (a full disk) removes the staged folder and raises CheckpointWriteError with one line; the
    previous checkpoint is untouched.
    """
    # gathered on every process (FSDP2 shards are DTensors: gathering is a collective), written by the main one
    parts = {name: _whole(part.state_dict()) for name, part in trainer.stateful().items()}
    lora = _lora_to_export(trainer) if trainer.config.model.lora else None
    return write_checkpoint(
        trainer.accelerator,
        trainer.checkpoints,
        step,
        trainer.run.run_id,
        lambda staging: _write_trainer_files(trainer, staging, step, parts, lora),
    )


def _whole(tree: Any) -> Any:
    """``tree`` (nested dicts / lists / tuples) with every DTensor gathered whole (every process must call)."""
    from torch.distributed.tensor import DTensor

    if isinstance(tree, DTensor):
        return tree.full_tensor()
    if isinstance(tree, dict):
        return {key: _whole(value) for key, value in tree.items()}
    if isinstance(tree, (list, tuple)):
        return type(tree)(_whole(value) for value in tree)
    return tree


def _write_trainer_files(trainer: Any, staging: Path, step: int, parts: dict, lora: dict | None) -> None:
    """The step, every stateful part's ``state_dict`` (``trainer.stateful()``), the config and the LoRA."""
    state = {"step": step, "parts": parts}
    torch.save(state, staging / TRAINER_STATE)
    (staging / "config.yaml").write_text(yaml.safe_dump(to_dict(trainer.config), sort_keys=False))
    if lora is not None:
        from gen_rl.export import save_lora

        save_lora(trainer.sampler, staging / "lora", state_dict=lora)


def _lora_to_export(trainer: Any) -> dict:
    """The LoRA tensors to export (the EMA's when there is one), whole on every process."""
    from gen_rl.export import lora_state_dict

    with trainer.policy.swapped(trainer.ema.shadow) if trainer.ema is not None else nullcontext():
        return lora_state_dict(trainer.sampler.denoiser)


def load(trainer: Any) -> int:
    """Restore the checkpoint :func:`open_run` chose; returns the step to continue from (0: none, fresh metrics).

    The config's learning rate and AdamW settings replace the saved ones (a changed ``train.lr`` is used).
    """
    checkpoint, main = trainer.run.resume_from, trainer.accelerator.is_main_process
    if checkpoint is None:
        if main:
            trainer.metrics.rewrite([])  # nothing to continue: the old rows would repeat their steps
        return 0
    with refusing_code(checkpoint):
        trainer.accelerator.load_state(str(checkpoint / ACCELERATE_DIR))
        state = torch.load(checkpoint / TRAINER_STATE, map_location="cpu", weights_only=True)
    load_parts(trainer.stateful(), state.get("parts", {}), checkpoint)
    train = trainer.config.train
    apply_optimizer_settings(
        trainer.optimizer,
        trainer.lr_scheduler,
        train.lr,
        **_adamw_settings(trainer.optimizer, train),
    )
    step = int(state["step"])
    if step > train.num_steps:
        raise ConfigChangeError(
            f"--resume from {checkpoint}: train.num_steps={train.num_steps} is below the {step} steps already "
            f"trained; pass train.num_steps={step} or more"
        )
    if main:
        trainer.metrics.truncate_after(step - 1)
    return step


def load_parts(parts: dict[str, Any], saved: dict[str, Any], checkpoint: Path) -> None:
    """Restore each stateful part from the checkpoint; a part the run has but the checkpoint lacks is an error."""
    missing = sorted(set(parts) - set(saved))
    if missing:
        raise ConfigChangeError(
            f"--resume from {checkpoint}: the checkpoint holds no state for {missing} (the run now has them: "
            "a changed algorithm, EMA, tracker or learning reward); resume with the settings it was saved with"
        )
    for name, part in parts.items():
        if name.startswith(
            "reward/"
        ):  # a learning reward's state: refuse NaN / inf with the key that holds it
            check_reward_state(saved[name], f"{name} in {checkpoint}")
        part.load_state_dict(saved[name])


@contextmanager
def refusing_code(checkpoint: Path) -> Iterator[None]:
    """Turn weights_only's refusal to unpickle an object (code could run) into one RunError line."""
    try:
        yield
    except pickle.UnpicklingError as error:
        raise RunError(
            f"{checkpoint} holds a file with pickled objects beyond tensors and plain data, which could run code "
            "when loaded; refused. Resume only from checkpoints this code wrote."
        ) from error


def _adamw_settings(optimizer: torch.optim.Optimizer, train: Any) -> dict[str, Any]:
    """The config's group settings the optimizer has (AdamW: weight decay, betas, eps)."""
    wanted = {"weight_decay": train.weight_decay, "betas": tuple(train.adam_betas), "eps": train.adam_eps}
    return {key: value for key, value in wanted.items() if key in optimizer.param_groups[0]}
