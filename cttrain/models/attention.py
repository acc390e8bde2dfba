"""Channel and spatial attention inserted after each backbone stage.

- Squeeze-and-Excitation: Hu, Shen & Sun, "Squeeze-and-Excitation Networks", CVPR 2018,
  https://arxiv.org/abs/1709.01507
- CBAM: Woo, Park, Lee & Kweon, "CBAM: Convolutional Block Attention Module", ECCV 2018,
  https://arxiv.org/abs/1807.06521

Constructors follow timm: channels first, then `rd_ratio` (or an explicit `rd_channels`), with
`act_layer` and `gate_layer` passed as classes.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn


def reduced_channels(channels: int, rd_ratio: float, rd_channels: int | None = None,
                     min_channels: int = 8) -> int:
    """Bottleneck width of the excitation MLP; a floor keeps narrow early stages from a 1-unit bottleneck."""
    if rd_channels is not None:
        return rd_channels
    return max(min_channels, round(channels * rd_ratio))


class SqueezeExcite(nn.Module):
    """SE block (Hu et al., CVPR 2018): global average pool -> bottleneck MLP -> sigmoid gate per channel.

    The MLP is written with 1x1 convolutions so the block works on NCHW and channels_last tensors alike.
    """

    def __init__(self, channels: int, rd_ratio: float = 1 / 16, rd_channels: int | None = None,
                 act_layer: type[nn.Module] = nn.ReLU, gate_layer: type[nn.Module] = nn.Sigmoid) -> None:
        super().__init__()
        hidden = reduced_channels(channels, rd_ratio, rd_channels)
        self.fc1 = nn.Conv2d(channels, hidden, kernel_size=1)
        self.act = act_layer()
        self.fc2 = nn.Conv2d(hidden, channels, kernel_size=1)
        self.gate = gate_layer()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = x.mean(dim=(2, 3), keepdim=True)
        return x * self.gate(self.fc2(self.act(self.fc1(s))))


class ChannelAttention(nn.Module):
    """CBAM channel attention (Woo et al., ECCV 2018, eq. 2): a shared MLP over the average- and
    max-pooled descriptors, summed before the gate."""

    def __init__(self, channels: int, rd_ratio: float = 1 / 16, rd_channels: int | None = None,
                 act_layer: type[nn.Module] = nn.ReLU, gate_layer: type[nn.Module] = nn.Sigmoid) -> None:
        super().__init__()
        hidden = reduced_channels(channels, rd_ratio, rd_channels)
        self.mlp = nn.Sequential(
            nn.Conv2d(channels, hidden, kernel_size=1, bias=False),
            act_layer(),
            nn.Conv2d(hidden, channels, kernel_size=1, bias=False),
        )
        self.gate = gate_layer()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        avg = self.mlp(x.mean(dim=(2, 3), keepdim=True))
        mx = self.mlp(x.amax(dim=(2, 3), keepdim=True))
        return x * self.gate(avg + mx)


class SpatialAttention(nn.Module):
    """CBAM spatial attention (Woo et al., ECCV 2018, eq. 3): a 7x7 convolution over the channel-wise
    average and max maps gives one gate per pixel."""

    def __init__(self, kernel_size: int = 7, gate_layer: type[nn.Module] = nn.Sigmoid) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 1, kernel_size=kernel_size, padding=kernel_size // 2)
        self.gate = gate_layer()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        desc = torch.cat([x.mean(dim=1, keepdim=True), x.amax(dim=1, keepdim=True)], dim=1)
        return x * self.gate(self.conv(desc))


class CBAM(nn.Module):
    """Convolutional Block Attention Module (Woo et al., ECCV 2018): channel then spatial attention,
    the sequential channel-first order the paper found best."""

    def __init__(self, channels: int, rd_ratio: float = 1 / 16, rd_channels: int | None = None,
                 spatial_kernel_size: int = 7, act_layer: type[nn.Module] = nn.ReLU,
                 gate_layer: type[nn.Module] = nn.Sigmoid) -> None:
        super().__init__()
        self.channel = ChannelAttention(channels, rd_ratio, rd_channels, act_layer, gate_layer)
        self.spatial = SpatialAttention(spatial_kernel_size, gate_layer)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.spatial(self.channel(x))


def _identity(channels: int, rd_ratio: float) -> nn.Module:
    return nn.Identity()


ATTENTION: dict[str, Callable[[int, float], nn.Module]] = {
    "none": _identity,
    "se": lambda channels, rd_ratio: SqueezeExcite(channels, rd_ratio=rd_ratio),
    "cbam": lambda channels, rd_ratio: CBAM(channels, rd_ratio=rd_ratio),
}


def build_attention(name: str, channels: int, reduction: int = 16) -> nn.Module:
    """Attention block `name` (none | se | cbam) for a stage with `channels` outputs; `reduction` is the
    papers' r (bottleneck = channels / r)."""
    if name not in ATTENTION:
        raise ValueError(f"unknown attention '{name}'; choose one of {', '.join(ATTENTION)}")
    if reduction < 1:
        raise ValueError(f"attention reduction must be >= 1, got {reduction}")
    return ATTENTION[name](channels, 1.0 / reduction)
