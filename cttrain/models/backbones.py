"""2D backbones by name: a small built-in CNN (`tiny`) and torchvision ResNet, EfficientNet, ConvNeXt and
DenseNet, each cut into a stem and four stages so attention can sit after every stage.

Pretrained ImageNet weights come from torchvision (`weights=`); a stem for a channel count other than
3 is adapted from the RGB kernels the way timm's `adapt_input_conv` does, with a rule chosen so a grey
image gives exactly the RGB response (see `adapt_input_conv`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# inputs are [0, 1] HU windows; without ImageNet statistics to match, centre on 0.5 and spread to ~unit std
PLAIN_MEAN, PLAIN_STD = 0.5, 0.25


class PretrainedWeightsError(RuntimeError):
    """ImageNet weights were requested but could not be loaded (usually: no network and no cached file)."""


def adapt_input_conv(weight: torch.Tensor, in_channels: int) -> torch.Tensor:
    """RGB stem kernels (O, 3, kh, kw) -> kernels for `in_channels` inputs.

    - a multiple of 3: repeat the RGB kernels and scale by 3 / in_channels;
    - otherwise (1, 2, 4, 5, ...): every channel gets the RGB sum / in_channels.
    Both keep the response to a grey image (the same plane in every channel) equal to the RGB stem's,
    which timm's rule (repeat, truncate, rescale) does only for multiples of 3.
    """
    if weight.ndim != 4 or weight.shape[1] != 3:
        raise ValueError(f"expected RGB conv weights (O, 3, kh, kw), got {tuple(weight.shape)}")
    if in_channels < 1:
        raise ValueError(f"in_channels must be >= 1, got {in_channels}")
    if in_channels % 3 == 0:
        return weight.repeat(1, in_channels // 3, 1, 1) * (3.0 / in_channels)
    return weight.sum(dim=1, keepdim=True).repeat(1, in_channels, 1, 1) / in_channels


def adapt_stem(conv: nn.Conv2d, in_channels: int, pretrained: bool) -> nn.Conv2d:
    """A copy of `conv` taking `in_channels` inputs; pretrained kernels are adapted, otherwise fresh."""
    new = nn.Conv2d(in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                    conv.dilation, conv.groups, bias=conv.bias is not None, padding_mode=conv.padding_mode)
    if pretrained:
        with torch.no_grad():
            new.weight.copy_(adapt_input_conv(conv.weight, in_channels))
            if conv.bias is not None:
                new.bias.copy_(conv.bias)
    return new


def input_stats(in_channels: int, pretrained: bool) -> tuple[list[float], list[float]]:
    """Per-channel mean and std that the model subtracts/divides from its [0, 1] inputs.

    Pretrained stems expect ImageNet statistics: per RGB channel when the kernels were repeated, their
    average when they were summed (the same split as `adapt_input_conv`).
    """
    if not pretrained:
        return [PLAIN_MEAN] * in_channels, [PLAIN_STD] * in_channels
    if in_channels % 3 == 0:
        reps = in_channels // 3
        return list(IMAGENET_MEAN) * reps, list(IMAGENET_STD) * reps
    mean, std = sum(IMAGENET_MEAN) / 3, sum(IMAGENET_STD) / 3
    return [mean] * in_channels, [std] * in_channels


GLOBAL_POOLS: tuple[str, ...] = ("avg", "max", "avgmax")


class StagedBackbone(nn.Module):
    """stem -> stages (each followed by an attention slot) -> pre_pool -> global average -> post_pool.

    Maps images (N, C, H, W) to features (N, num_features). `attn` starts as identities; `set_attention`
    fills the slots once the stage widths are known.
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
        self.stage_channels, self.num_features = self._probe_widths(in_channels)

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
        features = self._pool(x).shape[1]
        self.train(was_training)
        return widths, features

    def set_attention(self, factory: Callable[[int], nn.Module]) -> None:
        """Put `factory(stage_channels)` after every stage."""
        self.attn = nn.ModuleList(factory(ch) for ch in self.stage_channels)

    def set_global_pool(self, kind: str) -> None:
        """avg (the usual), max, or avgmax = (avg + max) / 2 (as timm's `avgmax`): a small bright
        finding (a nodule, a calcification, metal) moves the max far more than the average."""
        if kind not in GLOBAL_POOLS:
            raise ValueError(f"unknown global_pool '{kind}'; choose one of {', '.join(GLOBAL_POOLS)}")
        self.global_pool = kind

    def _pool(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pre_pool(x)
        if self.global_pool == "avg":
            pooled = x.mean(dim=(2, 3), keepdim=True)
        elif self.global_pool == "max":
            pooled = x.amax(dim=(2, 3), keepdim=True)
        else:
            pooled = 0.5 * (x.mean(dim=(2, 3), keepdim=True) + x.amax(dim=(2, 3), keepdim=True))
        return self.post_pool(pooled).flatten(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        for stage, attn in zip(self.stages, self.attn, strict=True):
            x = attn(stage(x))
        return self._pool(x)


def _conv_bn_relu(c_in: int, c_out: int, stride: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, kernel_size=3, stride=stride, padding=1, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU(inplace=True),
    )


def build_tiny(in_channels: int, width: int = 32) -> StagedBackbone:
    """A small CNN for CPU tests and the demo: a stride-2 stem, then four stages of
    (3x3 stride-2 conv, 3x3 conv), each with BN and ReLU, widths width * (1, 2, 4, 8)."""
    if width < 1:
        raise ValueError(f"tiny_width must be >= 1, got {width}")
    stem = _conv_bn_relu(in_channels, width // 2 or 1, stride=2)
    widths = [width, 2 * width, 4 * width, 8 * width]
    stages, c_in = [], width // 2 or 1
    for c_out in widths:
        stages.append(nn.Sequential(_conv_bn_relu(c_in, c_out, 2), _conv_bn_relu(c_out, c_out, 1)))
        c_in = c_out
    return StagedBackbone(stem, stages, in_channels=in_channels)


# ----- torchvision backbones: how to cut each family into stem / stages / pooling parts


def _split_resnet(net: nn.Module) -> dict:
    stem = nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool)
    return {"stem": stem, "stages": [net.layer1, net.layer2, net.layer3, net.layer4]}


def _split_efficientnet(net: nn.Module) -> dict:
    f = net.features
    # MBConv groups 1..7 regrouped at the stride-4/8/16/32 boundaries, like ResNet's layer1..4
    stages = [nn.Sequential(f[1], f[2]), f[3], nn.Sequential(f[4], f[5]), nn.Sequential(f[6], f[7])]
    return {"stem": f[0], "stages": stages, "pre_pool": f[8]}


def _split_convnext(net: nn.Module) -> dict:
    f = net.features
    stages = [f[1], nn.Sequential(f[2], f[3]), nn.Sequential(f[4], f[5]), nn.Sequential(f[6], f[7])]
    return {"stem": f[0], "stages": stages, "post_pool": net.classifier[0]}  # LayerNorm2d after pooling


def _split_densenet(net: nn.Module) -> dict:
    f = net.features
    stem = nn.Sequential(f.conv0, f.norm0, f.relu0, f.pool0)
    stages = [f.denseblock1, nn.Sequential(f.transition1, f.denseblock2),
              nn.Sequential(f.transition2, f.denseblock3), nn.Sequential(f.transition3, f.denseblock4)]
    return {"stem": stem, "stages": stages, "pre_pool": nn.Sequential(f.norm5, nn.ReLU(inplace=True))}


@dataclass(frozen=True)
class TorchvisionSpec:
    weights: str        # name of the torchvision weights enum, e.g. "ResNet50_Weights"
    stem_conv: str      # dotted path of the first convolution inside the torchvision model
    split: Callable[[nn.Module], dict]


_RESNET = ("conv1", _split_resnet)
_EFFNET = ("features.0.0", _split_efficientnet)
TORCHVISION: dict[str, TorchvisionSpec] = {
    "resnet18": TorchvisionSpec("ResNet18_Weights", *_RESNET),
    "resnet34": TorchvisionSpec("ResNet34_Weights", *_RESNET),
    "resnet50": TorchvisionSpec("ResNet50_Weights", *_RESNET),
    "resnet101": TorchvisionSpec("ResNet101_Weights", *_RESNET),
    "efficientnet_b0": TorchvisionSpec("EfficientNet_B0_Weights", *_EFFNET),
    "efficientnet_b1": TorchvisionSpec("EfficientNet_B1_Weights", *_EFFNET),
    "efficientnet_b2": TorchvisionSpec("EfficientNet_B2_Weights", *_EFFNET),
    "efficientnet_b3": TorchvisionSpec("EfficientNet_B3_Weights", *_EFFNET),
    "convnext_tiny": TorchvisionSpec("ConvNeXt_Tiny_Weights", "features.0.0", _split_convnext),
    "densenet121": TorchvisionSpec("DenseNet121_Weights", "features.conv0", _split_densenet),
}
BACKBONE_NAMES: tuple[str, ...] = ("tiny", *TORCHVISION)


def _load_torchvision(name: str, pretrained: bool) -> nn.Module:
    import torchvision.models as tvm

    spec = TORCHVISION[name]
    if not pretrained:
        return getattr(tvm, name)(weights=None)
    weights = getattr(tvm, spec.weights).DEFAULT
    try:
        return getattr(tvm, name)(weights=weights)
    except (OSError, RuntimeError, ValueError) as exc:  # URLError is an OSError; a bad file a RuntimeError
        cache = f"{torch.hub.get_dir()}/checkpoints/{weights.url.rsplit('/', 1)[-1]}"
        raise PretrainedWeightsError(
            f"could not load ImageNet weights for backbone '{name}' ({type(exc).__name__}: {exc}); "
            f"without network, download {weights.url} elsewhere and place it at {cache}, "
            "or set model.pretrained=false"
        ) from exc


def _replace_stem(net: nn.Module, path: str, in_channels: int, pretrained: bool) -> None:
    parent_path, _, attr = path.rpartition(".")
    parent = net.get_submodule(parent_path) if parent_path else net
    setattr(parent, attr, adapt_stem(getattr(parent, attr), in_channels, pretrained))


def build_backbone(name: str, in_channels: int, pretrained: bool = False,
                   tiny_width: int = 32) -> StagedBackbone:
    """Backbone `name` (see BACKBONE_NAMES) taking `in_channels`-channel images; attention slots empty."""
    if name not in BACKBONE_NAMES:
        raise ValueError(f"unknown backbone '{name}'; choose one of {', '.join(BACKBONE_NAMES)}")
    if name == "tiny":
        if pretrained:
            raise ValueError("backbone 'tiny' has no pretrained weights; set model.pretrained=false")
        return build_tiny(in_channels, tiny_width)
    spec = TORCHVISION[name]
    net = _load_torchvision(name, pretrained)
    if in_channels != 3:
        _replace_stem(net, spec.stem_conv, in_channels, pretrained)
    return StagedBackbone(**spec.split(net), in_channels=in_channels, pretrained=pretrained)
