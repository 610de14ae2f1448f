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

    @contextmanager
    def swapped_in(self) -> Iterator[None]:
        """Temporarily load the averaged weights into the model (e.g. for evaluation or export)."""
        backup = [param.detach().clone() for param in self.parameters]
        with torch.no_grad():
            for param, average in zip(self.parameters, self.shadow, strict=True):
                param.copy_(average.to(param.dtype))
        try:
            yield
        finally:
            with torch.no_grad():
                for param, saved in zip(self.parameters, backup, strict=True):
                    param.copy_(saved)

    def state_dict(self) -> dict[str, list[Tensor] | float]:
        """The averages and decay (for the run's checkpoint)."""
        return {"decay": self.decay, "shadow": [average.clone() for average in self.shadow]}

    def load_state_dict(self, state: dict) -> None:
        """Restore averages saved by :meth:`state_dict`."""
        if len(state["shadow"]) != len(self.shadow):
            raise ValueError("EMA state does not match the trained parameters (different LoRA config?)")
        self.decay = float(state["decay"])
        self.shadow = [average.float().clone() for average in state["shadow"]]
