"""Batch augmentation in torch, on the device, for x float (B, K, C, H, W) in [0, 1].

A volume's K slices are treated as K*C channels of one image, so every spatial transform is shared
by all slices of a volume (the slices stay registered to each other, as the attention pooling over
slices expects) and the whole batch is warped by ONE `grid_sample`: a random affine (rotation,
scale, translation, optional left-right flip) as a (B, 2, 3) theta, plus a smooth elastic
displacement (a coarse Gaussian grid upsampled bicubically, in the spirit of Simard et al., ICDAR
2003) added to the affine sampling grid. Then Gaussian blur (separable), brightness / contrast /
gamma, and Gaussian noise. Each augmentation is applied to a sample with its probability.

Every random parameter is drawn from the caller's CPU `torch.Generator`, so the parameters (and
with them the output, up to float rounding) are the same on any device. The one exception is the
per-pixel noise, drawn on the device from a seed taken from that generator: identical for the same
seed on the same kind of device. Only the selected samples are computed (index_select /
index_copy_ with indices known on the CPU). No step synchronises with the device: a batch's
parameters and indices travel in ONE pinned buffer copied with `non_blocking=True` (`upload`); a
pageable `.to(device)` per parameter would be a blocking copy, the first one waiting for the
previous step's backward.

The output keeps the input's memory layout: `cttrain.data.to_device` hands a channels_last batch
(a (B, K, ...) view of a channels-last (B*K, C, H, W) tensor) and the model wants exactly that, so
converting to NCHW here and back in the model would cost two copies of the batch per step.
Selected samples are gathered by index_select (a copy anyway) and written back with index_copy_
into a clone of the batch, which keeps its strides; the pointwise steps run on the 5-D tensor itself.
A step over the whole batch whose kernel only writes NCHW (grid_sample, the blur's convolutions)
is copied back into the batch's layout once, in that step, instead of on every later step.
"""

from __future__ import annotations

import math
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


def upload(parts: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    """`parts` (small CPU tensors) on `device` after ONE host-to-device copy, as views of one buffer.

    Packed as float32 (integers such as batch indices are exact below 2**24), pinned when the
    target is CUDA so that `non_blocking=True` really is asynchronous. The caching host allocator
    keeps the pinned block until the copy has finished, so the buffer may go out of scope here."""
    if not parts:
        return {}
    flat = torch.cat([t.reshape(-1).to(torch.float32) for t in parts.values()])
    if device.type == "cuda":
        flat = flat.pin_memory()
    flat = flat.to(device, non_blocking=True)
    views, start = {}, 0
    for name, t in parts.items():
        views[name] = flat[start:start + t.numel()].view(t.shape)
        start += t.numel()
    return views


def _keep_layout(out: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """`out` with the strides of `like` (a copy only when they differ, e.g. channels_last input)."""
    if out.stride() == like.stride():
        return out
    return torch.empty_like(like).copy_(out)


@dataclass
class _Step:
    """One augmentation of a batch: over all its samples (`whole`) or over those in `{name}.idx`."""

    name: str
    whole: bool


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

    def plan(self, p: _Params) -> tuple[list[_Step], dict[str, torch.Tensor]]:
        """(the steps to run, in order; the CPU parameters they read, keyed `step.param`)."""
        steps: list[_Step] = []
        host: dict[str, torch.Tensor] = {}
        for name, mask in (("warp", p.affine | p.elastic), ("blur", p.blur), ("intensity", p.intensity),
                           ("noise", p.noise)):
            if not bool(mask.any()):
                continue
            sel = torch.nonzero(mask).squeeze(1)
            step = _Step(name, whole=len(sel) == len(mask))
            steps.append(step)
            if not step.whole:
                host[f"{name}.idx"] = sel
            if name == "warp":
                host["warp.theta"] = p.theta[sel]
                if bool(p.elastic[sel].any()):
                    host["warp.coarse"] = p.coarse[sel] * p.elastic[sel].float()[:, None, None, None]
            elif name == "blur":
                host["blur.kernel"] = _gaussian_kernels(p.sigma[sel], self.blur_radius)
            elif name == "intensity":
                for key, values in (("gain", p.contrast), ("shift", p.brightness), ("gamma", p.gamma)):
                    host[f"intensity.{key}"] = values[sel]
        return steps, host

    def __call__(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """x float (B, K, C, H, W) in [0, 1] -> augmented, same shape and strides, clamped to [0, 1]."""
        if not self.cfg.enabled:
            return x
        b, _k, _c, h, w = x.shape
        p = self.draw(b, h, w, generator)
        steps, host = self.plan(p)
        if not steps:
            return x  # nothing selected: the input, untouched (and never modified in place)
        dev = upload(host, x.device)
        apply = {"warp": self._warp, "blur": self._blur, "intensity": self._intensity,
                 "noise": lambda t, _dev: self._noise(t, p.noise_seed)}
        y = x
        for step in steps:
            fn = apply[step.name]
            if step.whole:
                y = _keep_layout(fn(y, dev), y)
            else:
                idx = dev[f"{step.name}.idx"].long()
                y = y.clone().index_copy_(0, idx, fn(y.index_select(0, idx), dev))  # clone keeps strides
        return y.clamp_(0.0, 1.0)

    # ---- the individual steps: t (n, K, C, H, W) holds only the selected samples ----------------
    def _warp(self, t: torch.Tensor, dev: dict[str, torch.Tensor]) -> torch.Tensor:
        n, k, c, h, w = t.shape
        theta = dev["warp.theta"].to(t.dtype)
        grid = F.affine_grid(theta, [n, 1, h, w], align_corners=False)
        if "warp.coarse" in dev:
            disp = F.interpolate(dev["warp.coarse"].to(t.dtype), size=(h, w), mode="bicubic", align_corners=True)
            grid = grid + disp.permute(0, 2, 3, 1)
        # Border padding: the image edge is air or table, and air is not 0 in every window (the lung
        # window maps -1000 HU to about 0.23), so zeros would paint artificial black corners.
        out = F.grid_sample(t.reshape(n, k * c, h, w), grid, mode="bilinear", padding_mode="border",
                            align_corners=False)
        return out.view(n, k, c, h, w)

    def _blur(self, t: torch.Tensor, dev: dict[str, torch.Tensor]) -> torch.Tensor:
        n, k, c, h, w = t.shape
        ch, r = k * c, self.blur_radius
        kern = dev["blur.kernel"].to(t.dtype).repeat_interleave(ch, dim=0)
        flat = t.reshape(1, n * ch, h, w)
        # Depthwise conv with one kernel per (sample, channel): per-sample sigmas in one call (on CPU
        # measured faster than a loop over taps or grouping by sample with channels as the batch).
        flat = F.conv2d(F.pad(flat, (r, r, 0, 0), mode="reflect"), kern[:, None, None, :], groups=n * ch)
        flat = F.conv2d(F.pad(flat, (0, 0, r, r), mode="reflect"), kern[:, None, :, None], groups=n * ch)
        return flat.view(n, k, c, h, w)

    def _intensity(self, t: torch.Tensor, dev: dict[str, torch.Tensor]) -> torch.Tensor:
        """Contrast about each window's mean (so it does not also shift brightness), then an
        additive brightness, then gamma on the clamped result."""
        n, k, c, h, w = t.shape
        v = t.reshape(n, k, c, h * w)  # a view in NCHW and in channels_last alike
        mean = v.mean(dim=(1, 3), keepdim=True)
        gain, shift, gamma = (dev[f"intensity.{key}"].to(t.dtype).view(n, 1, 1, 1)
                              for key in ("gain", "shift", "gamma"))
        out = torch.addcmul(mean * (1.0 - gain) + shift, v, gain).clamp_(0.0, 1.0).pow_(gamma)
        return out.view(n, k, c, h, w)

    def _noise(self, t: torch.Tensor, seed: int) -> torch.Tensor:
        n, k, c, h, w = t.shape
        gen = torch.Generator(device=t.device).manual_seed(seed)
        # drawn as (n, K*C, H, W) in NCHW order: the same numbers at the same pixels whatever t's layout
        noise = torch.randn((n, k * c, h, w), generator=gen, device=t.device, dtype=t.dtype).view(n, k, c, h, w)
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
    perm = upload({"perm": torch.randperm(x.shape[0], generator=generator)}, x.device)["perm"].long()
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


__all__ = ["DeviceAugment", "mix_batch", "upload"]
