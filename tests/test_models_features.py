"""Feature options of the model: 3D backbones, multi-scale taps, in-slice and slice pooling variants,
histogram features, head norms; and that the config's allowed values match the registries."""

from __future__ import annotations

import pytest
import torch

from cttrain.config import _CHOICES, ModelConfig
from cttrain.models import POOLING, build_model
from cttrain.models.backbones3d import BACKBONE3D_NAMES
from cttrain.models.classifier import HEAD_NORMS
from cttrain.models.histogram import SliceHistogram
from cttrain.models.staged import GLOBAL_POOLS

torch.set_num_threads(1)


def _cfg(**kw) -> ModelConfig:
    base = {"backbone": "tiny", "pretrained": False, "attention": "none", "pooling": "mean",
            "attention_hidden": 16, "tiny_width": 8, "dropout": 0.0}
    return ModelConfig(**{**base, **kw})


def _volume(b: int = 2, k: int = 8, c: int = 2, size: int = 32) -> torch.Tensor:
    return torch.rand(b, k, c, size, size, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("name", BACKBONE3D_NAMES)
def test_3d_backbones_forward_backward(name: str) -> None:
    width = 8 if name == "tiny3d" else 32
    model = build_model(_cfg(backbone=name, tiny_width=width, attention="se" if name == "tiny3d" else "none",
                             multiscale=True), in_channels=2, num_labels=3).train()
    x = _volume()
    feats = model.forward_features(x)
    assert feats.ndim == 3 and feats.shape[0] == 2 and feats.shape[2] == model.num_features
    assert 1 <= feats.shape[1] <= x.shape[1]  # depth after the backbone's strides
    logits = model(x)
    logits.sum().backward()
    assert logits.shape == (2, 3)
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters() if p.requires_grad)


def test_cbam_on_a_3d_backbone_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="2D backbones only"):
        build_model(_cfg(backbone="tiny3d", attention="cbam"), in_channels=2, num_labels=3)


def test_multiscale_concatenates_the_tapped_stages() -> None:
    single = build_model(_cfg(), in_channels=2, num_labels=3)
    multi = build_model(_cfg(multiscale=True, multiscale_stages=[2, 3]), in_channels=2, num_labels=3)
    widths = multi.backbone.stage_channels
    assert single.num_features == widths[3]
    assert multi.num_features == widths[1] + widths[2] + widths[3]  # the last stage is always tapped
    with torch.no_grad():
        assert multi.forward_features(_volume()).shape == (2, 8, multi.num_features)
    with pytest.raises(ValueError, match="stage 7 does not exist"):
        build_model(_cfg(multiscale=True, multiscale_stages=[7]), in_channels=2, num_labels=3)


def test_catavgmax_and_meanmax_double_the_width() -> None:
    model = build_model(_cfg(global_pool="catavgmax", pooling="meanmax"), in_channels=2, num_labels=3).eval()
    assert model.num_features == 2 * model.backbone.stage_channels[3]
    assert model.head.fc.in_features == 2 * model.num_features
    x = _volume()
    with torch.no_grad():
        feats = model.forward_features(x)
        pooled, weights = model.pool(feats)
    half = feats.shape[2]
    assert torch.allclose(pooled[:, :half], feats.mean(dim=1)) and torch.allclose(pooled[:, half:], feats.amax(dim=1))
    assert torch.allclose(weights.sum(dim=1), torch.ones(2))


def test_slice_histogram_counts_pixels_per_bin() -> None:
    hist = SliceHistogram(channels=2, bins=5)
    x = torch.zeros(1, 2, 4, 4)
    x[0, 0, :2] = 1.0    # half the pixels of channel 0 at the top bin
    x[0, 1] = 0.375      # channel 1 halfway between the centres 0.25 and 0.5
    h = hist(x).reshape(2, 5)
    assert torch.allclose(h[0], torch.tensor([0.5, 0, 0, 0, 0.5]))
    assert torch.allclose(h[1], torch.tensor([0, 0.5, 0.5, 0, 0]))
    assert torch.allclose(hist(torch.rand(3, 2, 8, 8)).reshape(3, 2, 5).sum(-1), torch.ones(3, 2))


def test_histogram_features_join_the_slice_features() -> None:
    model = build_model(_cfg(histogram_bins=8), in_channels=2, num_labels=3)
    assert model.num_features == model.backbone.num_features + 16
    logits = model(_volume())
    logits.sum().backward()
    assert logits.shape == (2, 3)


@pytest.mark.parametrize("norm", list(HEAD_NORMS))
def test_head_norms_train_and_eval_agree_in_shape(norm: str) -> None:
    model = build_model(_cfg(head_norm=norm), in_channels=2, num_labels=3)
    model.train()(_volume()).sum().backward()
    with torch.no_grad():
        assert model.eval()(_volume(b=1)).shape == (1, 3)  # a single volume works in eval with any norm


def test_config_choices_match_the_registries() -> None:
    assert set(_CHOICES["model.pooling"]) == set(POOLING)
    assert set(_CHOICES["model.global_pool"]) == set(GLOBAL_POOLS)
    assert set(_CHOICES["model.head_norm"]) == set(HEAD_NORMS)
