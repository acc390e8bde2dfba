"""Aggregation of per-slice features into one volume descriptor.

A CT volume is a bag of slices with one set of labels (multiple-instance learning). Gated attention
pooling learns which slices matter: Ilse, Tomczak & Welling, "Attention-based Deep Multiple Instance
Learning", ICML 2018, https://arxiv.org/abs/1802.04712 . Mean and max pooling are the MIL baselines
from the same paper.

Every pooling module maps features (B, K, F) to `(pooled (B, F), weights (B, K))`; the weights sum to 1
over the K slices, so callers can show which slices drove a prediction whatever the pooling.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn


class GatedAttentionPool(nn.Module):
    """Gated attention-MIL pooling (Ilse et al., ICML 2018, eq. 9):
    a_k = softmax_k( w^T (tanh(V h_k) * sigmoid(U h_k)) ),  z = sum_k a_k h_k.

    The sigmoid gate lets the score be non-linear in h without tanh's near-linearity around zero.
    The pooled output is invariant to the order of the slices.
    """

    def __init__(self, in_features: int, hidden: int = 128) -> None:
        super().__init__()
        self.v = nn.Linear(in_features, hidden)
        self.u = nn.Linear(in_features, hidden)
        self.w = nn.Linear(hidden, 1)

    def forward(self, feats: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        scores = self.w(torch.tanh(self.v(feats)) * torch.sigmoid(self.u(feats))).squeeze(-1)
        # softmax in fp32: bf16 over many slices loses the small weights
        weights = torch.softmax(scores.float(), dim=1).to(feats.dtype)
        return torch.einsum("bk,bkf->bf", weights, feats), weights


class MeanPool(nn.Module):
    """Mean over slices (MIL baseline); every slice gets weight 1/K."""

    def forward(self, feats: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        b, k, _ = feats.shape
        return feats.mean(dim=1), feats.new_full((b, k), 1.0 / k)


class MaxPool(nn.Module):
    """Feature-wise max over slices (MIL baseline). A slice's weight is the fraction of features for
    which it holds the maximum, so the weights still sum to 1 and point at the decisive slices."""

    def forward(self, feats: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        pooled, idx = feats.max(dim=1)
        counts = torch.zeros(feats.shape[:2], device=feats.device, dtype=torch.float32)
        counts.scatter_add_(1, idx, torch.ones_like(idx, dtype=torch.float32))
        return pooled, (counts / feats.shape[2]).to(feats.dtype)


class MeanMaxPool(nn.Module):
    """[mean, max] over slices, concatenated (twice the width): how much of a finding the volume holds
    and how strongly its most affected slice shows it. Weights: the mean of the two poolings'."""

    out_mult = 2

    def __init__(self) -> None:
        super().__init__()
        self.mean, self.max = MeanPool(), MaxPool()

    def forward(self, feats: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        (avg, w_avg), (mx, w_max) = self.mean(feats), self.max(feats)
        return torch.cat([avg, mx], dim=1), 0.5 * (w_avg + w_max)


POOLING: dict[str, Callable[[int, int], nn.Module]] = {
    "attention": lambda in_features, hidden: GatedAttentionPool(in_features, hidden),
    "mean": lambda in_features, hidden: MeanPool(),
    "max": lambda in_features, hidden: MaxPool(),
    "meanmax": lambda in_features, hidden: MeanMaxPool(),
}


def pooled_width(pool: nn.Module, in_features: int) -> int:
    """Width of a slice pooling's output for `in_features`-dim slice features."""
    return in_features * int(getattr(pool, "out_mult", 1))


def build_pooling(name: str, in_features: int, hidden: int = 128) -> nn.Module:
    """Slice pooling `name` (attention | mean | max | meanmax) over `in_features`-dim slice features."""
    if name not in POOLING:
        raise ValueError(f"unknown pooling '{name}'; choose one of {', '.join(POOLING)}")
    return POOLING[name](in_features, hidden)
