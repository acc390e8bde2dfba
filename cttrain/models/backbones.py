"""2D backbones by name: a small built-in CNN (`tiny`) and torchvision ResNet, EfficientNet, ConvNeXt and
DenseNet, each cut into a stem and four stages so attention can sit after every stage.

Pretrained ImageNet weights come from torchvision (`weights=`); a stem for a channel count other than
3 is adapted from the RGB kernels the way timm's `adapt_input_conv` does, with a rule chosen so a grey
image gives exactly the RGB response (see `adapt_input_conv`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from cttrain.models.backbones3d import BACKBONE3D_NAMES, Staged3DBackbone, build_backbone3d
from cttrain.models.staged import StagedBackbone

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


def norm_layer(kind: str, channels: int, dims: int = 2) -> nn.Module:
    """BatchNorm (`batch`) or GroupNorm with groups of 4 channels (`group`, Wu & He, "Group
    Normalization", ECCV 2018, https://arxiv.org/abs/1803.08494). A CPU batch holds the slices of
    only 4 volumes, so batch statistics are few and correlated and differ between training and
    evaluation; GroupNorm normalises each image alone and behaves the same in both."""
    if kind == "batch":
        return (nn.BatchNorm2d if dims == 2 else nn.BatchNorm3d)(channels)
    if kind == "group":
        return nn.GroupNorm(max(1, channels // 4), channels)
    raise ValueError(f"unknown norm '{kind}'; choose batch or group")


def _conv_bn_relu(c_in: int, c_out: int, stride: int, norm: str = "batch") -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, kernel_size=3, stride=stride, padding=1, bias=False),
        norm_layer(norm, c_out),
        nn.ReLU(inplace=True),
    )


def build_tiny(in_channels: int, width: int = 32, norm: str = "batch") -> StagedBackbone:
    """A small CNN for CPU tests and the demo: a stride-2 stem, then four stages of
    (3x3 stride-2 conv, 3x3 conv), each with a norm (`norm_layer`) and ReLU, widths width * (1, 2, 4, 8)."""
    if width < 1:
        raise ValueError(f"tiny_width must be >= 1, got {width}")
    stem = _conv_bn_relu(in_channels, width // 2 or 1, 2, norm)
    widths = [width, 2 * width, 4 * width, 8 * width]
    stages, c_in = [], width // 2 or 1
    for c_out in widths:
        stages.append(nn.Sequential(_conv_bn_relu(c_in, c_out, 2, norm), _conv_bn_relu(c_out, c_out, 1, norm)))
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
BACKBONE_NAMES: tuple[str, ...] = ("tiny", *TORCHVISION, *BACKBONE3D_NAMES)


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
                   tiny_width: int = 32, norm: str = "batch") -> StagedBackbone | Staged3DBackbone:
    """Backbone `name` (see BACKBONE_NAMES) taking `in_channels`-channel images (2D, per slice) or
    stacks (3D: tiny3d and the video ResNets); attention slots empty. `norm` applies to the built-in
    tiny and tiny3d CNNs (torchvision's keep their own layers)."""
    if name not in BACKBONE_NAMES:
        raise ValueError(f"unknown backbone '{name}'; choose one of {', '.join(BACKBONE_NAMES)}")
    if name in BACKBONE3D_NAMES:
        return build_backbone3d(name, in_channels, pretrained, tiny_width, norm)
    if name == "tiny":
        if pretrained:
            raise ValueError("backbone 'tiny' has no pretrained weights; set model.pretrained=false")
        return build_tiny(in_channels, tiny_width, norm)
    spec = TORCHVISION[name]
    net = _load_torchvision(name, pretrained)
    if in_channels != 3:
        _replace_stem(net, spec.stem_conv, in_channels, pretrained)
    return StagedBackbone(**spec.split(net), in_channels=in_channels, pretrained=pretrained)
