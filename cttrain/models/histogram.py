"""Intensity histograms of each slice as features beside the CNN's (`model.histogram_bins`).

Many chest findings are first of all a change in how much tissue of a given density a volume holds:
emphysema adds voxels near -1000 HU, ground glass and mosaic attenuation move lung voxels by a
few hundred or tens of HU, effusions and consolidation add fluid density where lung was. A
histogram of the windowed pixels measures that directly; a CNN trained from scratch on a hundred
volumes has to discover the right intensity thresholds first (the sanity floor, a linear model on
such histograms, beat the CNN alone on exactly these findings). Histogram features of a layer's
input as network features: Wang, Yang, Zhu & Lin, "Learnable Histogram: Statistical Context
Features for Deep Neural Networks", ECCV 2016, https://arxiv.org/abs/1804.09398 ; here the bins
are fixed (triangular, evenly spaced over [0, 1] per window), so they need no gradient and cost
one pass over the input.
"""

from __future__ import annotations

import torch
from torch import nn


class SliceHistogram(nn.Module):
    """(N, C, H, W) in [0, 1] -> (N, C * bins): the fraction of each channel's pixels in each bin.

    Triangular (linear-interpolation) bins: a pixel splits its weight between the two nearest bin
    centres, so the features change smoothly with intensity (no hard bin edges)."""

    def __init__(self, channels: int, bins: int = 16) -> None:
        super().__init__()
        if bins < 2:
            raise ValueError(f"histogram bins must be >= 2, got {bins}")
        self.channels, self.bins = channels, bins
        self.register_buffer("centres", torch.linspace(0.0, 1.0, bins), persistent=False)

    @property
    def num_features(self) -> int:
        return self.channels * self.bins

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        pos = x.float().reshape(n, c, h * w).clamp(0.0, 1.0) * (self.bins - 1)  # position in bin units
        lower = pos.floor().clamp(max=self.bins - 2)
        frac = pos - lower
        hist = torch.zeros(n, c, self.bins, device=x.device, dtype=torch.float32)
        index = lower.long()
        hist.scatter_add_(2, index, 1.0 - frac)
        hist.scatter_add_(2, index + 1, frac)
        return (hist / (h * w)).reshape(n, c * self.bins).to(x.dtype)
