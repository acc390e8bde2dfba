"""Batch augmentation in torch, on the device, for x float (B, K, C, H, W) in [0, 1].

A volume's K slices are treated as K*C channels of one image, so every spatial transform is shared
by all slices of a volume (the slices stay registered to each other, as the attention pooling over
slices expects) and the whole batch is warped by ONE `grid_sample`: a random affine (rotation,
scale, translation, optional left-right flip) as a (B, 2, 3) theta, plus a smooth elastic
displacement (a coarse Gaussian grid upsampled bicubically, in the spirit of Simard et al., ICDAR
2003) added to the affine sampling grid. Then Gaussian blur (separable), brightness / contrast /
gamma, and Gaussian noise. Each augmentation is applied to a sample with its probability.

Every random parameter is drawn from the caller's CPU `torch.Generator` and then moved, so the
parameters (and with them the output, up to float rounding) are the same on any device. The one
exception is the per-pixel noise, drawn on the device from a seed taken from that generator:
identical for the same seed on the same kind of device. Only the selected samples are computed
(index_select / index_copy with indices known on the CPU, so there is no device synchronisation).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from cttrain.config import AugmentConfig


@dataclass
class _Params:
    """Per-sample parameters, on the CPU."""

    affine: torch.Tensor      # (B,) bool
    theta: torch.Tensor       # (B, 2, 3) float, identity where no affine/flip
    elastic: torch.Tensor     # (B,) bool
    coarse: torch.Tensor      # (B, 2, g, g) displacement in normalised units
    blur: torch.Tensor        # (B,) bool
    sigma: torch.Tensor       # (B,)
    intensity: torch.Tensor   # (B,) bool
    brightness: torch.Tensor  # (B,)
    contrast: torch.Tensor    # (B,)
    gamma: torch.Tensor       # (B,)
    noise: torch.Tensor       # (B,) bool
    noise_seed: int


def _uniform(gen: torch.Generator, n: int, lo: float, hi: float) -> torch.Tensor:
    return lo + (hi - lo) * torch.rand(n, generator=gen, dtype=torch.float64)


def _coin(gen: torch.Generator, n: int, p: float) -> torch.Tensor:
    return torch.rand(n, generator=gen) < p


def _theta(angle: torch.Tensor, scale: torch.Tensor, flip: torch.Tensor, tx: torch.Tensor, ty: torch.Tensor,
           h: int, w: int) -> torch.Tensor:
    """(B, 2, 3) output->input maps in `affine_grid`'s normalised coordinates.

    The rotation is built in pixel units and conjugated by the normalisation, so a non-square
    image rotates rigidly instead of shearing."""
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    sign = torch.where(flip, -1.0, 1.0).to(torch.float64)
    theta = torch.zeros(len(angle), 2, 3, dtype=torch.float64)
    theta[:, 0, 0] = cos * sign
    theta[:, 0, 1] = -sin * (h / w)
    theta[:, 1, 0] = sin * sign * (w / h)
    theta[:, 1, 1] = cos
    theta[:, 0, 2] = 2.0 * tx  # a fraction of the image is twice that in [-1, 1] units
    theta[:, 1, 2] = 2.0 * ty
    return theta.float()


def _gaussian_kernels(sigma: torch.Tensor, radius: int) -> torch.Tensor:
    """(B, 2*radius+1) normalised 1-D Gaussian kernels, one per sigma."""
    taps = torch.arange(-radius, radius + 1, dtype=torch.float32)
    kern = torch.exp(-0.5 * (taps[None, :] / sigma.float()[:, None]) ** 2)
    return kern / kern.sum(dim=1, keepdim=True)


def _subset(x: torch.Tensor, mask: torch.Tensor, fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
            ) -> torch.Tensor:
    """Apply fn(x[sel], sel) to the samples where the CPU `mask` is set, leave the rest untouched."""
    if not bool(mask.any()):
        return x
    sel = torch.nonzero(mask).squeeze(1)
    if len(sel) == len(mask):
        return fn(x, sel)
    sel_dev = sel.to(x.device)
    return x.index_copy(0, sel_dev, fn(x.index_select(0, sel_dev), sel))


class DeviceAugment:
    """Random spatial and intensity augmentation of a batch of volumes, vectorised over the batch."""

    def __init__(self, cfg: AugmentConfig) -> None:
        self.cfg = cfg
        self.blur_radius = max(1, math.ceil(3.0 * float(max(cfg.blur_sigma))))

    def draw(self, b: int, h: int, w: int, gen: torch.Generator) -> _Params:
        """All random parameters of one batch, from the CPU generator, in a fixed order."""
        c = self.cfg
        affine = _coin(gen, b, c.p_affine)
        flip = _coin(gen, b, c.hflip)
        angle = torch.deg2rad(_uniform(gen, b, -c.rotate_deg, c.rotate_deg))
        scale = _uniform(gen, b, c.scale[0], c.scale[1])
        tx, ty = _uniform(gen, b, -c.translate, c.translate), _uniform(gen, b, -c.translate, c.translate)
        zero = torch.zeros(b, dtype=torch.float64)
        theta = _theta(torch.where(affine, angle, zero), torch.where(affine, scale, zero + 1.0), flip,
                       torch.where(affine, tx, zero), torch.where(affine, ty, zero), h, w)
        g = max(2, int(c.elastic_grid))
        return _Params(
            affine=affine | flip, theta=theta,
            elastic=_coin(gen, b, c.p_elastic),
            coarse=torch.randn(b, 2, g, g, generator=gen) * (2.0 * c.elastic_alpha),
            blur=_coin(gen, b, c.p_blur), sigma=_uniform(gen, b, c.blur_sigma[0], c.blur_sigma[1]),
            intensity=_coin(gen, b, c.p_intensity),
            brightness=_uniform(gen, b, -c.brightness, c.brightness),
            contrast=_uniform(gen, b, 1.0 - c.contrast, 1.0 + c.contrast),
            gamma=_uniform(gen, b, c.gamma[0], c.gamma[1]),
            noise=_coin(gen, b, c.p_noise),
            noise_seed=int(torch.randint(0, 2**62, (1,), generator=gen)),
        )

    def __call__(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """x float (B, K, C, H, W) in [0, 1] -> augmented, same shape, clamped to [0, 1]."""
        if not self.cfg.enabled:
            return x
        b, k, c, h, w = x.shape
        p = self.draw(b, h, w, generator)
        y = x.reshape(b, k * c, h, w)
        y = _subset(y, p.affine | p.elastic, lambda t, s: self._warp(t, p, s))
        y = _subset(y, p.blur, lambda t, s: self._blur(t, p.sigma[s]))
        y = _subset(y, p.intensity, lambda t, s: self._intensity(t, p, s, c))
        y = _subset(y, p.noise, lambda t, s: self._noise(t, p.noise_seed))
        if not bool((p.affine | p.elastic | p.blur | p.intensity | p.noise).any()):
            return x  # nothing selected: the input, untouched (and never modified in place)
        return y.clamp_(0.0, 1.0).view(b, k, c, h, w)

    # ---- the individual steps (t holds only the selected samples) ------------------------------
    def _warp(self, t: torch.Tensor, p: _Params, sel: torch.Tensor) -> torch.Tensor:
        n, _, h, w = t.shape
        theta = p.theta[sel].to(t.device, t.dtype)
        grid = F.affine_grid(theta, [n, 1, h, w], align_corners=False)
        if bool(p.elastic[sel].any()):
            coarse = p.coarse[sel] * p.elastic[sel].float()[:, None, None, None]
            disp = F.interpolate(coarse.to(t.device, t.dtype), size=(h, w), mode="bicubic", align_corners=True)
            grid = grid + disp.permute(0, 2, 3, 1)
        # Border padding: the image edge is air or table, and air is not 0 in every window (the lung
        # window maps -1000 HU to about 0.23), so zeros would paint artificial black corners.
        return F.grid_sample(t, grid, mode="bilinear", padding_mode="border", align_corners=False)

    def _blur(self, t: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        n, ch, h, w = t.shape
        r = self.blur_radius
        kern = _gaussian_kernels(sigma, r).to(t.device, t.dtype).repeat_interleave(ch, dim=0)
        flat = t.reshape(1, n * ch, h, w)
        # Depthwise conv with one kernel per (sample, channel): per-sample sigmas in one call (on CPU
        # measured faster than a loop over taps or grouping by sample with channels as the batch).
        flat = F.conv2d(F.pad(flat, (r, r, 0, 0), mode="reflect"), kern[:, None, None, :], groups=n * ch)
        flat = F.conv2d(F.pad(flat, (0, 0, r, r), mode="reflect"), kern[:, None, :, None], groups=n * ch)
        return flat.view(n, ch, h, w)

    def _intensity(self, t: torch.Tensor, p: _Params, sel: torch.Tensor, channels: int) -> torch.Tensor:
        """Contrast about each window's mean (so it does not also shift brightness), then an
        additive brightness, then gamma on the clamped result."""
        n, kc, h, w = t.shape
        v = t.view(n, kc // channels, channels, h * w)
        mean = v.mean(dim=(1, 3), keepdim=True)
        gain = p.contrast[sel].to(t.device, t.dtype).view(n, 1, 1, 1)
        shift = p.brightness[sel].to(t.device, t.dtype).view(n, 1, 1, 1)
        gamma = p.gamma[sel].to(t.device, t.dtype).view(n, 1, 1, 1)
        out = torch.addcmul(mean * (1.0 - gain) + shift, v, gain).clamp_(0.0, 1.0).pow_(gamma)
        return out.view(n, kc, h, w)

    def _noise(self, t: torch.Tensor, seed: int) -> torch.Tensor:
        gen = torch.Generator(device=t.device).manual_seed(seed)
        noise = torch.randn(t.shape, generator=gen, device=t.device, dtype=t.dtype)
        return torch.add(t, noise, alpha=self.cfg.noise_std)


# ---------------------------------------------------------------------------------- MixUp / CutMix


def _beta(alpha: float, gen: torch.Generator) -> float:
    # torch's Beta sampler takes no generator; a numpy Generator seeded from ours keeps it reproducible.
    seed = int(torch.randint(0, 2**62, (1,), generator=gen))
    return float(np.random.default_rng(seed).beta(alpha, alpha))


def mix_batch(x: torch.Tensor, y: torch.Tensor, cfg: AugmentConfig, generator: torch.Generator
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """With probability `mixup_p`, mix the batch with a permutation of itself.

    MixUp (Zhang et al., "mixup: Beyond Empirical Risk Minimization", ICLR 2018, arXiv:1710.09412):
    x = lam*x + (1-lam)*x[perm], lam ~ Beta(a, a). CutMix (Yun et al., "CutMix: Regularization
    Strategy to Train Strong Classifiers with Localizable Features", ICCV 2019, arXiv:1905.04899):
    a box of area ~(1-lam) of every slice is pasted from the partner volume, and lam becomes the
    kept area. Used instead of MixUp with probability 0.5 when both are on. Multi-hot targets
    are mixed with the same lam: y = lam*y + (1-lam)*y[perm] (soft targets for BCE-type losses)."""
    use_mix, use_cut = cfg.mixup_alpha > 0, cfg.cutmix_alpha > 0
    if not cfg.enabled or not (use_mix or use_cut) or x.shape[0] < 2:
        return x, y
    if float(torch.rand(1, generator=generator)) >= cfg.mixup_p:
        return x, y
    cut = use_cut and (not use_mix or float(torch.rand(1, generator=generator)) < 0.5)
    lam = _beta(cfg.cutmix_alpha if cut else cfg.mixup_alpha, generator)
    perm = torch.randperm(x.shape[0], generator=generator).to(x.device)
    if cut:
        x, lam = _cutmix(x, perm, lam, generator)
    else:
        x = torch.lerp(x[perm], x, lam)
    y = torch.lerp(y[perm], y, lam)
    return x, y


def _cutmix(x: torch.Tensor, perm: torch.Tensor, lam: float, gen: torch.Generator) -> tuple[torch.Tensor, float]:
    h, w = x.shape[-2:]
    ratio = math.sqrt(1.0 - lam)
    ch, cw = int(h * ratio), int(w * ratio)
    cy, cx = (int(v) for v in torch.randint(0, 2**31, (2,), generator=gen))
    cy, cx = cy % h, cx % w
    y0, y1 = max(cy - ch // 2, 0), min(cy + ch // 2, h)
    x0, x1 = max(cx - cw // 2, 0), min(cx + cw // 2, w)
    out = x.clone()
    out[..., y0:y1, x0:x1] = x[..., y0:y1, x0:x1][perm]
    return out, 1.0 - (y1 - y0) * (x1 - x0) / float(h * w)


__all__ = ["DeviceAugment", "mix_batch"]
