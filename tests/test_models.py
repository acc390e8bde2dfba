"""Model zoo: shapes, slice pooling, stem adaptation, pretrained loading, dropout schedule, overfitting."""

from __future__ import annotations

import math
import urllib.error
from dataclasses import replace

import pytest
import torch
from torch import nn

from cttrain.config import ModelConfig
from cttrain.models import (
    BACKBONE_NAMES,
    CBAM,
    PretrainedWeightsError,
    SqueezeExcite,
    adapt_input_conv,
    build_backbone,
    build_model,
    build_pooling,
    dropout_at,
    input_stats,
)
from cttrain.models.backbones import IMAGENET_MEAN, adapt_stem

torch.set_num_threads(1)


def _cfg(**kw) -> ModelConfig:
    base = {"backbone": "tiny", "pretrained": False, "attention": "none", "pooling": "attention",
            "attention_hidden": 16, "tiny_width": 8, "dropout": 0.0}
    return ModelConfig(**{**base, **kw})


def _volume(b: int = 2, k: int = 3, c: int = 2, size: int = 32, seed: int = 0) -> torch.Tensor:
    return torch.rand(b, k, c, size, size, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("backbone", ["tiny", "resnet18", "efficientnet_b0", "convnext_tiny"])
@pytest.mark.parametrize("attention", ["none", "se", "cbam"])
def test_output_shapes(backbone: str, attention: str) -> None:
    pooling = ("attention", "mean", "max")[(len(backbone) + len(attention)) % 3]  # vary pooling cheaply
    model = build_model(_cfg(backbone=backbone, attention=attention, pooling=pooling), in_channels=2,
                        num_labels=5).eval()
    x = _volume()
    with torch.no_grad():
        feats = model.forward_features(x)
        logits, weights = model.forward_head(feats, return_attention=True)
    assert feats.shape == (2, 3, model.num_features)
    assert logits.shape == (2, 5) and weights.shape == (2, 3)
    assert torch.isfinite(logits).all()
    inserted = [type(m) for m in model.backbone.attn]
    expected = {"none": nn.Identity, "se": SqueezeExcite, "cbam": CBAM}[attention]
    assert inserted == [expected] * 4


@pytest.mark.parametrize("pooling", ["attention", "mean", "max"])
def test_tiny_train_step_each_pooling(pooling: str) -> None:
    model = build_model(_cfg(pooling=pooling, attention="cbam"), in_channels=3, num_labels=4).train()
    logits = model(_volume(c=3))
    logits.sum().backward()
    assert logits.shape == (2, 4)
    assert all(p.grad is not None and torch.isfinite(p.grad).all()
               for p in model.parameters() if p.requires_grad)


@pytest.mark.parametrize("name,width", [("resnet50", 2048), ("efficientnet_b3", 1536), ("densenet121", 1024)])
def test_other_torchvision_backbones_build(name: str, width: int) -> None:
    backbone = build_backbone(name, in_channels=1)
    assert backbone.num_features == width and len(backbone.stage_channels) == 4


def test_unknown_names_list_choices() -> None:
    with pytest.raises(ValueError, match="resnet50.*convnext_tiny"):
        build_model(_cfg(backbone="vgg16"), 3, 2)
    with pytest.raises(ValueError, match="none, se, cbam"):
        build_model(_cfg(attention="eca"), 3, 2)
    with pytest.raises(ValueError, match="attention, mean, max"):
        build_model(_cfg(pooling="lse"), 3, 2)
    assert BACKBONE_NAMES[0] == "tiny"


@pytest.mark.parametrize("pooling", ["attention", "mean", "max"])
def test_pooling_weights_sum_to_one_and_permutation_invariant(pooling: str) -> None:
    torch.manual_seed(0)
    pool = build_pooling(pooling, in_features=6, hidden=4)
    feats = torch.randn(3, 7, 6)
    pooled, weights = pool(feats)
    assert weights.shape == (3, 7) and (weights >= 0).all()
    torch.testing.assert_close(weights.sum(dim=1), torch.ones(3))
    perm = torch.randperm(7)
    pooled_p, weights_p = pool(feats[:, perm])
    torch.testing.assert_close(pooled_p, pooled)
    torch.testing.assert_close(weights_p, weights[:, perm])


def test_attention_pool_focuses_on_distinct_slices() -> None:
    # weights are not uniform: the pool scores slices by their content
    torch.manual_seed(0)
    pool = build_pooling("attention", in_features=4, hidden=8)
    _, weights = pool(torch.randn(1, 5, 4) * 3)
    assert weights.std() > 1e-3


def test_model_is_invariant_to_slice_order() -> None:
    model = build_model(_cfg(attention="se"), in_channels=2, num_labels=3).eval()
    x = _volume(k=5)
    with torch.no_grad():
        torch.testing.assert_close(model(x[:, torch.tensor([4, 0, 3, 1, 2])]), model(x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("channels", [1, 5, 6])
def test_adapted_stem_matches_rgb_response_on_grey(channels: int) -> None:
    torch.manual_seed(0)
    rgb = nn.Conv2d(3, 8, kernel_size=7, stride=2, padding=3, bias=True)
    adapted = adapt_stem(rgb, channels, pretrained=True)
    grey = torch.rand(2, 1, 20, 20)
    with torch.no_grad():
        torch.testing.assert_close(adapted(grey.expand(-1, channels, -1, -1)), rgb(grey.expand(-1, 3, -1, -1)),
                                   atol=1e-5, rtol=1e-5)
    assert adapted.stride == rgb.stride and adapted.in_channels == channels


def test_adapt_input_conv_rules() -> None:
    w = torch.randn(4, 3, 3, 3)
    torch.testing.assert_close(adapt_input_conv(w, 3), w)
    torch.testing.assert_close(adapt_input_conv(w, 6)[:, 3:], w / 2)  # repeat and rescale
    one = adapt_input_conv(w, 1)
    torch.testing.assert_close(one[:, 0], w.sum(dim=1))
    with pytest.raises(ValueError, match="RGB"):
        adapt_input_conv(torch.randn(4, 2, 3, 3), 5)


def test_input_normalisation_stats() -> None:
    assert input_stats(2, pretrained=False) == ([0.5, 0.5], [0.25, 0.25])
    mean, _ = input_stats(3, pretrained=True)
    assert mean == list(IMAGENET_MEAN)
    mean, std = input_stats(5, pretrained=True)
    assert len(mean) == 5 and mean[0] == pytest.approx(sum(IMAGENET_MEAN) / 3) and len(set(std)) == 1
    model = build_model(_cfg(), in_channels=2, num_labels=1)
    x = torch.full((1, 2, 4, 4), 0.75)
    torch.testing.assert_close(model.input_norm(x), torch.ones_like(x))


def test_pretrained_download_failure_is_clear(monkeypatch: pytest.MonkeyPatch) -> None:
    import torchvision.models._api as tv_api

    def offline(url: str, *args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(tv_api, "load_state_dict_from_url", offline)
    with pytest.raises(PretrainedWeightsError, match=r"resnet18.*model.pretrained=false"):
        build_model(_cfg(backbone="resnet18", pretrained=True), 3, 2)


def test_pretrained_weights_load_and_stem_is_adapted(monkeypatch: pytest.MonkeyPatch) -> None:
    import torchvision.models as tvm
    import torchvision.models._api as tv_api

    torch.manual_seed(1)
    fake = tvm.resnet18(weights=None).state_dict()  # stands in for the ImageNet checkpoint
    monkeypatch.setattr(tv_api, "load_state_dict_from_url", lambda url, *a, **k: fake)
    model = build_model(_cfg(backbone="resnet18", pretrained=True), in_channels=5, num_labels=2)
    stem = model.backbone.stem[0]
    torch.testing.assert_close(stem.weight, adapt_input_conv(fake["conv1.weight"], 5))
    torch.testing.assert_close(model.backbone.stages[3][1].conv2.weight, fake["layer4.1.conv2.weight"])
    assert model.input_norm.mean.flatten()[0].item() == pytest.approx(sum(IMAGENET_MEAN) / 3)


def test_tiny_has_no_pretrained_weights() -> None:
    with pytest.raises(ValueError, match="pretrained=false"):
        build_model(_cfg(pretrained=True), 3, 2)


def test_dropout_schedule_and_set_dropout() -> None:
    cfg = _cfg(dropout=0.5, dropout_start=0.1, dropout_warmup_epochs=4)
    assert [dropout_at(cfg, e) for e in (0, 2, 4, 10)] == pytest.approx([0.1, 0.3, 0.5, 0.5])
    assert dropout_at(replace(cfg, dropout_warmup_epochs=0), 0) == 0.5
    model = build_model(cfg, 3, 2)
    assert model.head.drop.p == pytest.approx(0.1)
    model.set_dropout(dropout_at(cfg, 3))
    assert model.head.drop.p == pytest.approx(0.4)
    with pytest.raises(ValueError):
        model.set_dropout(1.0)


def test_head_bias_starts_at_prior() -> None:
    model = build_model(_cfg(), 3, 4)
    torch.testing.assert_close(model.head.fc.bias, torch.full((4,), math.log(0.1 / 0.9)))
    model = build_model(_cfg(), 3, 2, pos_freq=[0.5, 0.2])
    torch.testing.assert_close(model.head.fc.bias, torch.tensor([0.0, math.log(0.2 / 0.8)]))


def test_attention_blocks_gate_without_changing_shape() -> None:
    x = torch.randn(2, 32, 6, 6)
    for block in (SqueezeExcite(32, rd_ratio=1 / 16), CBAM(32, rd_ratio=1 / 16)):
        y = block(x)
        assert y.shape == x.shape
        assert (y.abs() <= x.abs() + 1e-6).all()  # sigmoid gates only scale down
    assert SqueezeExcite(32, rd_ratio=1 / 16).fc1.out_channels == 8  # floor for narrow stages


def test_channels_last_and_bf16_autocast() -> None:
    model = build_model(_cfg(attention="cbam"), in_channels=2, num_labels=3).eval()
    x = _volume()
    with torch.no_grad():
        ref = model(x)
        model.use_channels_last()
        assert model.backbone.stem[0].weight.is_contiguous(memory_format=torch.channels_last)
        torch.testing.assert_close(model(x), ref, atol=1e-4, rtol=1e-4)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = model(x)
    assert low.dtype == torch.bfloat16 and torch.isfinite(low).all()
    assert (low.float() - ref).abs().max() < 0.25


def test_bad_input_shape_is_rejected() -> None:
    model = build_model(_cfg(), in_channels=2, num_labels=1)
    with pytest.raises(ValueError, match="channels"):
        model(_volume(c=3))
    with pytest.raises(ValueError, match="B, K, C, H, W"):
        model(torch.rand(2, 2, 16, 16))


def test_tiny_model_overfits_learnable_problem() -> None:
    # label j = "some slice has a bright square in quadrant j": needs per-slice spatial features and
    # aggregation over slices, which is what the model is for
    gen = torch.Generator().manual_seed(0)
    n, k, size = 16, 4, 32
    x = torch.rand(n, k, 1, size, size, generator=gen) * 0.3
    y = torch.randint(0, 2, (n, 2), generator=gen).float()
    for i in range(n):
        for j in range(2):
            if y[i, j]:
                s = int(torch.randint(0, k, (1,), generator=gen))
                x[i, s, 0, 4 + 16 * j:12 + 16 * j, 4:12] = 1.0
    torch.manual_seed(0)
    model = build_model(_cfg(attention="se"), in_channels=1, num_labels=2)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(40):
        logits = model(x)
        loss = nn.functional.binary_cross_entropy_with_logits(logits, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.1 * losses[0]
    assert ((logits > 0).float() == y).all()
