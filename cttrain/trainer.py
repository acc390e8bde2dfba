"""The optimisation state of one fold and its epoch loop: model, AdamW, schedule, AMP, EMA, DDP.

`Trainer` owns what a checkpoint must restore; `cttrain.engine.train_fold` owns files, validation
bookkeeping and resume. `train_step` is one batch's forward and backward, with AMP, accumulation
and DDP's no_sync around it; `train_epoch` only feeds it (data, augmentation, statistics).
Randomness is a pure function of (seed, epoch, step, rank): the global generators are re-seeded
at the start of every epoch and device augmentation draws from a generator seeded per step, so an
epoch replays identically after a resume.

AdamW: Loshchilov & Hutter, "Decoupled Weight Decay Regularization", ICLR 2019,
https://arxiv.org/abs/1711.05101 (no decay on biases and normalisation weights, as is usual).
Mixed precision with loss scaling: Micikevicius et al., "Mixed Precision Training", ICLR 2018.
"""

from __future__ import annotations

import contextlib
import math
import os
import random
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from cttrain import distributed
from cttrain.distributed import DistContext
from cttrain.ema import ModelEMA
from cttrain.schedule import WarmupCosineRestarts


class TrainingError(RuntimeError):
    """Training cannot go on (a diverged loss, lost validation rows); the message says what to change."""


def derive_seed(*parts: int) -> int:
    """A well-mixed 63-bit seed from integers (seed, epoch, step, rank)."""
    words = np.random.SeedSequence([int(p) & 0xFFFFFFFF for p in parts]).generate_state(2, dtype=np.uint32)
    return int((int(words[0]) << 31) ^ int(words[1]))


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def configure_determinism(deterministic: bool) -> None:
    """Deterministic kernels where they exist (a warning, not an error, where they do not).

    On: a resumed epoch replays bit for bit (cuDNN benchmark off, so the same kernels every run).
    Off (what the GPU configs choose): cuDNN benchmarks and keeps the fastest kernels, some of
    which reduce in a varying order, so a resumed run continues from the same checkpoint and data
    order but no longer reproduces the uninterrupted run's weights exactly. CPU kernels are the
    same either way."""
    if deterministic:
        # cuBLAS needs a fixed workspace to be deterministic; must be set before its first use.
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(deterministic, warn_only=True)
    torch.backends.cudnn.deterministic = deterministic
    torch.backends.cudnn.benchmark = not deterministic


def resolve_amp(mode: str, device: torch.device) -> tuple[torch.dtype | None, bool]:
    """(autocast dtype or None, use a GradScaler). Mixed precision is CUDA-only here."""
    if device.type != "cuda" or mode == "off":
        return None, False
    if mode == "auto":
        mode = "bf16" if native_bf16(device) else "fp16"
    return (torch.bfloat16, False) if mode == "bf16" else (torch.float16, True)


def native_bf16(device: torch.device) -> bool:
    """bf16 in hardware on `device` (compute capability 8.0+, or ROCm).

    `torch.cuda.is_bf16_supported()` alone also counts GPUs that only emulate bf16 (a T4, where it
    is slower than fp16) and asks the current device, which need not be the training device."""
    with torch.cuda.device(device):
        return bool(torch.cuda.is_bf16_supported(including_emulation=False))


def compile_backbone(model: nn.Module, **options: Any) -> None:
    """`torch.compile` the model's backbone in place (state-dict keys unchanged); the head stays eager.

    The dropout schedule changes the head's dropout rate each epoch of its ramp; a compiled whole
    model guards on that rate, so every new rate recompiled, and after the recompile limit (8) the
    model silently ran uncompiled. The backbone holds nearly all of the arithmetic. Under DDP the
    compiled backbone's backward is one autograd node, so its gradients are all-reduced after it
    rather than overlapped bucket by bucket (to be measured on a GPU)."""
    model.backbone.compile(**options)


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Two AdamW groups: decay for weight matrices/kernels, none for biases and norm scales."""
    decay, no_decay = [], []
    for _name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if p.ndim <= 1 else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


@dataclass
class EpochStats:
    loss: float
    lr: float
    seconds: float
    samples: int
    data_wait: float
    steps: int


StepCallback = Callable[[int, int, float, float, float], None]  # step, steps, loss, lr, samples/s


class Trainer:
    """Model + optimiser + schedule + scaler + EMA for one fold, on one device (one DDP rank)."""

    def __init__(self, cfg: Any, *, in_channels: int, num_labels: int, pos_freq: np.ndarray,
                 steps_per_epoch: int, ctx: DistContext) -> None:
        from cttrain.losses import build_loss
        from cttrain.models import build_model

        self.cfg, self.ctx, self.device = cfg, ctx, ctx.device
        tc = cfg.training
        seed_everything(tc.seed)  # identical initial weights on every rank and every run
        self.model = build_model(cfg.model, in_channels, num_labels, pos_freq=list(pos_freq)).to(self.device)
        self.channels_last = bool(cfg.model.channels_last and self.device.type == "cuda")
        if self.channels_last:
            self.model.use_channels_last(True)
        self.ema = ModelEMA(self.model, tc.ema) if tc.ema > 0 else None
        self.optimizer = torch.optim.AdamW(param_groups(self.model, tc.weight_decay), lr=tc.lr)
        self.scheduler = WarmupCosineRestarts(
            self.optimizer, steps_per_epoch=steps_per_epoch, warmup_epochs=tc.warmup_epochs,
            restart_epochs=tc.restart_epochs, restart_mult=tc.restart_mult, min_lr=tc.min_lr)
        self.amp_dtype, use_scaler = resolve_amp(tc.amp, self.device)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=use_scaler)
        self.loss_fn = build_loss(cfg.loss, np.asarray(pos_freq, dtype=np.float64)).to(self.device)
        self.device_augment, self.mix = self._augmenters(cfg.augment)
        self.ddp: nn.Module | None = None
        self.net: nn.Module = self.model
        if ctx.enabled:
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.ddp = self.net = nn.parallel.DistributedDataParallel(self.model, device_ids=ids)
        if cfg.model.compile and self.device.type == "cuda":
            compile_backbone(self.model)
        # model.floor_prior: per store row, a fixed logit added to the network's (cttrain/prior.py)
        self.offsets: torch.Tensor | None = None
        if cfg.model.floor_prior:
            with torch.no_grad():  # start exactly at the floor: the network's output begins at 0
                self.model.head.fc.weight.zero_()
                self.model.head.fc.bias.zero_()

    def set_offsets(self, offsets: np.ndarray) -> None:
        """The floor prior's logits of every store row (N, L), added to the network's output."""
        self.offsets = torch.as_tensor(np.asarray(offsets, dtype=np.float32), device=self.device)

    def _augmenters(self, acfg: Any) -> tuple[Callable | None, bool]:
        device_aug = None
        if acfg.enabled and acfg.backend == "torch":
            from cttrain.augment import DeviceAugment

            device_aug = DeviceAugment(acfg)
            if isinstance(device_aug, nn.Module):
                device_aug = device_aug.to(self.device)
        mix = acfg.enabled and (acfg.mixup_alpha > 0 or acfg.cutmix_alpha > 0)
        return device_aug, mix

    @property
    def eval_model(self) -> nn.Module:
        """The weights validated and checkpointed: the EMA copy when EMA is on."""
        return self.ema.module if self.ema is not None else self.model

    def set_epoch(self, epoch: int) -> float:
        """Re-seed the global generators for this epoch and apply the dropout schedule."""
        from cttrain.models import dropout_at

        seed_everything(derive_seed(self.cfg.training.seed, epoch, self.ctx.rank))
        p = float(dropout_at(self.cfg.model, epoch))
        self.model.set_dropout(p)
        return p

    def lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])

    # ------------------------------------------------------------------------------------- train
    def _augment(self, x: torch.Tensor, y: torch.Tensor, epoch: int, step: int
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        """Device augmentation and MixUp/CutMix. With floor-prior offsets, `y` carries them as
        extra columns (B, 2L) so a mixed volume gets the same mix of its partners' priors."""
        if self.device_augment is None and not self.mix:
            return x, y
        # augment.py draws every random parameter from a CPU generator and uploads them in one copy
        gen = torch.Generator()
        gen.manual_seed(derive_seed(self.cfg.training.seed, epoch, step, self.ctx.rank))
        if self.device_augment is not None:
            x = self.device_augment(x, gen)
        if self.mix:
            from cttrain.augment import mix_batch

            x, y = mix_batch(x, y, self.cfg.augment, gen)
        return x, y

    def _optimizer_step(self) -> None:
        if self.cfg.training.grad_clip > 0:
            self.scaler.unscale_(self.optimizer)
            nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.training.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        if self.ema is not None:
            self.ema.update(self.model)

    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.amp_dtype)

    def train_step(self, x: torch.Tensor, y: torch.Tensor, *, group: int, sync: bool,
                   offset: torch.Tensor | None = None) -> torch.Tensor:
        """Forward and backward of one augmented batch on the device; returns its (detached) loss.
        `offset` (B, L): fixed logits added to the network's (the floor prior).

        The batch is one of `group` accumulated into one optimizer step. `sync` marks the group's
        last batch: only then does DDP all-reduce the gradients (no_sync before) and the optimizer,
        schedule and EMA step."""
        no_sync = self.ddp.no_sync() if (self.ddp is not None and not sync) else contextlib.nullcontext()
        with no_sync:
            with self._autocast():
                logits = self.net(x)
            logits = logits.float() if offset is None else logits.float() + offset
            loss = self.loss_fn(logits, y)
            self.scaler.scale(loss / group).backward()
        if sync:
            self._optimizer_step()
        return loss.detach()

    def train_epoch(self, loader: Iterable, epoch: int, on_step: StepCallback | None = None) -> EpochStats:
        """One pass over `loader` with gradient accumulation; returns this rank's statistics."""
        from cttrain.data import to_device

        self.model.train()
        n, accum = len(loader), self.cfg.training.accumulate
        log_every = max(1, self.cfg.training.log_every)
        loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        samples, wait, lr = 0, 0.0, self.lr()
        start = time.perf_counter()
        it = iter(loader)
        for i in range(n):
            t = time.perf_counter()
            batch = next(it)
            wait += time.perf_counter() - t
            x, y, rows = to_device(batch, self.device, self.channels_last)
            offset = None
            if self.offsets is None:
                x, y = self._augment(x, y.float(), epoch, i)
            else:
                num_labels = y.shape[1]
                x, y = self._augment(x, torch.cat([y.float(), self.offsets[rows]], dim=1), epoch, i)
                y, offset = y[:, :num_labels], y[:, num_labels:]
            group_start = i - i % accum
            group = min(accum, n - group_start)  # the last group of an epoch may be shorter
            sync = i == group_start + group - 1
            if sync:
                lr = self.lr()  # the rate this optimizer step uses
            loss_sum += self.train_step(x, y, group=group, sync=sync, offset=offset)
            samples += int(x.shape[0])
            if on_step is not None and ((i + 1) % log_every == 0 or i + 1 == n):
                elapsed = max(time.perf_counter() - start, 1e-9)
                on_step(i + 1, n, float(loss_sum) / (i + 1), lr, samples * self.ctx.world_size / elapsed)
        distributed.broadcast_buffers(self.ctx, self.model)
        if self.ema is not None:
            distributed.broadcast_buffers(self.ctx, self.ema.module)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        mean_loss = float(loss_sum) / max(n, 1)
        self._check_finite(mean_loss, epoch)
        return EpochStats(mean_loss, lr, time.perf_counter() - start, samples, wait, n)

    def _check_finite(self, mean_loss: float, epoch: int) -> None:
        """Raise on every rank together when any rank's epoch loss is not finite.

        The loss is all-reduced first (NaN or inf anywhere makes the sum non-finite): a rank raising
        alone would leave the others waiting in their next collective until the process group's
        timeout (30 minutes)."""
        total = distributed.all_reduce_sum(self.ctx, [mean_loss])[0]
        if not math.isfinite(total):
            raise TrainingError(f"training loss became {total / self.ctx.world_size} in epoch {epoch + 1}; "
                                "lower training.lr, set training.grad_clip, or use training.amp=bf16/off")

    @torch.no_grad()
    def recalibrate_bn(self, loader: Iterable) -> int:
        """Precise BatchNorm statistics (`training.precise_bn`): replace the eval weights' running
        means/variances by their average over every batch of `loader` (the training rows, eval-style
        slices, no augmentation); returns the number of BatchNorm layers.

        Why: the running statistics are an exponential average of the last ~10 training batches of 4
        volumes, so they differ from fold to fold by more than the signal; the fold models then
        disagree in offset and pooled out-of-fold AUROC falls far below the fold-mean (measured,
        BENCHMARKS §7). Averaging over the whole training set (Wu & Johnson, "Rethinking 'Batch' in
        BatchNorm", arXiv:2105.07576, "PreciseBN") removes that noise; it uses no validation data."""
        from cttrain.data import to_device

        model = self.eval_model
        norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        if not norms:
            return 0
        momenta = [m.momentum for m in norms]
        was_training = model.training
        for m in norms:
            m.reset_running_stats()
            m.momentum = None  # cumulative average over the batches below
        model.train()
        try:
            for batch in loader:
                x, _y, _rows = to_device(batch, self.device, self.channels_last)
                with self._autocast():
                    model(x)
        finally:
            for m, momentum in zip(norms, momenta, strict=True):
                m.momentum = momentum
            model.train(was_training)
        return len(norms)

    def evaluate(self, loader: Iterable) -> tuple[np.ndarray, np.ndarray]:
        """(store rows, float32 logits) of this rank's share of `loader` with the eval weights."""
        return predict_outputs(self.eval_model, loader, self.device, self.amp_dtype,
                               channels_last=self.channels_last, probs=False, offsets=self.offsets)

    # -------------------------------------------------------------------------------- checkpoint
    def state_dict(self) -> dict[str, Any]:
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "ema": self.ema.state_dict() if self.ema is not None else None,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        if self.ema is not None and state.get("ema") is not None:
            self.ema.load_state_dict(state["ema"])
        elif self.ema is not None:  # EMA switched on at resume: start it from the current weights
            self.ema.module.load_state_dict(self.model.state_dict())


@torch.no_grad()
def predict_outputs(model: nn.Module, loader: Iterable, device: torch.device,
                    amp_dtype: torch.dtype | None = None, *, channels_last: bool = False, probs: bool = True,
                    tta_flip: bool = False, offsets: torch.Tensor | np.ndarray | None = None
                    ) -> tuple[np.ndarray, np.ndarray]:
    """(rows int64 (N,), float32 (N, L) probabilities or logits) for every batch of `loader`;
    `offsets` (store rows, L): fixed logits added to the model's (the floor prior)."""
    from cttrain.data import to_device

    was_training = model.training
    model.eval()
    rows_out, values = [], []
    if offsets is not None:
        offsets = torch.as_tensor(offsets, dtype=torch.float32, device=device)
    cast = (torch.autocast(device_type=device.type, dtype=amp_dtype) if amp_dtype is not None
            else contextlib.nullcontext())
    try:
        for batch in loader:
            x, _y, rows = to_device(batch, device, channels_last)
            shift = 0.0 if offsets is None else offsets[rows]
            with cast:
                out = model(x).float() + shift
                if probs:
                    out = torch.sigmoid(out)
                    if tta_flip:  # left-right flip of every slice
                        out = (out + torch.sigmoid(model(x.flip(-1)).float() + shift)) / 2
            rows = rows.cpu() if torch.is_tensor(rows) else rows
            rows_out.append(np.asarray(rows, dtype=np.int64).reshape(-1))
            values.append(out.float().cpu().numpy())
    finally:
        model.train(was_training)
    if not values:
        return np.zeros(0, dtype=np.int64), np.zeros((0, 0), dtype=np.float32)
    return np.concatenate(rows_out), np.concatenate(values).astype(np.float32)


def predict_probs(model: nn.Module, loader: Iterable, device: str | torch.device,
                  amp_dtype: torch.dtype | None = None, tta_flip: bool = False,
                  offsets: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(store rows, sigmoid probabilities (N, L)) of `model` over `loader` (for `cttrain predict`)."""
    return predict_outputs(model, loader, torch.device(device), amp_dtype, probs=True, tta_flip=tta_flip,
                           offsets=offsets)
