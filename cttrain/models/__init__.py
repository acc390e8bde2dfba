"""Model zoo: `build_model(cfg, in_channels, num_labels)` assembles backbone, per-stage attention, slice
pooling and head from the `model` config section; `dropout_at` is the head-dropout schedule."""

from __future__ import annotations

from collections.abc import Sequence

from cttrain.config import ModelConfig
from cttrain.models.attention import ATTENTION, CBAM, SqueezeExcite, build_attention
from cttrain.models.backbones import (
    BACKBONE_NAMES,
    PretrainedWeightsError,
    StagedBackbone,
    adapt_input_conv,
    build_backbone,
    input_stats,
)
from cttrain.models.backbones3d import SqueezeExcite3d
from cttrain.models.classifier import ClassifierHead, VolumeClassifier, logit_prior
from cttrain.models.histogram import SliceHistogram
from cttrain.models.pooling import POOLING, GatedAttentionPool, build_pooling, pooled_width


def build_model(cfg: ModelConfig, in_channels: int, num_labels: int,
                pos_freq: Sequence[float] | None = None) -> VolumeClassifier:
    """The classifier described by `cfg` for `in_channels` windows and `num_labels` labels.

    `pos_freq` (per-label positive rate in the training set) initialises each label's head bias to its
    own prior; without it every label starts at p = 0.1. Dropout starts at `dropout_at(cfg, 0)`.
    """
    if in_channels < 1 or num_labels < 1:
        raise ValueError(f"in_channels and num_labels must be >= 1, got {in_channels}, {num_labels}")
    if cfg.attention not in ATTENTION:
        raise ValueError(f"unknown attention '{cfg.attention}'; choose one of {', '.join(ATTENTION)}")
    backbone = build_backbone(cfg.backbone, in_channels, cfg.pretrained, cfg.tiny_width, cfg.norm)
    backbone.set_global_pool(cfg.global_pool)
    if cfg.multiscale:
        backbone.set_taps(cfg.multiscale_stages)
    if cfg.attention != "none":
        backbone.set_attention(_attention_factory(cfg, is_3d=getattr(backbone, "is_3d", False)))
    histogram = SliceHistogram(in_channels, cfg.histogram_bins) if cfg.histogram_bins > 0 else None
    width = backbone.num_features + (histogram.num_features if histogram is not None else 0)
    pool = build_pooling(cfg.pooling, width, cfg.attention_hidden)
    head = ClassifierHead(pooled_width(pool, width), num_labels, dropout_at(cfg, 0), logit_prior(pos_freq),
                          norm=cfg.head_norm)
    mean, std = input_stats(in_channels, cfg.pretrained)
    return VolumeClassifier(backbone, pool, head, mean, std, histogram)


def _attention_factory(cfg: ModelConfig, is_3d: bool):
    if not is_3d:
        return lambda ch: build_attention(cfg.attention, ch, cfg.attention_reduction)
    if cfg.attention != "se":
        raise ValueError(f"model.attention={cfg.attention} works with 2D backbones only; use se or none with "
                         f"the 3D backbone {cfg.backbone}")
    return lambda ch: SqueezeExcite3d(ch, 1.0 / cfg.attention_reduction)


def dropout_at(cfg: ModelConfig, epoch: int) -> float:
    """Head dropout at `epoch` (0-based): a linear ramp from `dropout_start` at epoch 0 to `dropout` at
    epoch `dropout_warmup_epochs`, constant after; no warm-up means `dropout` from the start."""
    if cfg.dropout_warmup_epochs <= 0:
        return cfg.dropout
    t = min(max(epoch, 0) / cfg.dropout_warmup_epochs, 1.0)
    return cfg.dropout_start + (cfg.dropout - cfg.dropout_start) * t


__all__ = [
    "BACKBONE_NAMES", "CBAM", "ClassifierHead", "GatedAttentionPool", "POOLING", "PretrainedWeightsError",
    "SqueezeExcite", "StagedBackbone", "VolumeClassifier", "adapt_input_conv", "build_attention",
    "build_backbone", "build_model", "build_pooling", "dropout_at", "input_stats",
]
