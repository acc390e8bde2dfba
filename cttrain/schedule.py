"""Learning-rate schedule: linear warm-up, then cosine annealing with warm restarts (SGDR).

SGDR: Loshchilov & Hutter, "SGDR: Stochastic Gradient Descent with Warm Restarts", ICLR 2017,
https://arxiv.org/abs/1608.03983 . Within period i of length T_i = T_0 * T_mult^i epochs,

    lr(t) = min_lr + (base_lr - min_lr) * (1 + cos(pi * t_cur / T_i)) / 2

with t_cur the (fractional) epochs since the last restart. The warm-up ramps linearly from
base_lr / warmup_steps to base_lr over `warmup_epochs` (Goyal et al., "Accurate, Large Minibatch
SGD", 2017, https://arxiv.org/abs/1706.02677).

The rate is a pure function of the optimizer-step index, so the schedule is stepped once per
optimizer step and resumes exactly from a single integer.
"""

from __future__ import annotations

import math
from typing import Any

import torch


def lr_at(step: int, *, base_lr: float, steps_per_epoch: int, warmup_epochs: float, restart_epochs: float,
          restart_mult: float = 1, min_lr: float = 0.0) -> float:
    """Learning rate for optimizer step `step` (0-based)."""
    if steps_per_epoch < 1:
        raise ValueError(f"steps_per_epoch must be >= 1, got {steps_per_epoch}")
    warmup_steps = int(round(warmup_epochs * steps_per_epoch))
    if step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    t = (step - warmup_steps) / steps_per_epoch  # epochs since the warm-up ended
    period = float(restart_epochs)
    if restart_mult == 1:
        t_cur = math.fmod(t, period)
    else:
        # Restart i starts at T_0 (m^i - 1) / (m - 1): find i in closed form, not by iterating.
        i = int(math.floor(math.log(t * (restart_mult - 1) / period + 1, restart_mult)))
        start = period * (restart_mult**i - 1) / (restart_mult - 1)
        period = period * restart_mult**i
        t_cur = t - start
        if t_cur >= period:  # float round-off right at a boundary
            t_cur, period = t_cur - period, period * restart_mult
        t_cur = max(t_cur, 0.0)
    return min_lr + (base_lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * t_cur / period))


class WarmupCosineRestarts:
    """Sets every param group's lr from `lr_at(step)`; call `step()` after each optimizer step.

    Param groups keep their own `initial_lr`, so a group with a different base rate is scaled the
    same way. The state is the step counter only."""

    def __init__(self, optimizer: torch.optim.Optimizer, *, steps_per_epoch: int, warmup_epochs: float,
                 restart_epochs: float, restart_mult: float = 1, min_lr: float = 0.0) -> None:
        self.optimizer = optimizer
        self.steps_per_epoch = steps_per_epoch
        self.warmup_epochs = warmup_epochs
        self.restart_epochs = restart_epochs
        self.restart_mult = restart_mult
        self.min_lr = min_lr
        for group in optimizer.param_groups:
            group.setdefault("initial_lr", group["lr"])
        self.last_step = 0
        self._apply()

    def lr_for(self, base_lr: float, step: int) -> float:
        return lr_at(step, base_lr=base_lr, steps_per_epoch=self.steps_per_epoch,
                     warmup_epochs=self.warmup_epochs, restart_epochs=self.restart_epochs,
                     restart_mult=self.restart_mult, min_lr=min(self.min_lr, base_lr))

    def _apply(self) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = self.lr_for(group["initial_lr"], self.last_step)

    def step(self) -> None:
        self.last_step += 1
        self._apply()

    def get_last_lr(self) -> list[float]:
        return [group["lr"] for group in self.optimizer.param_groups]

    def state_dict(self) -> dict[str, Any]:
        return {"last_step": self.last_step, "steps_per_epoch": self.steps_per_epoch}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if int(state["steps_per_epoch"]) != self.steps_per_epoch:
            raise ValueError(f"schedule was saved with {state['steps_per_epoch']} steps per epoch, "
                             f"now {self.steps_per_epoch} (different data or batch size)")
        self.last_step = int(state["last_step"])
        self._apply()
