"""A 2D backbone cut into stem and four stages, with attention slots, in-slice pooling and multi-scale taps.

In-slice (global) pooling turns each stage's map into a vector. Which statistic matters depends on
the finding: a diffuse pattern (emphysema, ground glass, mosaic attenuation) moves the average, a
small bright object (a calcification, a wire) moves the maximum. `catavgmax` keeps both (timm's
`catavgmax`), `avgmax` their mean.

Multi-scale features: the pooled outputs of several stages are concatenated (as in feature-pyramid
classifiers, e.g. Lin et al., "Feature Pyramid Networks for Object Detection", CVPR 2017, used here
for classification), so a 3 mm calcification, resolved only by the early high-resolution stages,
and a 10 cm effusion, seen whole only by the last stage, both reach the head.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn


def _avg(x: torch.Tensor) -> list[torch.Tensor]:
    return [x.mean(dim=(2, 3), keepdim=True)]


def _max(x: torch.Tensor) -> list[torch.Tensor]:
    return [x.amax(dim=(2, 3), keepdim=True)]


def _avgmax(x: torch.Tensor) -> list[torch.Tensor]:
    return [0.5 * (x.mean(dim=(2, 3), keepdim=True) + x.amax(dim=(2, 3), keepdim=True))]


def _catavgmax(x: torch.Tensor) -> list[torch.Tensor]:
    return [x.mean(dim=(2, 3), keepdim=True), x.amax(dim=(2, 3), keepdim=True)]


# name -> function returning the pooled (N, C, 1, 1) parts that are concatenated (so a pool's width
# multiplier is the number of parts)
GLOBAL_POOLS: dict[str, Callable[[torch.Tensor], list[torch.Tensor]]] = {
    "avg": _avg, "max": _max, "avgmax": _avgmax, "catavgmax": _catavgmax,
}
POOL_PARTS: dict[str, int] = {"avg": 1, "max": 1, "avgmax": 1, "catavgmax": 2}


class StagedBackbone(nn.Module):
    """stem -> stages (each followed by an attention slot) -> pooled features of the tapped stages.

    Maps images (N, C, H, W) to features (N, num_features). By default only the last stage is tapped
    (through `pre_pool`, then the global pool, then `post_pool`); `set_taps` adds earlier stages
    (global-pooled without pre/post pooling, which belong to the last stage). `attn` starts as
    identities; `set_attention` fills the slots once the stage widths are known.
    """

    def __init__(self, stem: nn.Module, stages: Sequence[nn.Module], pre_pool: nn.Module | None = None,
                 post_pool: nn.Module | None = None, in_channels: int = 3, pretrained: bool = False) -> None:
        super().__init__()
        self.stem = stem
        self.stages = nn.ModuleList(stages)
        self.attn = nn.ModuleList(nn.Identity() for _ in stages)
        self.pre_pool = pre_pool if pre_pool is not None else nn.Identity()
        self.post_pool = post_pool if post_pool is not None else nn.Identity()
        self.in_channels = in_channels
        self.pretrained = pretrained
        self.global_pool = "avg"
        self.taps: tuple[int, ...] = (len(self.stages),)
        self.stage_channels, self.last_channels = self._probe_widths(in_channels)

    @torch.no_grad()
    def _probe_widths(self, in_channels: int) -> tuple[list[int], int]:
        # one tiny forward in eval mode (BN statistics untouched) is simpler and safer than reading
        # widths off each architecture's internals (DenseNet blocks concatenate, for one)
        was_training = self.training
        self.eval()
        x = self.stem(torch.zeros(1, in_channels, 64, 64))
        widths = []
        for stage in self.stages:
            x = stage(x)
            widths.append(x.shape[1])
        last = self.post_pool(self.pre_pool(x).mean(dim=(2, 3), keepdim=True)).shape[1]
        self.train(was_training)
        return widths, last

    @property
    def num_features(self) -> int:
        """Width of the feature vector: the tapped stages' widths times the pool's parts."""
        n = len(self.stages)
        widths = sum(self.last_channels if i == n else self.stage_channels[i - 1] for i in self.taps)
        return widths * POOL_PARTS[self.global_pool]

    def set_attention(self, factory: Callable[[int], nn.Module]) -> None:
        """Put `factory(stage_channels)` after every stage."""
        self.attn = nn.ModuleList(factory(ch) for ch in self.stage_channels)

    def set_global_pool(self, kind: str) -> None:
        """avg (the usual), max, avgmax = (avg + max) / 2, or catavgmax = [avg, max] (twice the width)."""
        if kind not in GLOBAL_POOLS:
            raise ValueError(f"unknown global_pool '{kind}'; choose one of {', '.join(GLOBAL_POOLS)}")
        self.global_pool = kind

    def set_taps(self, stages: Sequence[int]) -> None:
        """Stages (1-based, e.g. [2, 3, 4]) whose pooled outputs are concatenated; the last stage is
        always included (the head is built for it)."""
        n = len(self.stages)
        bad = [s for s in stages if not 1 <= int(s) <= n]
        if bad:
            raise ValueError(f"model.multiscale_stages: stage {bad[0]} does not exist; the backbone has stages 1..{n}")
        self.taps = tuple(sorted({int(s) for s in stages} | {n}))

    def _pool(self, x: torch.Tensor, last: bool) -> torch.Tensor:
        if last:
            x = self.pre_pool(x)
        parts = GLOBAL_POOLS[self.global_pool](x)
        if last:
            parts = [self.post_pool(p) for p in parts]
        return torch.cat([p.flatten(1) for p in parts], dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        n, feats = len(self.stages), []
        for i, (stage, attn) in enumerate(zip(self.stages, self.attn, strict=True), start=1):
            x = attn(stage(x))
            if i in self.taps:
                feats.append(self._pool(x, last=i == n))
        return feats[0] if len(feats) == 1 else torch.cat(feats, dim=1)
