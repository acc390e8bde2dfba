"""Heart, mediastinum, vessel and device findings on a real-anatomy background (`ctprep synth
--anatomy`). Same conventions as `ctprep.synth_real_lung`: one painter per label, each drawing
from the label's own generator and counting what it changed in `Canvas.painted`.

Places come from the background's landmarks (`ctprep.synth_real`): the heart mask, the
descending aorta track, the carina, the midline and the anterior body wall.
"""

from __future__ import annotations

import numpy as np

from ctprep.synth_real_paint import Canvas, block, paint, polyline, spot


def _heart_geometry(cv: Canvas) -> tuple[np.ndarray, np.ndarray] | None:
    """(centre voxel, half extents in mm (z, y, x)) of the current heart mask, or None."""
    if not cv.heart.any():
        return None
    idx = np.argwhere(cv.heart)
    lo, hi = idx.min(axis=0), idx.max(axis=0)
    return idx.mean(axis=0), (hi - lo + 1) * cv.spacing / 2


def cardiomegaly(cv: Canvas, rng: np.random.Generator) -> None:
    """An enlarged heart: a radial expansion by 1.18-1.32x (1.6-2.3x the volume) about the heart's
    centre that fades out over one more heart radius, so the lungs around it are pushed aside.
    The volume and the heart and lung masks are resampled through the same backward map."""
    from scipy import ndimage

    geo = _heart_geometry(cv)
    if geo is None:
        return
    c, half = geo
    k = rng.uniform(1.18, 1.32)
    radius = float(np.cbrt(cv.heart.sum() * np.prod(cv.spacing) * 3 / (4 * np.pi)))
    blk = block(cv, c, (2.2 * radius,) * 3)
    rho = np.sqrt(blk.dz**2 + blk.dy**2 + blk.dx**2)
    t = np.clip((rho - radius) / radius, 0, 1)
    gain = 1 + (k - 1) * (1 - t * t * (3 - 2 * t))  # k inside the heart, 1 beyond two radii
    centre_in_block = np.array([c[a] - blk.sl[a].start for a in range(3)])
    coords = [centre_in_block[a] + np.broadcast_to(off / gain, rho.shape) / cv.spacing[a]
              for a, off in enumerate((blk.dz, blk.dy, blk.dx))]
    before = cv.vol[blk.sl].copy()
    cv.vol[blk.sl] = ndimage.map_coordinates(before, coords, order=1, mode="nearest")
    cv.heart[blk.sl] = ndimage.map_coordinates(cv.heart[blk.sl].astype(np.uint8), coords, order=0, mode="nearest") > 0
    cv.lung[blk.sl] = ndimage.map_coordinates(cv.lung[blk.sl], coords, order=0, mode="nearest")
    cv.count("Cardiomegaly", blk.sl[0], np.abs(cv.vol[blk.sl] - before) > 50)


def pericardial_effusion(cv: Canvas, rng: np.random.Generator) -> None:
    """Fluid (5-20 HU) in the pericardial sac: a 5-14 mm shell around the heart where there was fat
    or lung, in front of the spine (fluid displaces the lung edge outward)."""
    from scipy import ndimage

    geo = _heart_geometry(cv)
    if geo is None:
        return
    c, half = geo
    thick = rng.uniform(5, 14)
    blk = block(cv, c, tuple(h + thick + 3 for h in half))
    dist = ndimage.distance_transform_edt(~cv.heart[blk.sl], sampling=cv.spacing)
    shell = (dist > 0) & (dist <= thick) & (cv.vol[blk.sl] < 10)
    sz, sy = cv.bg.spine[blk.sl[0], 0], blk.sl[1].start + np.arange(blk.shape[1])
    shell &= (sy[None, :] < (sz - 25 / cv.spacing[1])[:, None])[:, :, None]
    paint(cv, "Pericardial effusion", blk.sl, shell, rng.uniform(5, 20))


def hiatal_hernia(cv: Canvas, rng: np.random.Generator) -> None:
    """Stomach above the hiatus: an ellipsoid 3-6 cm wide behind the lower heart and in front of the
    descending aorta, with a 3 mm wall (40 HU), fluid/food (15-30 HU) and an anterior air cap."""
    bg, sp = cv.bg, cv.spacing
    zs = np.flatnonzero(cv.heart.any(axis=(1, 2)))
    if zs.size == 0:
        return
    z = int(zs[0] + rng.uniform(5, 25) / sp[0])
    ay, ax, ar = bg.aorta[min(z, len(bg.aorta) - 1)]
    if not np.isfinite(ay):
        return
    radii = (rng.uniform(18, 30), rng.uniform(15, 24), rng.uniform(18, 30))
    c = np.array([z + 0.5 * radii[0] / sp[0], ay - (ar * sp[1] + radii[1] + 3) / sp[1],
                  bg.mid_x[z] + rng.uniform(0, 15) / sp[2]])
    blk = block(cv, c, tuple(r + 4 for r in radii))
    if blk is None:
        return
    r2 = blk.r2(radii)
    keep = cv.vol[blk.sl] < 150  # not bone, not contrast blood
    paint(cv, "Hiatal hernia", blk.sl, keep & (r2 < 1.25), 40.0)
    air = blk.dy < -radii[1] + 2 * rng.uniform(0.2, 0.45) * radii[1]
    paint(cv, "Hiatal hernia", blk.sl, keep & (r2 < 1), np.where(air, -1000.0, rng.uniform(15, 30)))


# (dz, dy, dx) mm from the carina of the lymph-node stations used (x: + patient left)
_STATIONS = {"subcarinal": (-20, 12, 0), "right paratracheal": (25, 0, -20), "aortopulmonary window": (12, -5, 22),
             "right hilar": (-15, 8, -45), "left hilar": (-20, 8, 45), "prevascular": (28, -35, 5)}


def lymphadenopathy(cv: Canvas, rng: np.random.Generator) -> None:
    """2-5 enlarged nodes (short axis 13-22 mm, 1.1-1.5x longer in z, 30-55 HU) at mediastinal and
    hilar stations around the carina, displacing fat and lung but never the airway lumen or bone."""
    bg, sp = cv.bg, cv.spacing
    names = rng.permutation(list(_STATIONS))[: int(rng.integers(2, 6))]
    for name in names:
        offset = np.add(_STATIONS[str(name)], rng.uniform(-5, 5, 3))
        c = np.array(bg.carina, dtype=float) + offset / sp
        r = rng.uniform(6.5, 11)
        radii = (r * rng.uniform(1.1, 1.5), r, r)
        blk = block(cv, c, tuple(x + 1 for x in radii))
        if blk is None:
            continue
        mask = (blk.r2(radii) < 1) & (cv.vol[blk.sl] < 20) & ~bg.airway[blk.sl]
        paint(cv, "Lymphadenopathy", blk.sl, mask, rng.uniform(30, 55) + (30 if bg.contrast else 0))


def arterial_calcification(cv: Canvas, rng: np.random.Generator) -> None:
    """4-14 plaques (1.5-3 mm radius, 400-1000 HU) on the wall of the descending aorta."""
    track = cv.bg.aorta
    zs = np.flatnonzero(np.isfinite(track[:, 0]))
    if zs.size == 0:
        return
    for z in rng.choice(zs, size=min(zs.size, int(rng.integers(4, 15))), replace=False):
        y, x, r = track[z]
        theta = rng.uniform(0, 2 * np.pi)
        c = np.array([z, y + (r - 0.5) * np.sin(theta), x + (r - 0.5) * np.cos(theta)])
        spot(cv, "Arterial wall calcification", c, rng.uniform(1.5, 3.0), rng.uniform(400, 1000))


def coronary_calcification(cv: Canvas, rng: np.random.Generator) -> None:
    """3-8 calcified plaques (1.2-2.5 mm radius, 350-900 HU) in the epicardial fat just outside the
    front half of the heart's upper two thirds, where the coronary arteries run."""
    from scipy import ndimage

    geo = _heart_geometry(cv)
    if geo is None:
        return
    c, _ = geo
    zs = np.flatnonzero(cv.heart.any(axis=(1, 2)))
    rim = ndimage.binary_dilation(cv.heart, iterations=2) & ~cv.heart & (cv.vol < 0) & (cv.lung == 0)
    rim[: int(zs[0] + (zs[-1] - zs[0]) / 3)] = False
    rim[:, int(c[1]):] = False
    pts = np.argwhere(rim)
    if len(pts) == 0:
        return
    for p in pts[rng.choice(len(pts), size=min(len(pts), int(rng.integers(3, 9))), replace=False)]:
        spot(cv, "Coronary artery wall calcification", p.astype(float), rng.uniform(1.2, 2.5), rng.uniform(350, 900))


def _front(cv: Canvas, z: int, x: float) -> float:
    """y of the anterior skin at slice z, column x (the first body voxel from the front)."""
    col = cv.bg.body[z, :, int(np.clip(x, 0, cv.vol.shape[2] - 1))]
    return float(np.argmax(col)) if col.any() else 0.0


def _sternum(cv: Canvas, z: int, x: float) -> float:
    """y of the centre of the sternum at slice z (the first bone, > 200 HU, within 7 cm behind the
    skin on the midline column), or 15 mm behind the skin when no bone is found there."""
    sp = cv.spacing
    front = _front(cv, z, x)
    col = cv.bg.hu[z, int(front): int(front + 70 / sp[1]), int(np.clip(x, 0, cv.vol.shape[2] - 1))]
    bone = np.flatnonzero(col > 200)
    return front + (bone[0] + 6 / sp[1] if bone.size else 15 / sp[1])


def _venous_path(cv: Canvas, rng: np.random.Generator, side: int) -> list[np.ndarray]:
    """A central line's course: subclavian entry under the clavicle, over the lung apex to the
    superior vena cava right of the trachea, down to the cavo-atrial junction."""
    bg, sp = cv.bg, cv.spacing
    cz, cy, cx = bg.carina
    top = bg.lung_z[1]
    geo = _heart_geometry(cv)
    heart_top = int(np.flatnonzero(cv.heart.any(axis=(1, 2)))[-1]) if geo else int(cz - 30 / sp[0])
    z_entry = int(top - rng.uniform(5, 20) / sp[0])
    x_entry = bg.mid_x[z_entry] + side * rng.uniform(50, 75) / sp[2]
    entry = np.array([z_entry, _front(cv, z_entry, x_entry) + 18 / sp[1], x_entry])
    bend = np.array([top - 30 / sp[0], cy - 20 / sp[1], bg.mid_x[z_entry] + side * 30 / sp[2]])
    svc = np.array([cz, cy - 18 / sp[1], cx - 22 / sp[2]])
    caj = np.array([heart_top - 10 / sp[0], cy - 15 / sp[1], cx - 25 / sp[2]])
    return [entry, bend, svc, caj]


def medical_material(cv: Canvas, rng: np.random.Generator) -> None:
    """One of: a central venous catheter (40 %; 2-3 mm, 700-1500 HU) from the subclavian vein to
    the cavo-atrial junction; a chest port (20 %; a 16x28 mm metal chamber under the skin and its
    catheter); a pacemaker (20 %; a 12x44x50 mm can in the left chest wall with leads into the
    right ventricle, 2500-3000 HU); or sternotomy wires (20 %; 4-7 loops around the sternum)."""
    bg, sp = cv.bg, cv.spacing
    kind = str(rng.choice(["catheter", "port", "pacemaker", "wires"], p=[0.4, 0.2, 0.2, 0.2]))
    label = "Medical material"
    if kind == "wires":
        zs = np.flatnonzero(cv.heart.any(axis=(1, 2)))
        lo, hi = (int(zs[0]), int(bg.carina[0] + 30 / sp[0])) if zs.size else (bg.lung_z[0], bg.lung_z[1])
        for z in np.linspace(lo, min(hi, bg.lung_z[1]), int(rng.integers(4, 8))).astype(int):
            x = bg.mid_x[z]
            c = np.array([z, _sternum(cv, z, x), x])
            blk = block(cv, c, (2.0, 9.0, 13.0))
            if blk is not None:
                ring = np.abs(np.sqrt((blk.dx / 11) ** 2 + (blk.dy / 7) ** 2) - 1) < 0.12
                paint(cv, label, blk.sl, ring & (np.abs(blk.dz) <= 1.0), 3000.0)
        return
    side = 1.0 if kind == "pacemaker" else float(rng.choice([-1.0, 1.0]))
    path = _venous_path(cv, rng, int(side))
    if kind in ("port", "pacemaker"):
        z = int(path[0][0] - rng.uniform(10, 25) / sp[0])
        x = path[0][2] + side * 10 / sp[2]
        radii = (8.0, 6.0, 14.0) if kind == "port" else (25.0, 6.0, 22.0)
        c = np.array([z, _front(cv, z, x) + (radii[1] + 4) / sp[1], x])
        blk = block(cv, c, tuple(r + 1 for r in radii))
        if blk is not None:
            paint(cv, label, blk.sl, blk.r2(radii) < 1, 2500.0 if kind == "port" else 3000.0)
        path = [c, *path]
    if kind == "pacemaker":
        geo = _heart_geometry(cv)
        if geo is not None:
            hc, half = geo
            path.append(hc + np.array([-0.4 * half[0], -0.5 * half[1], 0.4 * half[2]]) / sp)
        polyline(cv, label, path, [(1.0, rng.uniform(2500, 3000))])
        return
    polyline(cv, label, path, [(rng.uniform(1.0, 1.5), rng.uniform(700, 1500))])


__all__ = ["arterial_calcification", "cardiomegaly", "coronary_calcification", "hiatal_hernia",
           "lymphadenopathy", "medical_material", "pericardial_effusion"]
