"""Multi-label losses on logits with soft targets in [0, 1] (MixUp/CutMix, label smoothing).

- Focal loss: Lin, Goyal, Girshick, He & Dollar, "Focal Loss for Dense Object Detection", ICCV 2017,
  https://arxiv.org/abs/1708.02002
- Asymmetric loss (ASL): Ridnik, Ben-Baruch, Zamir, Noy, Friedman, Protter & Zelnik-Manor,
  "Asymmetric Loss For Multi-Label Classification", ICCV 2021, https://arxiv.org/abs/2009.14119
- Binary cross-entropy, optionally with per-label positive weights from label frequencies.

Every loss is written as  -t * w_pos * m_pos * log p  -  (1 - t) * m_neg * log(1 - p),  i.e. linear in
the target t: a MixUp target lam * y1 + (1 - lam) * y2 then gives exactly lam * L(y1) + (1 - lam) * L(y2),
and t in {0, 1} recovers each paper's loss. Logs come from logsigmoid (no log(0) at extreme logits), the
computation runs in fp32 even under autocast, and the result is the mean over batch and labels.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from cttrain.config import LossConfig


def smooth_targets(targets: torch.Tensor, smoothing: float) -> torch.Tensor:
    """Binary label smoothing: t -> t (1 - s) + s / 2, pulling both classes towards 0.5."""
    return targets * (1.0 - smoothing) + 0.5 * smoothing if smoothing > 0 else targets


def pos_weight_from_freq(pos_freq: Sequence[float] | np.ndarray, clip: tuple[float, float] = (1.0, 50.0)
                         ) -> torch.Tensor:
    """Per-label BCE positive weight neg / pos = (1 - f) / f from the positive rate f in [0, 1],
    clipped so a label with almost no positives cannot dominate (and a label with none stays finite)."""
    f = np.asarray(pos_freq, dtype=np.float64)
    if f.ndim != 1 or not np.all((f >= 0) & (f <= 1)):
        raise ValueError(f"pos_freq must be a 1-D array of positive rates in [0, 1], got {pos_freq!r}")
    with np.errstate(divide="ignore"):
        ratio = np.where(f > 0, (1.0 - f) / np.maximum(f, 1e-12), np.inf)
    return torch.as_tensor(np.clip(ratio, *clip), dtype=torch.float32)


class _BinaryLoss(nn.Module):
    """Shared plumbing: fp32 outside autocast, label smoothing, optional positive weights, mean."""

    def __init__(self, label_smoothing: float = 0.0, pos_weight: torch.Tensor | None = None) -> None:
        super().__init__()
        if not 0.0 <= label_smoothing < 0.5:
            raise ValueError(f"label_smoothing must be in [0, 0.5), got {label_smoothing}")
        self.label_smoothing = label_smoothing
        self.register_buffer("pos_weight", None if pos_weight is None else torch.as_tensor(pos_weight).float())

    def terms(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(positive term, negative term): the losses for t = 1 and t = 0, elementwise."""
        raise NotImplementedError

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        if logits.shape != targets.shape:
            raise ValueError(f"logits {tuple(logits.shape)} and targets {tuple(targets.shape)} differ in shape")
        with torch.autocast(device_type=logits.device.type, enabled=False):
            x = logits.float()
            t = smooth_targets(targets.float(), self.label_smoothing)
            pos, neg = self.terms(x)
            if self.pos_weight is not None:
                pos = pos * self.pos_weight
            return (t * pos + (1.0 - t) * neg).mean()


class FocalLoss(_BinaryLoss):
    """Sigmoid focal loss (Lin et al., ICCV 2017, eq. 5):
    FL = -alpha (1 - p)^gamma log p  for positives,  -(1 - alpha) p^gamma log(1 - p)  for negatives.

    alpha < 0 disables the balance factor; gamma = 0 and alpha < 0 is plain BCE. The paper normalises by
    the number of positive anchors; for a fixed 18-label head the mean over entries is the stable choice.
    """

    def __init__(self, alpha: float = 0.25, gamma: float = 2.0, label_smoothing: float = 0.0,
                 pos_weight: torch.Tensor | None = None) -> None:
        super().__init__(label_smoothing, pos_weight)
        if gamma < 0 or alpha > 1:
            raise ValueError(f"focal loss needs gamma >= 0 and alpha <= 1, got gamma={gamma}, alpha={alpha}")
        self.alpha, self.gamma = alpha, gamma

    def terms(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        log_p, log_q = F.logsigmoid(x), F.logsigmoid(-x)  # log p, log (1 - p)
        # (1 - p)^gamma = exp(gamma log(1 - p)): exact at gamma = 0 and smooth in the logit
        pos = -torch.exp(self.gamma * log_q) * log_p
        neg = -torch.exp(self.gamma * log_p) * log_q
        if self.alpha >= 0:
            pos, neg = self.alpha * pos, (1.0 - self.alpha) * neg
        return pos, neg


class AsymmetricLoss(_BinaryLoss):
    """Asymmetric loss (Ridnik et al., ICCV 2021, eqs. 4-7):
    L+ = -(1 - p)^gamma_pos log p,   L- = -p_m^gamma_neg log(1 - p_m),  p_m = max(p - clip, 0).

    The probability margin `clip` discards very easy negatives entirely (p < clip) and down-weights the
    rest; a large gamma_neg keeps the many negatives of multi-label data from drowning the positives.
    With both gammas 0 and clip 0 it is plain BCE.
    """

    def __init__(self, gamma_neg: float = 4.0, gamma_pos: float = 0.0, clip: float = 0.05,
                 label_smoothing: float = 0.0, pos_weight: torch.Tensor | None = None) -> None:
        super().__init__(label_smoothing, pos_weight)
        if gamma_neg < 0 or gamma_pos < 0 or not 0.0 <= clip < 1.0:
            raise ValueError(f"ASL needs gammas >= 0 and clip in [0, 1), got {gamma_neg}, {gamma_pos}, {clip}")
        self.gamma_neg, self.gamma_pos, self.clip = gamma_neg, gamma_pos, clip

    def terms(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        log_p = F.logsigmoid(x)
        pos = -torch.exp(self.gamma_pos * F.logsigmoid(-x)) * log_p
        if self.clip > 0:
            p_m = (torch.sigmoid(x) - self.clip).clamp(min=0.0)
            # 1 - p_m >= clip, so this log is bounded; the clamp only guards p_m = 0 in the power below
            log_q = torch.log1p(-p_m)
            log_pm = torch.log(p_m.clamp(min=1e-30))
        else:
            log_q, log_pm = F.logsigmoid(-x), log_p
        neg = -torch.exp(self.gamma_neg * log_pm) * log_q
        return pos, neg


class BCELoss(_BinaryLoss):
    """Binary cross-entropy on logits; with `pos_weight` each label's positive term is weighted."""

    def terms(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return -F.logsigmoid(x), -F.logsigmoid(-x)


LOSSES: dict[str, Callable[[LossConfig, torch.Tensor | None], nn.Module]] = {
    "focal": lambda c, w: FocalLoss(c.focal_alpha, c.focal_gamma, c.label_smoothing, w),
    "asl": lambda c, w: AsymmetricLoss(c.asl_gamma_neg, c.asl_gamma_pos, c.asl_clip, c.label_smoothing, w),
    "bce": lambda c, w: BCELoss(c.label_smoothing, w),
}


def build_loss(cfg: LossConfig, pos_freq: np.ndarray | Sequence[float] | None = None) -> nn.Module:
    """Loss module `cfg.name` (focal | asl | bce): module(logits, targets in [0, 1]) -> scalar.

    With `cfg.class_weights`, `pos_freq` (training positive rate per label) gives per-label positive
    weights neg/pos clipped to [1, 50]; they apply to whichever loss is chosen.
    """
    pos_weight = None
    if cfg.class_weights:
        if pos_freq is None:
            raise ValueError("loss.class_weights needs the training labels' positive rates (pos_freq)")
        pos_weight = pos_weight_from_freq(pos_freq)
    if cfg.name not in LOSSES:
        raise ValueError(f"unknown loss '{cfg.name}'; choose one of {', '.join(LOSSES)}")
    return LOSSES[cfg.name](cfg, pos_weight)

