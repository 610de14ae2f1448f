"""Exponential moving average of the trained parameters (used for evaluation and the exported LoRA)."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager

import torch
from torch import Tensor, nn


class ParameterEMA:
    """``shadow <- decay * shadow + (1 - decay) * param`` after each optimizer update, kept in float32."""

    def __init__(self, parameters: Iterable[nn.Parameter], decay: float) -> None:
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"ema decay must be in [0, 1), got {decay}")
        self.parameters = list(parameters)
        self.decay = float(decay)
        self.shadow = [param.detach().float().clone() for param in self.parameters]

    @torch.no_grad()
    def update(self) -> None:
        """Blend the current parameters into the average (call after ``optimizer.step()``)."""
        for average, param in zip(self.shadow, self.parameters, strict=True):
            average.lerp_(param.detach().float(), 1.0 - self.decay)

    def swapped_in(self):
        """Temporarily load the averaged weights into the model (e.g. for evaluation or export)."""
        return swapped_parameters(self.parameters, self.shadow)

    def state_dict(self) -> dict[str, list[Tensor] | float]:
        """The averages and decay (for the run's checkpoint)."""
        return {"decay": self.decay, "shadow": [average.clone() for average in self.shadow]}

    def load_state_dict(self, state: dict) -> None:
        """Restore averages saved by :meth:`state_dict`."""
        if len(state["shadow"]) != len(self.shadow):
            raise ValueError("EMA state does not match the trained parameters (different LoRA config?)")
        self.decay = float(state["decay"])
        self.shadow = [
            _like(param, average) for param, average in zip(self.parameters, state["shadow"], strict=True)
        ]


def _like(param: Tensor, value: Tensor) -> Tensor:
    """``value`` (a whole tensor) as a float32 copy laid out like ``param`` (an FSDP2 shard: this process's part)."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    value = value.detach().float()
    if isinstance(param, DTensor) and not isinstance(value, DTensor):
        return distribute_tensor(
            value.to(param.device), param.device_mesh, param.placements, src_data_rank=None
        )
    return value.clone()


@contextmanager
def swapped_parameters(parameters: list[nn.Parameter], tensors: list[Tensor]) -> Iterator[None]:
    """Inside the block ``parameters`` hold ``tensors`` (cast to each parameter's dtype); restored after."""
    if len(tensors) != len(parameters):
        raise ValueError(f"got {len(tensors)} tensors for {len(parameters)} parameters")
    backup = [param.detach().clone() for param in parameters]
    with torch.no_grad():
        for param, value in zip(parameters, tensors, strict=True):
            param.copy_(value.to(param.dtype))
    try:
        yield
    finally:
        with torch.no_grad():
            for param, saved in zip(parameters, backup, strict=True):
                param.copy_(saved)
