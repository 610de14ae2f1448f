"""Run by ``accelerate launch`` from test_fsdp.py: two generation training steps under DDP or FSDP2, on CPU (gloo).

``python fsdp_worker.py OUTPUT ddp|fsdp2[:nft] [OVERRIDES...]`` (``:nft``: the DiffusionNFT demo config). Each
rank writes ``rank{i}.pt``: the wrapper the model ran in, the trained weights gathered whole (FSDP2 holds each as a
DTensor shard), and the error of a checkpoint save after the steps (None when it worked).

accelerate (1.16) selects FSDP only on accelerator devices: under ``Accelerator(cpu=True)``, the trainer's choice
without CUDA, the state is ``MULTI_CPU`` and an FSDP plugin is dropped without a word (the model is wrapped in
DDP). For ``fsdp2`` this worker therefore sets accelerate's process state to FSDP2 before the trainer builds its
``Accelerator``, which joins that state. Everything after that is accelerate's own FSDP2 path: ``prepare``
(``fully_shard`` per transformer block), ``backward``, ``no_sync``, ``clip_grad_norm_`` and ``save_state``.
"""

from __future__ import annotations

import sys
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from trainer_helpers import DEMO, finish_processes, small_config  # noqa: E402

from gen_rl.trainer import GenerationTrainer  # noqa: E402


def enter_fsdp2_state(mixed_precision: str) -> None:
    """Make accelerate's shared state FSDP2 on CPU / gloo (accelerate itself does so only on GPUs)."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, PartialState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    plugin = FullyShardedDataParallelPlugin(fsdp_version=2, reshard_after_forward=True)
    state = Accelerator(cpu=True, mixed_precision=mixed_precision, fsdp_plugin=plugin).state
    if state.distributed_type != DistributedType.MULTI_CPU:
        raise RuntimeError(
            f"accelerate chose {state.distributed_type} for an FSDP plugin on CPU (it used to ignore the plugin): "
            "drop enter_fsdp2_state and launch with the plugin alone"
        )
    # every later AcceleratorState (the trainer's Accelerator) copies the type from PartialState's shared state
    PartialState._shared_state["distributed_type"] = DistributedType.FSDP
    AcceleratorState._shared_state["distributed_type"] = DistributedType.FSDP
    AcceleratorState._shared_state["fsdp_plugin"] = plugin


def whole_trained_weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The trained parameters by name (wrapper prefix removed), whole: a collective under FSDP2."""
    from torch.distributed.tensor import DTensor

    if callable(
        getattr(model, "reshard", None)
    ):  # after a forward without backward FSDP2's root stays unsharded,
        model.reshard()  # and its registered parameters are then the unsharded, grad-free copies
    weights = {}
    for name, param in model.named_parameters():
        if param.requires_grad:
            value = param.detach()
            value = value.full_tensor() if isinstance(value, DTensor) else value
            weights[name.removeprefix("module.")] = value.cpu().clone()
    return weights


def save_error(trainer: GenerationTrainer, step: int) -> str | None:
    """Checkpoint after ``step`` steps; the error's last traceback line, or None when the save worked."""
    try:
        trainer.save(step)
    except Exception:  # noqa: BLE001 - reported to the test, which asserts on it
        return traceback.format_exc().strip().splitlines()[-1]
    return None


if __name__ == "__main__":
    output, mode, overrides = Path(sys.argv[1]), sys.argv[2], sys.argv[3:]
    mode, _, recipe = mode.partition(":")  # "fsdp2:nft" runs the DiffusionNFT demo config
    base_config = DEMO.parent / "tiny_flux_nft_cpu.yaml" if recipe == "nft" else DEMO
    config = small_config(output, *overrides, base_config=base_config)
    if mode == "fsdp2":
        enter_fsdp2_state(config.train.mixed_precision)
    trainer = GenerationTrainer(config)
    for step in range(config.train.num_steps):  # train() minus its final evaluation and save
        trainer.run_step(step)
    result = {"wrapper": type(trainer.model).__name__, "weights": whole_trained_weights(trainer.model)}
    result["save_error"] = save_error(trainer, config.train.num_steps)
    torch.save(result, output / f"rank{trainer.accelerator.process_index}.pt")
    finish_processes()
