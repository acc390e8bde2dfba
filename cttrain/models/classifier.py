"""The volume classifier: a 2D backbone over every slice, slice pooling, and a linear head.

forward(x) = forward_head(forward_features(x)); the split (as in timm) lets the pooling or head change
without touching the backbone, and lets callers look at per-slice features and attention weights.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from cttrain.models.backbones import StagedBackbone


class InputNorm(nn.Module):
    """(x - mean) / std per channel for [0, 1] inputs, so data loaders stay model-agnostic."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean.to(x.dtype)) / self.std.to(x.dtype)


def prior_bias(prior: float | Sequence[float]) -> torch.Tensor:
    """Logit of the prior positive rate, the final-layer bias init of RetinaNet (Lin et al., "Focal Loss
    for Dense Object Detection", ICCV 2017, sec. 4.1): every label starts at a low probability, so the
    many easy negatives do not swamp the first steps of focal-loss training."""
    p = torch.as_tensor(prior, dtype=torch.float32)
    if not bool(((p > 0) & (p < 1)).all()):
        raise ValueError(f"prior probabilities must lie in (0, 1), got {prior}")
    return torch.log(p / (1 - p))


HEAD_NORMS: dict[str, type[nn.Module]] = {"batch": nn.BatchNorm1d, "layer": nn.LayerNorm, "none": nn.Identity}


class ClassifierHead(nn.Module):
    """Norm -> Dropout (rate set by the dropout schedule) -> Linear with prior-initialised bias.

    The norm is BatchNorm1d (`batch`), LayerNorm (`layer`) or none. A head sees one vector per
    volume, so its BatchNorm normalises over a handful of volumes (4 per CPU batch): statistics
    that noisy make training and evaluation disagree (measured: validation loss 10-20x the
    training loss once features of different scales are concatenated); LayerNorm normalises
    each volume's vector on its own and has no train/eval difference."""

    def __init__(self, in_features: int, num_labels: int, dropout: float = 0.0,
                 prior: float | Sequence[float] = 0.1, norm: str = "batch") -> None:
        super().__init__()
        if norm not in HEAD_NORMS:
            raise ValueError(f"unknown head norm '{norm}'; choose one of {', '.join(HEAD_NORMS)}")
        self.norm = HEAD_NORMS[norm](in_features) if norm != "none" else nn.Identity()
        self.drop = nn.Dropout(dropout)
        self.fc = nn.Linear(in_features, num_labels)
        with torch.no_grad():
            self.fc.bias.copy_(prior_bias(prior).expand(num_labels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.drop(self.norm(x)))


class VolumeClassifier(nn.Module):
    """Multi-label classifier for a stack of K slices: (B, K, C, H, W) in [0, 1] -> logits (B, L).

    Slices are folded into the batch for the 2D backbone, then pooled back to one vector per volume.
    """

    def __init__(self, backbone: StagedBackbone, pool: nn.Module, head: ClassifierHead,
                 mean: Sequence[float], std: Sequence[float], histogram: nn.Module | None = None) -> None:
        super().__init__()
        self.input_norm = InputNorm(mean, std)
        self.backbone = backbone
        self.histogram = histogram  # per-slice intensity histograms beside the CNN features (or None)
        self.pool = pool
        self.head = head
        # set by use_channels_last(): inputs are then converted to match the weights' memory format
        self.channels_last = False

    @property
    def num_features(self) -> int:
        return self.backbone.num_features + (self.histogram.num_features if self.histogram is not None else 0)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, K, C, H, W) -> per-slice features (B, K, F); a 3D backbone gives (B, K', F), K' the
        depth after its strides."""
        if x.ndim != 5:
            raise ValueError(f"expected input (B, K, C, H, W), got shape {tuple(x.shape)}")
        b, k, c, h, w = x.shape
        if c != self.backbone.in_channels:
            raise ValueError(f"model expects {self.backbone.in_channels} channels, input has {c}")
        flat = x.reshape(b * k, c, h, w)
        x = self.input_norm(flat)
        if getattr(self.backbone, "is_3d", False):  # the whole stack at once: (B, C, K, H, W)
            x = x.reshape(b, k, c, h, w).transpose(1, 2)
            if self.channels_last:
                x = x.contiguous(memory_format=torch.channels_last_3d)
            feats = self.backbone(x)
        else:
            if self.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            feats = self.backbone(x).reshape(b, k, -1)
        if self.histogram is None:
            return feats
        hist = self.histogram(flat).reshape(b, k, -1)
        if hist.shape[1] != feats.shape[1]:  # a 3D backbone's depth stride: average the slices it merged
            hist = nn.functional.adaptive_avg_pool1d(hist.transpose(1, 2), feats.shape[1]).transpose(1, 2)
        return torch.cat([feats, hist.to(feats.dtype)], dim=2)

    def forward_head(self, feats: torch.Tensor, return_attention: bool = False
                     ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Per-slice features (B, K, F) -> logits (B, L), plus the (B, K) slice weights if asked."""
        pooled, weights = self.pool(feats)
        logits = self.head(pooled)
        return (logits, weights) if return_attention else logits

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def set_dropout(self, p: float) -> None:
        """Head dropout rate, changed per epoch by the dropout schedule (`dropout_at`)."""
        if not 0.0 <= p < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {p}")
        self.head.drop.p = float(p)

    def use_channels_last(self, enabled: bool = True) -> VolumeClassifier:
        """Move weights (and, in forward, inputs) to channels_last, the fast layout for CUDA convolutions."""
        self.channels_last = enabled
        layout = torch.channels_last_3d if getattr(self.backbone, "is_3d", False) else torch.channels_last
        return self.to(memory_format=layout if enabled else torch.contiguous_format)


def logit_prior(pos_freq: Sequence[float] | None, default: float = 0.1,
                eps: float = 0.01) -> float | list[float]:
    """Per-label prior for the head bias from training-label frequencies (clipped away from 0 and 1)."""
    if pos_freq is None:
        return default
    return [min(max(float(f), eps), 1 - eps) for f in pos_freq]


__all__ = ["ClassifierHead", "InputNorm", "VolumeClassifier", "logit_prior", "prior_bias"]
