"""Paint a synthetic chest CT in HU: normal anatomy in a fixed order, with hook points for findings.

Order (later paint wins): table, body wall, mediastinal fat, abdomen below the diaphragm, lungs
(parenchyma -> `parenchyma` hooks -> vessels), airways, `lung` hooks, heart and great vessels,
bones, `final` hooks. Noise, the reconstruction kernel and the reconstruction circle are added by
`synth.render_hu`; the geometry lives in `synth_anatomy` and `synth_geometry`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from ctprep.synth_anatomy import Scene, cavity_rho2, dome_height, lung_inside, lung_view
from ctprep.synth_geometry import (
    Grid,
    Point,
    View,
    ellipsoid_q,
    paint,
    paint_tube,
    smooth_field,
    smoothstep,
    splat_tubes,
)

FAT_HU = -95.0
AIR_HU = -1000.0


@dataclass
class Canvas:
    """The volume being painted plus the lung block that findings work on."""

    vol: np.ndarray
    grid: Grid
    scene: Scene
    lv: View | None = None
    lung: np.ndarray | None = None          # bool over lv
    par: np.ndarray | None = None           # parenchyma HU over lv (before vessels)
    vessel_scale: np.ndarray | float = 1.0  # vessel calibre factor over lv; 0 prunes vessels
    _lung_full: np.ndarray | None = field(default=None, repr=False)

    def local(self, center: Point, half: Point) -> tuple[View, tuple[slice, ...]] | None:
        """Block of the lung view around a point, and its slices relative to the lung arrays."""
        v = self.grid.block(center, half)
        if v is None or self.lv is None:
            return None
        pairs = list(zip(v.sl, self.lv.sl, strict=True))
        sl = tuple(slice(max(a.start, b.start), min(a.stop, b.stop)) for a, b in pairs)
        if any(s.stop <= s.start for s in sl):
            return None
        local = tuple(slice(s.start - b.start, s.stop - b.start) for s, (_, b) in zip(sl, pairs, strict=True))
        return self.grid.view(*sl), local

    def lung_full(self) -> np.ndarray:
        """Full-size lung mask (for painting tubes that must stay inside the lung)."""
        if self._lung_full is None:
            self._lung_full = np.zeros(self.vol.shape, dtype=bool)
            if self.lv is not None:
                self._lung_full[self.lv.sl] = self.lung
        return self._lung_full


Hook = Callable[[Canvas], None]


def spot(cv: Canvas, c: Point, r: float, hu: float) -> None:
    """A small bright sphere (calcification); on thick slices it is stretched to one slice and
    dimmed by the same factor (partial volume), so it is never lost between slice centres."""
    rz = max(r, 0.55 * cv.grid.dz)
    v = cv.grid.block(c, (r + 1, r + 1, rz + 1))
    if v is not None:
        base = cv.vol[v.sl]
        paint(cv.vol, v, ellipsoid_q(v, c, (r, r, rz)) < 1, base + (hu - base) * (r / rz))


def render(scene: Scene, grid: Grid, hooks: dict[str, Sequence[Hook]] | None = None) -> np.ndarray:
    """Noise-free HU volume (float32, z-y-x) of `scene` sampled on `grid`."""
    hooks = hooks or {}
    cv = Canvas(np.empty(grid.shape, dtype=np.float32), grid, scene)
    cv.vol[:] = _wall_slice(cv)
    _abdomen(cv)
    _lungs(cv, hooks.get("parenchyma", ()))
    _airways(cv)
    for hook in hooks.get("lung", ()):
        hook(cv)
    _heart(cv)
    for p0, p1, r, hu in great_vessels(scene):
        paint_tube(cv.vol, grid, p0, p1, [(r + 1.5, 45.0), (r, hu)])
    _spine(cv)
    _ribs_and_sternum(cv)
    for hook in hooks.get("final", ()):
        hook(cv)
    return cv.vol


# ------------------------------------------------------------------------------------- body and wall

def _superellipse(x: np.ndarray, y: np.ndarray, a: float, b_ant: float, b_post: float) -> np.ndarray:
    """< 1 inside a rounded-rectangle body outline with a flatter back (patient lies supine)."""
    b = np.where(y < 0, b_ant, b_post)
    return np.abs(x / a) ** 2.4 + np.abs(y / b) ** np.where(y < 0, 2.2, 3.5)


def _wall_slice(cv: Canvas) -> np.ndarray:
    """One axial slice of table, skin, subcutaneous fat, muscle and cavity fill (z-invariant)."""
    an, g = cv.scene.anatomy, cv.grid
    v = g.view(zs=slice(0, 1))
    x, y = v.x[0], v.y[0]
    post = 20 * an.size
    out = np.full(x.shape, AIR_HU, dtype=np.float32)
    if cv.scene.table:  # carbon table top, in the scanner frame (the patient may be rotated on it)
        top = an.b + post + 3 + an.a * abs(g.sin)
        plate = (g.y[:, None] > top) & (g.y[:, None] < top + 6)
        out[plate & (np.abs(g.x[None, :]) < 0.6 * an.a + 90)] = 150.0
    out[_superellipse(x, y, an.a, an.b, an.b + post) < 1] = 30.0
    out[_superellipse(x, y, an.a - 2, an.b - 2, an.b + post - 2) < 1] = FAT_HU
    out[_superellipse(x, y, an.a - an.fat, an.b - an.fat, an.b + post - an.fat) < 1] = 45.0
    out[cavity_rho2(an, x, y) < 1] = FAT_HU + 5
    return out


def _abdomen(cv: Canvas) -> None:
    """Liver, stomach (air anteriorly, supine) and spleen under the domes; other soft tissue ~15 HU."""
    sc, an = cv.scene, cv.scene.anatomy
    z_lo, z_hi = an.z_bot - 200, an.dome(-1) + 5
    v = cv.grid.block((0.0, 0.0, (z_lo + z_hi) / 2), (an.ac, an.bc, (z_hi - z_lo) / 2))
    if v is None:
        return
    below = (cavity_rho2(an, v.x, v.y) < 1) & (v.z < dome_height(an, v.x, v.y))
    liver = v.x < 0.15 * an.ac - 0.35 * v.y
    hu = np.where(liver, sc.contrast.liver, 15.0)
    stomach_c = (0.45 * an.ac, -0.25 * an.bc, an.dome(1) - 40)
    stomach = ellipsoid_q(v, stomach_c, (45.0, 40.0, 40.0)) < 1
    hu = np.where(stomach, np.where(v.y < stomach_c[1] - 15, AIR_HU, 25.0), hu)
    spleen = ellipsoid_q(v, (0.62 * an.ac, 0.45 * an.bc, an.dome(1) - 35), (25.0, 40.0, 45.0), 0.7) < 1
    hu = np.where(spleen & ~liver, sc.contrast.spleen, hu)
    paint(cv.vol, v, below, hu)


# ------------------------------------------------------------------------------------------- lungs

def _lungs(cv: Canvas, parenchyma_hooks: Sequence[Hook]) -> None:
    """Parenchyma -870 (anterior) .. -800 HU (dependent) with mild texture, then the vessel tree
    (only its larger branches where `vessel_scale` is reduced, none where it is 0)."""
    sc, an = cv.scene, cv.scene.anatomy
    lv = lung_view(cv.grid, an)
    if lv is None:
        return
    cv.lv, cv.lung = lv, lung_inside(sc, lv.x, lv.y, lv.z)
    gradient = 70 * smoothstep((lv.y + an.bc) / (2 * an.bc))
    cv.par = -870 + gradient + 12 * smooth_field(an.texture_seed, 14.0, lv)
    for hook in parenchyma_hooks:
        hook(cv)
    paint(cv.vol, lv, cv.lung, cv.par)
    tree = an.vessels
    scale = np.broadcast_to(cv.vessel_scale, cv.lung.shape)
    vessels = splat_tubes(cv.grid, tree)[lv.sl] & (scale > 0.9)
    vessels |= splat_tubes(cv.grid, tree[tree[:, 6] >= 2.0])[lv.sl] & (scale > 0.3)
    paint(cv.vol, lv, vessels & cv.lung, (sc.contrast.aorta + sc.contrast.right_heart) / 2)


def _airways(cv: Canvas) -> None:
    """Trachea and bronchial tree: air lumen inside a soft-tissue wall; small bronchi stay in lung."""
    sc = cv.scene
    for p0, p1, r, gen in sc.anatomy.airways:
        if gen == 5 and sc.airway_dilation == 1.0:
            continue  # 5th-generation bronchi are below CT resolution unless dilated
        wall = (2.5 if gen == 0 else 0.6 + 0.18 * r) * sc.airway_wall
        if gen >= 3 and sc.airway_dilation > 1:  # lumen stops tapering; walls mildly thickened
            r *= sc.airway_dilation ** ((gen - 2) / 3)
            wall = max(wall, 1.6)
        where = cv.lung_full() if gen >= 3 else None
        paint_tube(cv.vol, cv.grid, p0, p1, [(r + wall, 45.0), (r, AIR_HU)], where)


# --------------------------------------------------------------------------------- heart and vessels

def _heart(cv: Canvas) -> None:
    """Pericardium, effusion (if any), epicardial fat, myocardium and blood pools (left/right heart
    split by the septal plane, so arterial-phase contrast differs between them)."""
    sc, an = cv.scene, cv.scene.anatomy
    c, r = sc.heart()
    pad = sc.heart_pad()
    v = cv.grid.block(c, tuple(ri + pad + 2 for ri in r))
    if v is None:
        return
    cavity = cavity_rho2(an, v.x, v.y) < 1

    def grow(d: float) -> Point:
        return tuple(ri + d for ri in r)

    paint(cv.vol, v, cavity & (ellipsoid_q(v, c, grow(pad), an.heart_angle) < 1), 30.0)
    if sc.pericardial_mm > 0:
        paint(cv.vol, v, cavity & (ellipsoid_q(v, c, grow(pad - 1.5), an.heart_angle) < 1), 12.0)
    paint(cv.vol, v, cavity & (ellipsoid_q(v, c, grow(3.0), an.heart_angle) < 1), FAT_HU)
    paint(cv.vol, v, cavity & (ellipsoid_q(v, c, r, an.heart_angle) < 1), sc.contrast.myocardium)
    pool = cavity & (ellipsoid_q(v, c, tuple(0.7 * ri for ri in r), an.heart_angle) < 1)
    septal = -(v.x - c[0]) * math.sin(an.heart_angle) + (v.y - c[1]) * math.cos(an.heart_angle)
    paint(cv.vol, v, pool, np.where(septal > -0.1 * r[1], sc.contrast.aorta, sc.contrast.right_heart))


def _bezier(p0: Point, c: Point, p1: Point, n: int) -> list[Point]:
    t = np.linspace(0, 1, n)[:, None]
    pts = (1 - t) ** 2 * np.array(p0) + 2 * t * (1 - t) * np.array(c) + t**2 * np.array(p1)
    return [tuple(float(v) for v in p) for p in pts]


def aorta_path(scene: Scene) -> list[tuple[Point, Point, float]]:
    """Aortic centreline as segments (p0, p1, radius): root, ascending, arch, descending."""
    an = scene.anatomy
    c, r = scene.heart()
    xd, yd, rd = an.desc_aorta
    root = (c[0] - 0.35 * r[0], c[1] + 0.05 * r[1], c[2] + 0.6 * r[2])
    asc_top = (-0.1 * an.ac, -0.22 * an.bc, an.z_arch - 5)
    desc_top = (xd, yd, an.z_arch - 5)
    arch = _bezier(asc_top, (0.0, 0.1 * an.bc, an.z_arch + 30), desc_top, 7)
    pts = [root, *arch, (0.6 * xd, yd - 5, an.z_bot - 120)]
    return [(pts[i], pts[i + 1], an.aorta_r if i < 4 else rd) for i in range(len(pts) - 1)]


def great_vessels(scene: Scene) -> list[tuple[Point, Point, float, float]]:
    """(p0, p1, radius, lumen HU) of the aorta, its branches, SVC and pulmonary arteries."""
    an, con = scene.anatomy, scene.contrast
    c, r = scene.heart()
    path = aorta_path(scene)
    out = [(p0, p1, rad, con.aorta) for p0, p1, rad in path]
    top = an.z_top + 80
    for i, (dx, rad) in enumerate(((-12.0, 6.5), (0.0, 4.5), (10.0, 5.5))):
        p = path[2 + i][0]
        out.append((p, (p[0] + dx, p[1] - 8, top), rad * an.size, con.aorta))
    out.append(((-0.22 * an.ac, -0.15 * an.bc, top), (-0.2 * an.ac, -0.12 * an.bc, c[2] + 0.5 * r[2]),
                9.0 * an.size, con.right_heart))
    bif = (0.08 * an.ac, -0.05 * an.bc, -8.0)
    outflow = (c[0] - 0.1 * r[0], c[1] - 0.7 * r[1], c[2] + 0.5 * r[2])
    out.append((outflow, bif, 13.0 * an.size, con.right_heart))
    for side in (-1, 1):
        hx, hy, hz = an.hilum(side)
        out.append((bif, (hx, hy - 4, hz + 8), 10.0 * an.size, con.right_heart))
    ys = an.y_spine - 1.35 * an.spine_r - 9
    out.append(((3.0, ys, top), (0.12 * an.ac, ys - 3, an.dome(1) - 20), 7.5 * an.size, 40.0))  # oesophagus
    return out


# --------------------------------------------------------------------------------------------- bones

def _spine(cv: Canvas) -> None:
    """Vertebral bodies (cortical rim, cancellous core, discs every ~28 mm), canal and lamina."""
    an = cv.scene.anatomy
    v = cv.grid.view()
    x, y, z = v.x[0], v.y[0], v.z[:, 0, 0]
    rv = an.spine_r
    d2 = x**2 + (y - an.y_spine) ** 2
    body = d2 < rv**2
    disc = ((z - 7.0) % (28 * an.size)) < 6
    cortex = d2[body] > (rv - 2.5) ** 2
    cv.vol[:, body] = np.where(disc[:, None], 80.0, np.where(cortex[None, :], 750.0, an.bone_hu))
    yc = an.y_spine + rv + 9
    dc2 = x**2 + (y - yc) ** 2
    lamina = ((dc2 < 13**2) & (y > yc - 4)) | ((np.abs(x) < 4) & (y > yc) & (y < yc + 32))
    cv.vol[:, lamina] = 600.0
    cv.vol[:, dc2 < 8**2] = 15.0


def _ribs_and_sternum(cv: Canvas) -> None:
    """Ribs as bands just outside the cavity that slope ~80 mm down from back to front, so an axial
    slice cuts short oblique arcs; costal cartilage anteriorly; the sternum in front."""
    an = cv.scene.anatomy
    v = cv.grid.view()
    x, y, z = v.x[0], v.y[0], v.z[:, 0, 0]
    rho = np.sqrt(cavity_rho2(an, x, y))
    depth = (rho - 1) * (an.ac + an.bc) / 2
    band = (depth > 1) & (depth < 10)
    phi = np.arctan2(np.abs(x[band]) / an.ac, y[band] / an.bc)  # 0 at the spine, pi at the sternum
    drop = 80 * (1 - np.cos(phi)) / 2
    pitch = 24 * an.size
    phase = (z[:, None] - an.z_top - 5 + drop[None, :]) % pitch
    inside = (z[:, None] + drop[None, :] < an.z_top + 15) & (z[:, None] + drop[None, :] > an.z_bot - 30)
    rib = inside & (phase < 11) & (phi[None, :] > 0.18)
    inner = (phase > 2) & (phase < 9) & (np.abs(depth[band] - 5.5) < 2.5)[None, :]
    hu = np.where(phi[None, :] > 2.35, 130.0, np.where(inner, an.bone_hu, 700.0))
    cur = cv.vol[:, band]
    cv.vol[:, band] = np.where(rib & (phi[None, :] < 2.75), hu, cur)
    sternum = (np.abs(x) < 13) & (y > -an.bc - 13) & (y < -an.bc - 1)
    core = (np.abs(x) < 10) & (y > -an.bc - 10) & (y < -an.bc - 4)
    zs = (z > an.z_bot + 0.3 * an.height) & (z < an.z_top - 15)
    sub = cv.vol[zs]
    sub[:, sternum] = 600.0
    sub[:, core] = an.bone_hu
    cv.vol[zs] = sub
