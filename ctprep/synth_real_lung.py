"""Lung findings painted onto a real-anatomy background (`ctprep synth --anatomy`).

Each painter takes the canvas and the label's own random generator and returns nothing; what it
changed is counted in `Canvas.painted`, and a label is 1 only if its painter changed voxels. HU,
sizes and places follow the Fleischner Society glossary (Hansell et al., Radiology 2008) and
typical CT values; the table in README ("Real-anatomy benchmark") lists them. Parenchymal
patterns change only parenchyma (< -500 HU), so the real vessels stay visible through them, as
on real scans; space-occupying findings (consolidation, effusion, nodules) replace everything.
"""

from __future__ import annotations

from statistics import NormalDist

import numpy as np

from ctprep.synth_real_paint import Canvas, block, field3, lung_points, paint, tube

PARENCHYMA_HU = -500.0  # below this a lung voxel is parenchyma, above it a vessel or a wall


def _smoothstep(t: np.ndarray | float) -> np.ndarray:
    t = np.clip(t, 0.0, 1.0)
    return t * t * (3 - 2 * t)


def _lung_box(cv: Canvas, zone: tuple[float, float] = (0.0, 1.0)) -> tuple[tuple[slice, ...], np.ndarray]:
    """Bounding box of the lungs between fractional heights `zone`, and the fractional height (z,1,1)."""
    z0, z1 = cv.bg.lung_z
    lo, hi = int(z0 + zone[0] * (z1 - z0)), int(z0 + zone[1] * (z1 - z0)) + 1
    m = cv.lung[lo:hi] > 0
    ys, xs = np.flatnonzero(m.any(axis=(0, 2))), np.flatnonzero(m.any(axis=(0, 1)))
    sl = (slice(lo, hi), slice(int(ys[0]), int(ys[-1]) + 1), slice(int(xs[0]), int(xs[-1]) + 1))
    height = ((np.arange(lo, hi) - z0) / max(z1 - z0, 1)).astype(np.float32)[:, None, None]
    return sl, height


def pleural_effusion(cv: Canvas, rng: np.random.Generator) -> None:
    """Dependent fluid (0-20 HU) in the pleural space: a layer along the back of one or both lungs,
    15-45 mm deep at the base and tapering to nothing 5-11 cm higher (the meniscus)."""
    sp = cv.spacing
    sides = {0: (1, 2), 1: (1,), 2: (2,)}[int(rng.choice([0, 1, 2], p=[0.3, 0.4, 0.3]))]
    depth, extent, hu = rng.uniform(15, 45), rng.uniform(50, 110), rng.uniform(2, 20)
    for side in sides:
        zs = np.flatnonzero((cv.lung == side).any(axis=(1, 2)))
        if zs.size == 0:
            continue
        z0 = int(zs[0])
        z1 = min(int(zs[-1]) + 1, z0 + int(extent / sp[0]) + 1)
        m = cv.lung[z0:z1] == side
        taper = 1 - _smoothstep((np.arange(z0, z1) - z0) * sp[0] / extent)
        last = m.shape[1] - 1 - np.argmax(m[:, ::-1, :], axis=1)  # (z, x): the lung's back edge
        ys = np.arange(m.shape[1])[None, :, None]
        fluid = m & (ys > last[:, None, :] - (depth * taper / sp[1])[:, None, None])
        noise = rng.normal(0, 3, size=fluid.sum()).astype(np.float32)
        cv.vol[z0:z1][fluid] = hu + noise
        cv.count("Pleural effusion", slice(z0, z1), fluid)


def emphysema(cv: Canvas, rng: np.random.Generator) -> None:
    """Centrilobular (upper zones, 65 %) or panlobular (lower zones) destruction: holes of -995..-970
    HU, 5-9 mm across, covering 15-35 % of the parenchyma of their zone; vessels spared. Half the
    patients also get 1-2 subpleural apical bullae (10-25 mm, no vessels inside)."""
    sl, height = _lung_box(cv)
    upper = rng.random() < 0.65
    zone = _smoothstep((height - 0.3) / 0.5) if upper else _smoothstep((0.7 - height) / 0.5)
    frac = rng.uniform(0.15, 0.35)
    f = field3(rng, cv.vol[sl].shape, cv.spacing, rng.uniform(5, 9), order=1)
    threshold = NormalDist().inv_cdf(1 - frac) + 1.5 * (1 - zone)
    holes = (f > threshold) & (cv.lung[sl] > 0) & (cv.vol[sl] < PARENCHYMA_HU)
    paint(cv, "Emphysema", sl, holes, rng.uniform(-995, -970) + 6 * f)
    if rng.random() < 0.5:
        for c in lung_points(cv, rng, int(rng.integers(1, 3)), zone=(0.75, 1.0), depth_mm=(5, 15)):
            r = rng.uniform(10, 25) / 2
            blk = block(cv, c, (r + 2,) * 3)
            if blk is not None:
                paint(cv, "Emphysema", blk.sl, (blk.r2((r, r, r)) < 1) & (cv.lung[blk.sl] > 0), -1000.0)


def _irregular(cv: Canvas, rng: np.random.Generator, c: np.ndarray, radii: tuple[float, float, float],
               roughness: float = 0.35, cell: float = 12.0):
    """A blob around `c` with a bumpy margin: (block, r2) where r2 < 1 is inside."""
    blk = block(cv, c, tuple(1.4 * r for r in radii))
    if blk is None:
        return None, None
    return blk, blk.r2(radii) + roughness * field3(rng, blk.shape, cv.spacing, cell)


def consolidation(cv: Canvas, rng: np.random.Generator) -> None:
    """1-2 airspace consolidations, 4-8 cm, mostly lower-lobe and dependent: 20-45 HU (+40 HU with
    contrast), hiding the vessels but keeping the air in the real bronchi (air bronchograms)."""
    n = int(rng.choice([1, 1, 2]))
    hu = rng.uniform(20, 45) + (40 if cv.bg.contrast else 0)
    for c in lung_points(cv, rng, n, zone=(0.05, 0.6), depth_mm=(10, 1e9), posterior=0.6):
        blk, r2 = _irregular(cv, rng, c, tuple(rng.uniform(20, 40, 3)))
        if blk is None:
            continue
        region = (r2 < 1) & (cv.lung[blk.sl] > 0) & ~cv.bg.airway[blk.sl]
        paint(cv, "Consolidation", blk.sl, region, hu + rng.normal(0, 4, size=region.shape).astype(np.float32))


def lung_opacity(cv: Canvas, rng: np.random.Generator) -> None:
    """1-3 ground-glass patches, 2.5-6 cm, irregular: the parenchyma rises to -650..-450 HU with a soft
    edge; vessels stay visible through them."""
    n = int(rng.choice([1, 2, 3]))
    for c in lung_points(cv, rng, n, zone=(0.1, 0.9), depth_mm=(5, 1e9)):
        blk, r2 = _irregular(cv, rng, c, tuple(rng.uniform(12, 30, 3)), roughness=0.3)
        if blk is None:
            continue
        target = rng.uniform(-650, -450)
        w = np.clip((1 - r2) * 3, 0, 1)
        region = (w > 0) & (cv.lung[blk.sl] > 0) & (cv.vol[blk.sl] < PARENCHYMA_HU)
        vol = cv.vol[blk.sl]
        paint(cv, "Lung opacity", blk.sl, region, np.maximum(vol, vol + w * (target + 850.0)))


def lung_nodule(cv: Canvas, rng: np.random.Generator) -> None:
    """1-3 solid nodules, 6-20 mm, 15-50 HU, slightly lobulated (a sphere and an offset lobe)."""
    for c in lung_points(cv, rng, int(rng.choice([1, 1, 2, 3])), zone=(0.1, 0.9), depth_mm=(8, 1e9)):
        r = rng.uniform(6, 20) / 2
        blk = block(cv, c, (1.8 * r,) * 3)
        if blk is None:
            continue
        lobe = rng.normal(0, 1, 3)
        lobe = lobe / np.linalg.norm(lobe) * 0.5 * r
        mask = (blk.r2((r, r, r)) < 1) | (((blk.dz - lobe[0]) ** 2 + (blk.dy - lobe[1]) ** 2
                                           + (blk.dx - lobe[2]) ** 2) < (0.65 * r) ** 2)
        paint(cv, "Lung nodule", blk.sl, mask & (cv.lung[blk.sl] > 0), rng.uniform(15, 50))


def atelectasis(cv: Canvas, rng: np.random.Generator) -> None:
    """Plate atelectasis (60 %): 1-2 roughly horizontal bands 5-9 mm thick and 4-8 cm wide in the
    lower lungs; or dependent subsegmental atelectasis: a 3-5 cm wedge at the posterior base.
    -80..+30 HU."""
    hu = rng.uniform(-80, 30)
    if rng.random() < 0.6:
        for c in lung_points(cv, rng, int(rng.integers(1, 3)), zone=(0.05, 0.5), depth_mm=(15, 1e9)):
            radius, half = rng.uniform(20, 40), rng.uniform(2.5, 4.5)
            normal = np.array([1.0, rng.uniform(-0.5, 0.5), rng.uniform(-0.5, 0.5)])
            normal /= np.linalg.norm(normal)
            blk = block(cv, c, (radius,) * 3)
            if blk is None:
                continue
            along = blk.dz * normal[0] + blk.dy * normal[1] + blk.dx * normal[2]
            across = blk.dz**2 + blk.dy**2 + blk.dx**2 - along**2
            mask = (np.abs(along) < half) & (across < radius**2) & (cv.lung[blk.sl] > 0)
            paint(cv, "Atelectasis", blk.sl, mask, hu)
        return
    for c in lung_points(cv, rng, 1, zone=(0.02, 0.3), depth_mm=(0, 12), posterior=0.25):
        blk, r2 = _irregular(cv, rng, c, tuple(rng.uniform(15, 25, 3)), roughness=0.25)
        if blk is not None:
            paint(cv, "Atelectasis", blk.sl, (r2 < 1) & (cv.lung[blk.sl] > 0), hu)


def _hilum(cv: Canvas, side: int) -> np.ndarray:
    """The lung voxel of `side` nearest to a point 2 cm below and 4 cm lateral of the carina."""
    bg, sp = cv.bg, cv.spacing
    cz, cy, cx = bg.carina
    target = np.array([cz - 20 / sp[0], cy + 10 / sp[1], cx + (40 if side == 2 else -40) / sp[2]])
    blk = block(cv, target, (40.0, 60.0, 60.0))
    if blk is None:
        return target
    m = cv.lung[blk.sl] == side
    if not m.any():
        return target
    d2 = blk.dz**2 + blk.dy**2 + blk.dx**2
    j = np.unravel_index(int(np.argmin(np.where(m, d2, np.inf))), m.shape)
    return np.array([s.start + i for s, i in zip(blk.sl, j, strict=True)], dtype=float)


def _outward(cv: Canvas, rng: np.random.Generator, start: np.ndarray, hilum: np.ndarray, length: float,
             jitter: float = 0.3) -> np.ndarray:
    """End point `length` mm from `start`, pointing away from the hilum (with some jitter)."""
    sp = cv.spacing
    d = (start - hilum) * sp
    d = d / (np.linalg.norm(d) + 1e-6) + rng.normal(0, jitter, 3)
    d /= np.linalg.norm(d) + 1e-6
    return start + d * length / sp


def fibrotic_sequela(cv: Canvas, rng: np.random.Generator) -> None:
    """3-8 fibrotic bands (post-infectious scarring): strands 3-6 mm thick, 2-5 cm long, running from
    the pleura of the upper zones towards the hilum, -80..+30 HU."""
    for c in lung_points(cv, rng, int(rng.integers(3, 9)), zone=(0.5, 0.95), depth_mm=(0, 6)):
        side = int(cv.lung[tuple(c)])
        hil = _hilum(cv, side)
        end = _outward(cv, rng, c, 2 * c - hil, rng.uniform(20, 50), jitter=0.35)  # towards the hilum
        tube(cv, "Pulmonary fibrotic sequela", c, end, [(rng.uniform(1.5, 3.0), rng.uniform(-80, 30))],
             where=cv.lung > 0)


def mosaic_attenuation(cv: Canvas, rng: np.random.Generator) -> None:
    """Geographic lobular patches (15-25 mm) of higher (+60..+100 HU) and lower (-40..-70 HU) lung
    attenuation with sharp borders (air trapping or perfusion differences)."""
    sl, _ = _lung_box(cv)
    f = field3(rng, cv.vol[sl].shape, cv.spacing, rng.uniform(15, 25), order=1)
    bright = f > rng.uniform(-0.3, 0.3)
    region = (cv.lung[sl] > 0) & (cv.vol[sl] < PARENCHYMA_HU)
    paint(cv, "Mosaic attenuation pattern", sl, region,
          cv.vol[sl] + np.where(bright, rng.uniform(60, 100), -rng.uniform(40, 70)))


def septal_thickening(cv: Canvas, rng: np.random.Generator) -> None:
    """Thickened interlobular septa: a polygonal network of 1-2 mm lines (-350..-150 HU) outlining
    10-14 mm lobules in the outer 15-30 mm of the lower two thirds of the lungs."""
    sl, height = _lung_box(cv, (0.0, rng.uniform(0.55, 0.8)))
    f = field3(rng, cv.vol[sl].shape, cv.spacing, rng.uniform(10, 14), order=1)
    periphery = cv.bg.lung_depth[sl] < rng.uniform(15, 30)
    lines = (np.abs(f) < 0.09) & periphery & (cv.lung[sl] > 0) & (cv.vol[sl] < PARENCHYMA_HU)
    paint(cv, "Interlobular septal thickening", sl, lines, np.maximum(cv.vol[sl], rng.uniform(-350, -150)))


def peribronchial_thickening(cv: Canvas, rng: np.random.Generator) -> None:
    """Thick bronchial walls: the real airways inside the lungs get a 1.5-3 mm soft-tissue cuff, and
    10-16 bronchi of normal calibre (3-5 mm lumen) with 2-3 mm walls radiate from both hila
    through the middle and lower lungs ("tram tracks")."""
    from scipy import ndimage

    bg, sp = cv.bg, cv.spacing
    wall_hu = rng.uniform(-40, 30)
    steps = max(1, int(round(rng.uniform(1.5, 3.0) / sp[1])))
    cuff = ndimage.binary_dilation(bg.airway, iterations=steps) & ~bg.airway & (cv.lung > 0)
    paint(cv, "Peribronchial thickening", (slice(None),) * 3, cuff & (cv.vol < PARENCHYMA_HU), wall_hu)
    for side in (1, 2):
        hil = _hilum(cv, side)
        for c in lung_points(cv, rng, int(rng.integers(5, 9)), zone=(0.1, 0.7), depth_mm=(15, 1e9), side=side):
            lumen, wall = rng.uniform(1.5, 2.5), rng.uniform(2.0, 3.0)
            end = _outward(cv, rng, c, hil, rng.uniform(25, 45))
            tube(cv, "Peribronchial thickening", c, end, [(lumen + wall, wall_hu), (lumen, -950.0)],
                 where=cv.lung > 0)


def bronchiectasis(cv: Canvas, rng: np.random.Generator) -> None:
    """Cylindrical bronchiectasis in one lower lobe: 3-7 non-tapering bronchi with 6-11 mm air lumens
    (wider than the accompanying artery: the signet-ring sign) and 1-2 mm walls, 3-6 cm long."""
    side = int(rng.integers(1, 3))
    hil = _hilum(cv, side)
    wall_hu = rng.uniform(-20, 40)
    for c in lung_points(cv, rng, int(rng.integers(3, 8)), zone=(0.05, 0.5), depth_mm=(20, 1e9), side=side):
        lumen, wall = rng.uniform(3.0, 5.5), rng.uniform(1.0, 2.0)
        end = _outward(cv, rng, c, hil, rng.uniform(30, 60))
        tube(cv, "Bronchiectasis", c, end, [(lumen + wall, wall_hu), (lumen, -990.0)], where=cv.lung > 0)


__all__ = ["atelectasis", "bronchiectasis", "consolidation", "emphysema", "fibrotic_sequela", "lung_nodule",
           "lung_opacity", "mosaic_attenuation", "peribronchial_thickening", "pleural_effusion",
           "septal_thickening"]
