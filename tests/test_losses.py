"""Losses: reductions to BCE, agreement with reference formulas, soft targets, stability, class weights."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torchvision.ops import sigmoid_focal_loss

from cttrain.config import LossConfig
from cttrain.losses import AsymmetricLoss, BCELoss, FocalLoss, build_loss, pos_weight_from_freq

torch.set_num_threads(1)


def _batch(seed: int = 0, soft: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(6, 18, generator=gen) * 3
    targets = torch.rand(6, 18, generator=gen)
    return logits, targets if soft else (targets > 0.7).float()


def test_focal_with_gamma_0_and_no_alpha_is_bce() -> None:
    logits, targets = _batch()
    loss = build_loss(LossConfig(name="focal", focal_gamma=0.0, focal_alpha=-1.0))
    torch.testing.assert_close(loss(logits, targets), F.binary_cross_entropy_with_logits(logits, targets))


def test_asl_with_zero_gammas_and_clip_is_bce() -> None:
    logits, targets = _batch()
    loss = build_loss(LossConfig(name="asl", asl_gamma_neg=0.0, asl_gamma_pos=0.0, asl_clip=0.0))
    torch.testing.assert_close(loss(logits, targets), F.binary_cross_entropy_with_logits(logits, targets))


def test_focal_matches_torchvision_on_hard_targets() -> None:
    logits, targets = _batch(soft=False)
    ours = FocalLoss(alpha=0.25, gamma=2.0)(logits, targets)
    torch.testing.assert_close(ours, sigmoid_focal_loss(logits, targets, alpha=0.25, gamma=2.0, reduction="mean"))


def test_asl_matches_paper_formula_on_hard_targets() -> None:
    logits, targets = _batch(soft=False)
    p = torch.sigmoid(logits.double())
    p_m = (p - 0.05).clamp(min=0)
    ref = -(targets * (1 - p) ** 1 * torch.log(p) + (1 - targets) * p_m ** 4 * torch.log(1 - p_m)).mean()
    ours = AsymmetricLoss(gamma_neg=4.0, gamma_pos=1.0, clip=0.05)(logits, targets)
    torch.testing.assert_close(ours.double(), ref, rtol=1e-5, atol=1e-6)


def test_asl_clip_discards_easy_negatives() -> None:
    logits = torch.tensor([[-6.0, -4.0, 2.0]], requires_grad=True)  # p = 0.0025, 0.018, 0.88
    loss = AsymmetricLoss(gamma_neg=4.0, gamma_pos=0.0, clip=0.05)(logits, torch.zeros(1, 3))
    loss.backward()
    assert logits.grad[0, 0] == 0 and logits.grad[0, 1] == 0 and logits.grad[0, 2] > 0


@pytest.mark.parametrize("name", ["focal", "asl", "bce"])
def test_soft_targets_mix_losses_linearly(name: str) -> None:
    # MixUp consistency: L(lam y1 + (1 - lam) y2) = lam L(y1) + (1 - lam) L(y2)
    logits, _ = _batch()
    _, y1 = _batch(1, soft=False)
    _, y2 = _batch(2, soft=False)
    loss, lam = build_loss(LossConfig(name=name)), 0.3
    torch.testing.assert_close(loss(logits, lam * y1 + (1 - lam) * y2),
                               lam * loss(logits, y1) + (1 - lam) * loss(logits, y2))


def test_focal_down_weights_easy_examples() -> None:
    easy = torch.tensor([[4.0, -4.0]])
    hard = torch.tensor([[-1.0, 1.0]])
    y = torch.tensor([[1.0, 0.0]])
    focal, bce = FocalLoss(alpha=-1, gamma=2.0), BCELoss()
    assert focal(easy, y) / bce(easy, y) < 0.001
    assert focal(hard, y) / bce(hard, y) > 0.5


@pytest.mark.parametrize("loss", [
    FocalLoss(0.25, 2.0), FocalLoss(-1, 0.5), AsymmetricLoss(4.0, 1.0, 0.05), AsymmetricLoss(2.0, 0.5, 0.0),
    BCELoss(label_smoothing=0.1, pos_weight=torch.full((4,), 50.0)),
])
def test_gradients_finite_on_extreme_logits(loss: torch.nn.Module) -> None:
    logits = torch.tensor([[1e4, -1e4, 80.0, -80.0], [0.0, 1e-8, -30.0, 30.0]], requires_grad=True)
    targets = torch.tensor([[0.0, 1.0, 0.5, 1.0], [1.0, 0.0, 1.0, 0.0]])
    value = loss(logits, targets)
    value.backward()
    assert torch.isfinite(value) and torch.isfinite(logits.grad).all()


def test_pos_weight_from_frequencies() -> None:
    w = pos_weight_from_freq(np.array([0.5, 0.1, 0.01, 0.0, 0.9]))
    torch.testing.assert_close(w, torch.tensor([1.0, 9.0, 50.0, 50.0, 1.0]))
    with pytest.raises(ValueError, match="positive rates"):
        pos_weight_from_freq([0.2, 3.0])


def test_class_weights_reach_the_loss() -> None:
    logits, targets = _batch()
    freq = np.linspace(0.05, 0.5, 18)
    loss = build_loss(LossConfig(name="bce", class_weights=True), pos_freq=freq)
    ref = F.binary_cross_entropy_with_logits(logits, targets, pos_weight=pos_weight_from_freq(freq))
    torch.testing.assert_close(loss(logits, targets), ref)
    with pytest.raises(ValueError, match="pos_freq"):
        build_loss(LossConfig(name="bce", class_weights=True))


def test_label_smoothing_moves_targets_towards_half() -> None:
    logits, _ = _batch()
    _, hard = _batch(soft=False)
    smoothed = build_loss(LossConfig(name="bce", label_smoothing=0.2))(logits, hard)
    torch.testing.assert_close(smoothed, F.binary_cross_entropy_with_logits(logits, hard * 0.8 + 0.1))


def test_fp32_under_bf16_autocast() -> None:
    logits, targets = _batch()
    loss = build_loss(LossConfig(name="focal"))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        value = loss(logits.bfloat16(), targets)
    assert value.dtype == torch.float32
    torch.testing.assert_close(value, loss(logits.bfloat16().float(), targets))


def test_bad_config_and_shapes_rejected() -> None:
    with pytest.raises(ValueError, match="focal, asl, bce"):
        build_loss(LossConfig(name="dice"))
    with pytest.raises(ValueError, match="differ in shape"):
        BCELoss()(torch.zeros(2, 3), torch.zeros(2, 4))
    with pytest.raises(ValueError, match="label_smoothing"):
        BCELoss(label_smoothing=0.5)
