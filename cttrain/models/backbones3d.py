"""3D backbones over the whole stack of K slices: a small built-in 3D CNN (`tiny3d`) and torchvision's
video ResNets (`r3d_18`, `mc3_18`, `r2plus1d_18`).

A 2D backbone sees one slice at a time; a 3D one also sees the slices above and below, so a nodule
(a blob) can be told from a vessel (a tube) and thin findings are followed across slices. Video
ResNets: Tran, Wang, Torresani, Ray, LeCun & Paluri, "A Closer Look at Spatiotemporal Convolutions
for Action Recognition", CVPR 2018, https://arxiv.org/abs/1711.11248 (R3D, MC3, R(2+1)D). Their
Kinetics-400 weights load through torchvision's `weights=`; the RGB stem is adapted to the window
channels with the same rule as the 2D stems (`adapt_input_conv`).

Output: per-depth features (N, K', F) for the slice pooling, where K' is K after the backbone's
depth strides. Multi-scale taps are pooled over the image plane and resampled along depth to the
last stage's K' before they are concatenated.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from cttrain.models.staged import POOL_PARTS

VIDEO: dict[str, str] = {"r3d_18": "R3D_18_Weights", "mc3_18": "MC3_18_Weights", "r2plus1d_18": "R2Plus1D_18_Weights"}
BACKBONE3D_NAMES: tuple[str, ...] = ("tiny3d", *VIDEO)


def _plane_pool(x: torch.Tensor, kind: str) -> torch.Tensor:
    """(N, C, D, H, W) -> (N, C * parts, D): the global pool over each depth's image plane."""
    avg, mx = x.mean(dim=(3, 4)), x.amax(dim=(3, 4))
    return {"avg": avg, "max": mx, "avgmax": 0.5 * (avg + mx), "catavgmax": torch.cat([avg, mx], dim=1)}[kind]


class SqueezeExcite3d(nn.Module):
    """Squeeze-and-Excitation (Hu et al., CVPR 2018, https://arxiv.org/abs/1709.01507) for 3D maps."""

    def __init__(self, channels: int, rd_ratio: float = 1 / 16, act_layer: type[nn.Module] = nn.ReLU,
                 gate_layer: type[nn.Module] = nn.Sigmoid) -> None:
        super().__init__()
        hidden = max(8, round(channels * rd_ratio))
        self.fc = nn.Sequential(nn.Linear(channels, hidden), act_layer(), nn.Linear(hidden, channels), gate_layer())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.fc(x.mean(dim=(2, 3, 4)))[:, :, None, None, None]


class Staged3DBackbone(nn.Module):
    """stem -> four 3D stages (attention slots after each) -> per-depth pooled features (N, D', F)."""

    is_3d = True

    def __init__(self, stem: nn.Module, stages: Sequence[nn.Module], in_channels: int,
                 pretrained: bool = False) -> None:
        super().__init__()
        self.stem, self.stages = stem, nn.ModuleList(stages)
        self.attn = nn.ModuleList(nn.Identity() for _ in stages)
        self.in_channels, self.pretrained = in_channels, pretrained
        self.global_pool = "avg"
        self.taps: tuple[int, ...] = (len(self.stages),)
        with torch.no_grad():
            was = self.training
            self.eval()
            x, widths = self.stem(torch.zeros(1, in_channels, 8, 32, 32)), []
            for stage in self.stages:
                x = stage(x)
                widths.append(x.shape[1])
            self.train(was)
        self.stage_channels = widths

    @property
    def num_features(self) -> int:
        return sum(self.stage_channels[i - 1] for i in self.taps) * POOL_PARTS[self.global_pool]

    def set_attention(self, factory: Callable[[int], nn.Module]) -> None:
        self.attn = nn.ModuleList(factory(ch) for ch in self.stage_channels)

    def set_global_pool(self, kind: str) -> None:
        if kind not in POOL_PARTS:
            raise ValueError(f"unknown global_pool '{kind}'; choose one of {', '.join(POOL_PARTS)}")
        self.global_pool = kind

    def set_taps(self, stages: Sequence[int]) -> None:
        n = len(self.stages)
        bad = [s for s in stages if not 1 <= int(s) <= n]
        if bad:
            raise ValueError(f"model.multiscale_stages: stage {bad[0]} does not exist; the backbone has stages 1..{n}")
        self.taps = tuple(sorted({int(s) for s in stages} | {n}))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, C, D, H, W) -> (N, D', F)."""
        x = self.stem(x)
        feats = []
        for i, (stage, attn) in enumerate(zip(self.stages, self.attn, strict=True), start=1):
            x = attn(stage(x))
            if i in self.taps:
                feats.append(_plane_pool(x, self.global_pool))
        depth = feats[-1].shape[-1]
        feats = [f if f.shape[-1] == depth else F.adaptive_avg_pool1d(f, depth) for f in feats]
        return torch.cat(feats, dim=1).transpose(1, 2)


def _conv3d_bn_relu(c_in: int, c_out: int, stride: tuple[int, int, int], norm: str) -> nn.Sequential:
    from cttrain.models.backbones import norm_layer

    return nn.Sequential(nn.Conv3d(c_in, c_out, 3, stride=stride, padding=1, bias=False),
                         norm_layer(norm, c_out, dims=3), nn.ReLU(inplace=True))


def build_tiny3d(in_channels: int, width: int = 16, norm: str = "batch") -> Staged3DBackbone:
    """A small 3D CNN for CPU runs: stem (3x3x3, stride 1x2x2), then four stages of (3x3x3 stride-2 conv,
    3x3x3 conv) with widths width * (1, 2, 4, 8); depth is halved only in the last two stages, so thin
    slices keep their own features through the early ones."""
    if width < 2:
        raise ValueError(f"tiny_width must be >= 2 for tiny3d, got {width}")
    stem = _conv3d_bn_relu(in_channels, width // 2, (1, 2, 2), norm)
    strides = [(1, 2, 2), (1, 2, 2), (2, 2, 2), (2, 2, 2)]
    stages, c_in = [], width // 2
    for c_out, stride in zip([width, 2 * width, 4 * width, 8 * width], strides, strict=True):
        stages.append(nn.Sequential(_conv3d_bn_relu(c_in, c_out, stride, norm),
                                    _conv3d_bn_relu(c_out, c_out, (1, 1, 1), norm)))
        c_in = c_out
    return Staged3DBackbone(stem, stages, in_channels)


def build_video_resnet(name: str, in_channels: int, pretrained: bool) -> Staged3DBackbone:
    """torchvision's `name` video ResNet, stem adapted to `in_channels`; Kinetics weights if `pretrained`."""
    import torchvision.models.video as tvv

    from cttrain.models.backbones import PretrainedWeightsError, adapt_input_conv

    weights = getattr(tvv, VIDEO[name]).DEFAULT if pretrained else None
    try:
        net = getattr(tvv, name)(weights=weights)
    except (OSError, RuntimeError, ValueError) as exc:
        cache = f"{torch.hub.get_dir()}/checkpoints/{weights.url.rsplit('/', 1)[-1]}"
        raise PretrainedWeightsError(f"could not load Kinetics weights for backbone '{name}' ({type(exc).__name__}: "
                                     f"{exc}); without network, place {weights.url} at {cache}, or set "
                                     "model.pretrained=false") from exc
    conv = net.stem[0]
    new = nn.Conv3d(in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding, bias=False)
    if pretrained:
        with torch.no_grad():
            w = conv.weight  # (O, 3, kd, kh, kw): adapt as 2D kernels, depth folded into the batch
            o, _, kd, kh, kw = w.shape
            flat = w.permute(0, 2, 1, 3, 4).reshape(o * kd, 3, kh, kw)
            new.weight.copy_(adapt_input_conv(flat, in_channels).reshape(o, kd, in_channels, kh, kw)
                             .permute(0, 2, 1, 3, 4))
    net.stem[0] = new
    return Staged3DBackbone(net.stem, [net.layer1, net.layer2, net.layer3, net.layer4], in_channels, pretrained)


def build_backbone3d(name: str, in_channels: int, pretrained: bool = False, tiny_width: int = 16,
                     norm: str = "batch") -> Staged3DBackbone:
    if name == "tiny3d":
        if pretrained:
            raise ValueError("backbone 'tiny3d' has no pretrained weights; set model.pretrained=false")
        return build_tiny3d(in_channels, tiny_width, norm)
    return build_video_resnet(name, in_channels, pretrained)


__all__ = ["BACKBONE3D_NAMES", "SqueezeExcite3d", "Staged3DBackbone", "build_backbone3d"]
