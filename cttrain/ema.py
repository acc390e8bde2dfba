"""Exponential moving average of model weights.

Averaging the iterates of SGD: Polyak & Juditsky, "Acceleration of Stochastic Approximation by
Averaging", SIAM J. Control Optim. 1992. The exponential form with a short warm-up of the decay,
d_t = min(decay, (1 + t) / (10 + t)), follows TensorFlow's ExponentialMovingAverage `num_updates`
(so early averages are not dominated by the random initial weights).

Buffers (BatchNorm running statistics) are copied, not averaged: they are already running means.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn


class ModelEMA:
    """A frozen copy of a model whose floating-point parameters track an EMA of the live model."""

    def __init__(self, model: nn.Module, decay: float) -> None:
        if not 0.0 < decay < 1.0:
            raise ValueError(f"EMA decay must be in (0, 1), got {decay}")
        self.decay = decay
        self.updates = 0
        self.module = copy.deepcopy(model).eval()
        for p in self.module.parameters():
            p.requires_grad_(False)

    def current_decay(self) -> float:
        return min(self.decay, (1.0 + self.updates) / (10.0 + self.updates))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """One EMA step over all parameters in a few fused `torch._foreach_*` calls: a per-tensor
        loop launches two kernels per parameter (hundreds per optimizer step on a ResNet-50)."""
        d = self.current_decay()
        live = dict(model.named_parameters())
        shadows, sources, exact = [], [], []
        for name, shadow in self.module.named_parameters():
            src = live[name].detach()
            if shadow.dtype.is_floating_point:
                shadows.append(shadow)
                sources.append(src.to(shadow.dtype))
            else:
                exact.append((shadow, src))
        if shadows:
            torch._foreach_lerp_(shadows, sources, 1.0 - d)
        live_buffers = dict(model.named_buffers())
        exact += [(shadow, live_buffers[name]) for name, shadow in self.module.named_buffers()]
        if exact:
            torch._foreach_copy_([s for s, _ in exact], [t for _, t in exact])
        self.updates += 1

    def state_dict(self) -> dict[str, Any]:
        return {"module": self.module.state_dict(), "updates": self.updates, "decay": self.decay}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.module.load_state_dict(state["module"])
        self.updates = int(state["updates"])
