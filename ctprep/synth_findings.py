"""Findings for `ctprep synth`: one draw and one paint function per CT-RATE label.

Geometry is drawn once per patient and label (so a finding stays in place across that patient's
scans) and used only where the scan's label is 1. Shapes follow the definitions of the Fleischner
Society glossary (Hansell et al., "Fleischner Society: glossary of terms for thoracic imaging",
Radiology 2008); HU values are typical CT values chosen here: solid nodule 10-25 mm, 10-50 HU;
ground glass -640..-450 HU with vessels still visible; consolidation 20-45 HU hiding the vessels but
keeping air bronchograms; emphysema -990..-965 HU without vessels; mosaic attenuation as sharply
bounded lobular patches of higher and lower attenuation; septal thickening as a peripheral polygonal
network; plate atelectasis as dense bands; pleural effusion as a dependent fluid crescent (5-20 HU);
calcifications 500-1100 HU; metal 900-3071 HU. Every finding spans several millimetres in every
direction (small bright ones are stretched to one slice and dimmed, as partial volume would), so it
survives resampling to ~3-4 mm voxels.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from statistics import NormalDist
from typing import Any

import numpy as np

from ctprep.synth_anatomy import Anatomy, Contrast, Scene, cavity_rho2, lung_inside
from ctprep.synth_geometry import (
    Point,
    View,
    ellipsoid_q,
    paint,
    paint_tube,
    smooth_field,
    smoothstep,
)
from ctprep.synth_render import Canvas, Hook, aorta_path, spot

# Prevalence per rendered label (each scan draws each label independently).
RENDERED: dict[str, float] = {
    "Medical material": 0.2, "Arterial wall calcification": 0.35, "Cardiomegaly": 0.2,
    "Pericardial effusion": 0.15, "Coronary artery wall calcification": 0.3, "Hiatal hernia": 0.15,
    "Lymphadenopathy": 0.3, "Emphysema": 0.25, "Atelectasis": 0.3, "Lung nodule": 0.4,
    "Lung opacity": 0.35, "Pulmonary fibrotic sequela": 0.25, "Pleural effusion": 0.2,
    "Mosaic attenuation pattern": 0.15, "Peribronchial thickening": 0.2, "Consolidation": 0.2,
    "Bronchiectasis": 0.15, "Interlobular septal thickening": 0.2,
}


def draw_findings(rng_for: Callable[[int], np.random.Generator], an: Anatomy) -> dict[str, Any]:
    """Geometry of every rendered finding; `rng_for(i)` is the generator of label i."""
    from ctprep.naming import LABEL_NAMES

    return {name: _DRAW[name](rng_for(i), an) for i, name in enumerate(LABEL_NAMES) if name in _DRAW}


def scene_with_findings(an: Anatomy, contrast: Contrast, table: bool, flags: dict[str, int],
                        params: dict[str, Any]) -> Scene:
    """The scene, with the findings that change normal structures (heart, airways) applied."""
    def on(name: str, off: float) -> float:
        return params[name] if flags.get(name) else off

    return Scene(an, contrast, table, heart_scale=on("Cardiomegaly", 1.0),
                 pericardial_mm=on("Pericardial effusion", 0.0), airway_dilation=on("Bronchiectasis", 1.0),
                 airway_wall=on("Peribronchial thickening", 1.0))


def finding_hooks(flags: dict[str, int], params: dict[str, Any]) -> dict[str, list[Hook]]:
    """Paint hooks of the positive findings, by render stage."""
    hooks: dict[str, list[Hook]] = {"parenchyma": [], "lung": [], "final": []}
    for name, (stage, fn) in _PAINT.items():
        if flags.get(name):
            hooks[stage].append(functools.partial(fn, params[name]))
    return hooks


# --------------------------------------------------------------------------------------- helpers

def _candidates(rng: np.random.Generator, an: Anatomy, zone: tuple[float, float], n: int = 96) -> np.ndarray:
    """n random points spread over both lungs between fractional heights `zone` (0 base, 1 apex)."""
    u = rng.random((n, 3))
    side = np.where(rng.random(n) < 0.5, -1.0, 1.0)
    z = an.z_bot + (an.z_top - an.z_bot) * (zone[0] + (zone[1] - zone[0]) * u[:, 2])
    return np.stack([side * an.ac * (0.15 + 0.75 * u[:, 0]), an.bc * (-0.8 + 1.6 * u[:, 1]), z], axis=1)


def _inside(scene: Scene, pts: np.ndarray, margin: float, need: int) -> list[Point]:
    """The first `need` candidates whose ball of radius `margin` (probed along the axes) lies in
    lung; the margin shrinks when a small lung (big heart, effusion) leaves too few."""
    for m in (margin, margin / 2, 0.0):
        offsets = np.concatenate([np.zeros((1, 3)), np.eye(3), -np.eye(3)]) * m
        probe = pts[:, None, :] + offsets[None]
        ok = lung_inside(scene, probe[..., 0], probe[..., 1], probe[..., 2]).all(axis=1)
        if ok.sum() >= need:
            break
    return [tuple(float(v) for v in p) for p in pts[ok][:need]]


def _rotate(an_angle: float, u: float, w: float) -> tuple[float, float]:
    return math.cos(an_angle) * u - math.sin(an_angle) * w, math.sin(an_angle) * u + math.cos(an_angle) * w


# ------------------------------------------------------------------------------ mediastinum & heart

def _draw_material(rng: np.random.Generator, an: Anatomy) -> dict:
    return {"kind": str(rng.choice(["wires", "port", "pacemaker"])), "z": rng.uniform(0.0, 1.0, 6),
            "side": -1.0 if rng.random() < 0.3 else 1.0, "count": int(rng.integers(4, 7))}


def _paint_material(p: dict, cv: Canvas) -> None:
    """Sternotomy wires, a chest port with its catheter, or a pacemaker with leads."""
    an, (c, r) = cv.scene.anatomy, cv.scene.heart()
    if p["kind"] == "wires":
        z0, z1 = an.z_bot + 0.35 * an.height, an.z_top - 25
        for u in np.sort(p["z"][: p["count"]]):
            zk = z0 + (z1 - z0) * u
            v = cv.grid.block((0.0, -an.bc - 7, zk), (20.0, 13.0, max(2.0, 0.6 * cv.grid.dz)))
            if v is not None:
                ring = np.abs(np.sqrt((v.x / 17) ** 2 + ((v.y + an.bc + 7) / 10) ** 2) - 1) < 0.11
                paint(cv.vol, v, ring & (np.abs(v.z - zk) <= max(1.5, 0.55 * cv.grid.dz)), 3071.0)
        return
    side = p["side"] if p["kind"] == "port" else 1.0
    device = (side * 0.5 * an.ac, -0.96 * an.b + 9, an.z_top - 15 - 20 * p["z"][0])
    radii = (14.0, 6.0, 14.0) if p["kind"] == "port" else (22.0, 5.5, 19.0)
    v = cv.grid.block(device, tuple(ri + 1 for ri in radii))
    if v is not None:
        paint(cv.vol, v, ellipsoid_q(v, device, radii) < 1, 3071.0)
    ra = (-0.2 * an.ac, -0.15 * an.bc, c[2] + 0.2 * r[2])
    svc = (-0.2 * an.ac, -0.13 * an.bc, an.z_top - 40)
    path = [device, (side * 0.3 * an.ac, -0.55 * an.bc, an.z_top - 5), svc, ra]
    if p["kind"] == "pacemaker":
        path.append((c[0] + 0.3 * r[0], c[1] - 0.5 * r[1], c[2] - 0.4 * r[2]))
    for p0, p1 in zip(path[:-1], path[1:], strict=False):
        paint_tube(cv.vol, cv.grid, p0, p1, [(1.6, 2500.0 if p["kind"] == "pacemaker" else 900.0)])


def _draw_calc(rng: np.random.Generator, an: Anatomy) -> np.ndarray:
    n = int(rng.integers(6, 17))  # columns: position along vessel, angle, radius, HU, vessel
    return np.stack([rng.random(n), rng.uniform(0, 2 * math.pi, n), rng.uniform(2.2, 4.0, n),
                     rng.uniform(500, 1100, n), rng.integers(0, 3, n)], axis=1)


def _paint_aortic_calc(p: np.ndarray, cv: Canvas) -> None:
    """Plaques on the aortic wall: spots at the lumen edge along the centreline."""
    path = aorta_path(cv.scene)
    lengths = np.array([math.dist(a, b) for a, b, _ in path])
    cum = np.concatenate([[0], np.cumsum(lengths)])
    for frac, theta, rad, hu, _ in p:
        i = int(np.clip(np.searchsorted(cum, frac * cum[-1]) - 1, 0, len(path) - 1))
        a, b, r_aorta = path[i]
        t = (frac * cum[-1] - cum[i]) / max(lengths[i], 1e-6)
        d = (np.subtract(b, a)) / max(lengths[i], 1e-6)
        e1 = np.cross(d, [0.0, 0.0, 1.0] if abs(d[2]) < 0.9 else [1.0, 0.0, 0.0])
        e1 /= np.linalg.norm(e1)
        e2 = np.cross(d, e1)
        wall = (r_aorta - 0.5) * (math.cos(theta) * e1 + math.sin(theta) * e2)
        spot(cv, tuple(np.add(a, t * np.subtract(b, a)) + wall), rad, hu)


def _paint_coronary_calc(p: np.ndarray, cv: Canvas) -> None:
    """Spots along the LAD (anterior groove), RCA and LCx (atrioventricular groove) on the heart."""
    an, (c, r) = cv.scene.anatomy, cv.scene.heart()
    for frac, _, rad, hu, vessel in p[: max(3, 2 * len(p) // 3)]:
        azimuth, elevation = [(-1.6 + 0.5 * frac, 0.7 - 1.1 * frac), (-2.0 - 1.4 * frac, 0.3),
                              (-0.7 + 1.4 * frac, 0.35)][int(vessel)]
        u = (r[0] + 1.5) * math.cos(elevation) * math.cos(azimuth)
        w = (r[1] + 1.5) * math.cos(elevation) * math.sin(azimuth)
        dx, dy = _rotate(an.heart_angle, u, w)
        spot(cv, (c[0] + dx, c[1] + dy, c[2] + (r[2] + 1.5) * math.sin(elevation)), rad, hu)


def _draw_hernia(rng: np.random.Generator, an: Anatomy) -> dict:
    return {"radii": (rng.uniform(22, 35), rng.uniform(18, 26), rng.uniform(22, 35)),
            "dz": rng.uniform(5, 25), "air": rng.uniform(0.2, 0.5)}


def _paint_hernia(p: dict, cv: Canvas) -> None:
    """Stomach above the hiatus, behind the heart: wall, fluid/food, an anterior air cap (supine)."""
    an = cv.scene.anatomy
    rx, ry, rz = p["radii"]
    c = (0.05 * an.ac, an.y_spine - 1.35 * an.spine_r - ry - 4, an.dome(1) + p["dz"])
    v = cv.grid.block(c, (rx + 4, ry + 4, rz + 4))
    if v is None:
        return
    xd, yd, rd = an.desc_aorta
    keep = (cv.vol[v.sl] < 150) & ((v.x - xd) ** 2 + (v.y - yd) ** 2 > (rd + 2) ** 2)
    paint(cv.vol, v, keep & (ellipsoid_q(v, c, (rx + 3, ry + 3, rz + 3)) < 1), 45.0)
    inside = keep & (ellipsoid_q(v, c, (rx, ry, rz)) < 1)
    paint(cv.vol, v, inside, np.where(v.y < c[1] - ry + 2 * p["air"] * ry, -1000.0, 22.0))


def _draw_nodes(rng: np.random.Generator, an: Anatomy) -> list:
    k = int(rng.integers(2, 6))
    stations = rng.permutation(6)[:k]
    return [(int(s), rng.uniform(7.5, 13), rng.uniform(1.15, 1.5), rng.uniform(35, 55),
             tuple(rng.uniform(-4, 4, 3))) for s in stations]


def _paint_nodes(p: list, cv: Canvas) -> None:
    """Enlarged mediastinal/hilar nodes (short axis >= 15 mm) in fat or lung, never over vessels."""
    an, con = cv.scene.anatomy, cv.scene.contrast
    yt, rt = an.y_trachea, 8.5 * an.size
    stations = [(-rt - 12, yt - 4, 15.0), (14.0, yt - 14, 5.0), (3.0, yt + 14, -24.0),  # paratracheal, AP
                (0.0, -0.6 * an.bc, 28.0), (-0.3 * an.ac - 4, yt - 2, -34.0),  # window, subcarinal,
                (0.3 * an.ac + 4, yt + 2, -40.0)]  # prevascular, right and left hilar
    for station, radius, elong, hu, jitter in p:
        c = tuple(a + b for a, b in zip(stations[station], jitter, strict=True))
        radii = (radius, radius, radius * elong)
        v = cv.grid.block(c, tuple(ri + 1 for ri in radii))
        if v is not None:
            mask = (ellipsoid_q(v, c, radii) < 1) & (cv.vol[v.sl] < -20)
            paint(cv.vol, v, mask, hu + 0.15 * (con.aorta - 40))


# ----------------------------------------------------------------------------------- lung findings

def _draw_blobs(rng: np.random.Generator, an: Anatomy, zone: tuple[float, float], counts: list[int],
                radius: tuple[float, float], hu: tuple[float, float]) -> dict:
    return {"pts": _candidates(rng, an, zone), "n": int(rng.choice(counts)),
            "radii": rng.uniform(*radius, (3, 3)), "hu": rng.uniform(*hu, 3),
            "seed": int(rng.integers(2**31))}


def _paint_nodule(p: dict, cv: Canvas) -> None:
    """Solid, slightly lobulated nodules (a sphere plus an offset lobe), inside lung only."""
    for k, c in enumerate(_inside(cv.scene, p["pts"], p["radii"][:, 0].max() + 3, p["n"])):
        r = p["radii"][k][0]
        got = cv.local(c, (r + 2, r + 2, r + 2))
        if got is not None:
            v, loc = got
            lobe = (c[0] + 0.45 * r, c[1] - 0.3 * r, c[2] + 0.2 * r)
            mask = (ellipsoid_q(v, c, (r, r, r)) < 1) | (ellipsoid_q(v, lobe, (0.65 * r,) * 3) < 1)
            paint(cv.vol, v, mask & cv.lung[loc], p["hu"][k])


def _irregular(cv: Canvas, p: dict, k: int, c: Point, loc: tuple, v: View) -> np.ndarray:
    r = tuple(p["radii"][k])
    return (ellipsoid_q(v, c, r) + 0.35 * smooth_field(p["seed"] + k, 9.0, v) < 1) & cv.lung[loc]


def _paint_ggo(p: dict, cv: Canvas) -> None:
    """Ground-glass patches with irregular margins; parenchyma only, so vessels stay visible."""
    for k, c in enumerate(_inside(cv.scene, p["pts"], 8.0, p["n"])):
        got = cv.local(c, tuple(p["radii"][k] * 1.4))
        if got is not None:
            v, loc = got
            cv.par[loc] = np.where(_irregular(cv, p, k, c, loc, v), p["hu"][k], cv.par[loc])


def _paint_consolidation(p: dict, cv: Canvas) -> None:
    """Airspace consolidation hiding the vessels, with branching air bronchograms inside."""
    blood = 0.2 * (cv.scene.contrast.aorta - 40)
    for k, c in enumerate(_inside(cv.scene, p["pts"], 10.0, p["n"])):
        got = cv.local(c, tuple(p["radii"][k] * 1.4))
        if got is not None:
            v, loc = got
            region = _irregular(cv, p, k, c, loc, v)
            paint(cv.vol, v, region, p["hu"][k] + blood)
            f1, f2 = (np.abs(smooth_field(p["seed"] + 10 + i, 12.0, v)) for i in range(2))
            bronchi = region & (f1 < 0.13) & (f2 < 0.13) & (ellipsoid_q(v, c, tuple(p["radii"][k])) < 0.75)
            paint(cv.vol, v, bronchi, -920.0)


def _draw_atelectasis(rng: np.random.Generator, an: Anatomy) -> dict:
    out = _draw_blobs(rng, an, (0.05, 0.55), [1, 2, 3], (25, 45), (-60, 30))
    a, tilt = rng.uniform(0, math.pi, 3), rng.uniform(-0.5, 0.5, 3)
    out["normals"] = np.stack([np.cos(a) * np.cos(tilt), np.sin(a) * np.cos(tilt), np.sin(tilt)], axis=1)
    out["half"] = rng.uniform(3, 5.5, 3)
    return out


def _paint_atelectasis(p: dict, cv: Canvas) -> None:
    """Plate (discoid) atelectasis: dense bands 6-11 mm thick, 5-9 cm long, in the lower lungs."""
    for k, c in enumerate(_inside(cv.scene, p["pts"], 8.0, p["n"])):
        radius, n = p["radii"][k][0], p["normals"][k]
        got = cv.local(c, (radius, radius, radius))
        if got is not None:
            v, loc = got
            along = (v.x - c[0]) * n[0] + (v.y - c[1]) * n[1] + (v.z - c[2]) * n[2]
            r2 = (v.x - c[0]) ** 2 + (v.y - c[1]) ** 2 + (v.z - c[2]) ** 2 - along**2
            paint(cv.vol, v, (np.abs(along) < p["half"][k]) & (r2 < radius**2) & cv.lung[loc], p["hu"][k])


def _draw_effusion(rng: np.random.Generator, an: Anatomy) -> dict:
    return {"side": int(rng.choice([-1, 1, 0])), "depth": rng.uniform(25, 60), "extent": rng.uniform(60, 130),
            "hu": rng.uniform(5, 20)}


def _paint_effusion(p: dict, cv: Canvas) -> None:
    """Dependent (posterior) fluid crescent, deepest at the base, tapering upwards."""
    an, v = cv.scene.anatomy, cv.lv
    if v is None:
        return
    wall = an.bc * np.sqrt(np.clip(1 - (v.x / an.ac) ** 2, 0, 1))
    depth = p["depth"] * (1 - smoothstep((v.z - an.z_bot) / p["extent"]))
    side = (v.x * p["side"] >= 0) if p["side"] else np.ones_like(v.x, dtype=bool)
    paint(cv.vol, v, cv.lung & side & (v.y > wall - depth), p["hu"])


def _draw_fibrosis(rng: np.random.Generator, an: Anatomy) -> dict:
    n = 48
    psi, rho = rng.uniform(0, 2 * math.pi, n), rng.uniform(0.75, 0.92, n)
    z = an.z_bot + (an.z_top - an.z_bot) * rng.uniform(0.45, 0.92, n)
    pts = np.stack([rho * an.ac * np.cos(psi), rho * an.bc * np.sin(psi), z], axis=1)
    return {"pts": pts, "n": int(rng.integers(4, 9)), "len": rng.uniform(25, 55, n),
            "r": rng.uniform(3.0, 4.5, n), "hu": rng.uniform(-50, 40, n),
            "jitter": rng.normal(0, 0.35, (n, 3))}


def _paint_fibrosis(p: dict, cv: Canvas) -> None:
    """Fibrotic parenchymal bands: thick linear strands from the pleura towards the hilum."""
    an = cv.scene.anatomy
    ok = [i for i, pt in enumerate(p["pts"]) if lung_inside(cv.scene, *pt)][: p["n"]]
    for i in ok:
        start = p["pts"][i]
        d = np.subtract(an.hilum(1 if start[0] > 0 else -1), start)
        d = d / np.linalg.norm(d) + p["jitter"][i]
        d /= np.linalg.norm(d)
        p0, p1 = tuple(start - 8 * d), tuple(start + p["len"][i] * d)
        paint_tube(cv.vol, cv.grid, p0, p1, [(p["r"][i], p["hu"][i])], cv.lung_full())


# ------------------------------------------------------------------------------ parenchymal patterns

def _draw_texture(rng: np.random.Generator, an: Anatomy) -> dict:
    return {"seed": int(rng.integers(2**31)), "u": rng.random(4)}


def _paint_emphysema(p: dict, cv: Canvas) -> None:
    """Centrilobular (upper-zone) or panlobular (lower-zone) destruction: -990..-965 HU, no vessels."""
    an, v, u = cv.scene.anatomy, cv.lv, p["u"]
    mid = (an.z_top + an.z_bot) / 2
    up = (v.z - mid) / (0.4 * an.height) * (1 if u[0] < 0.65 else -1)
    zone = smoothstep(0.5 + up)
    threshold = NormalDist().inv_cdf(1 - (0.3 + 0.25 * u[1])) + 1.5 * (1 - zone)
    holes = (smooth_field(p["seed"], 8.0 + 3 * u[2], v) > threshold) & cv.lung
    cv.par = np.where(holes, -990 + 25 * u[3], cv.par)
    cv.vessel_scale = np.where(holes, 0.0, cv.vessel_scale)


def _paint_mosaic(p: dict, cv: Canvas) -> None:
    """Geographic lobular patches: higher (+60..+90 HU) and lower (-40..-60 HU) attenuation with
    sharp borders; vessels narrower in the dark (hypoperfused) lobules."""
    u = p["u"]
    bright = smooth_field(p["seed"], 18.0 + 8 * u[0], cv.lv) > 0
    cv.par = cv.par + np.where(bright, 60 + 30 * u[1], -(40 + 20 * u[2]))
    cv.vessel_scale = cv.vessel_scale * np.where(bright, 1.15, 0.6)


def _paint_septal(p: dict, cv: Canvas) -> None:
    """Thickened interlobular septa: a polygonal network (iso-surface of a 12-15 mm field) in the
    outer 25-40 mm of the lower two thirds of the lungs."""
    an, v, u = cv.scene.anatomy, cv.lv, p["u"]
    depth = (1 - np.sqrt(cavity_rho2(an, v.x, v.y))) * (an.ac + an.bc) / 2
    zone = v.z < an.z_bot + (0.6 + 0.3 * u[0]) * an.height
    septa = np.abs(smooth_field(p["seed"], 12.0 + 3 * u[1], v)) < 0.09
    cv.par = np.where(septa & zone & (depth < 25 + 15 * u[2]) & cv.lung, -300 + 150 * u[3], cv.par)


def _scalar(lo: float, hi: float) -> Callable[[np.random.Generator, Anatomy], float]:
    return lambda rng, an: float(rng.uniform(lo, hi))


_DRAW: dict[str, Callable[[np.random.Generator, Anatomy], Any]] = {
    "Medical material": _draw_material,
    "Arterial wall calcification": _draw_calc,
    "Cardiomegaly": _scalar(1.28, 1.45),
    "Pericardial effusion": _scalar(7, 16),
    "Coronary artery wall calcification": _draw_calc,
    "Hiatal hernia": _draw_hernia,
    "Lymphadenopathy": _draw_nodes,
    "Emphysema": _draw_texture,
    "Atelectasis": _draw_atelectasis,
    "Lung nodule": lambda rng, an: _draw_blobs(rng, an, (0.1, 0.9), [1, 1, 2, 3], (5, 12.5), (10, 50)),
    "Lung opacity": lambda rng, an: _draw_blobs(rng, an, (0.1, 0.9), [1, 2, 3], (18, 38), (-640, -450)),
    "Pulmonary fibrotic sequela": _draw_fibrosis,
    "Pleural effusion": _draw_effusion,
    "Mosaic attenuation pattern": _draw_texture,
    "Peribronchial thickening": _scalar(2.8, 4.0),
    "Consolidation": lambda rng, an: _draw_blobs(rng, an, (0.05, 0.7), [1, 1, 2], (28, 50), (20, 45)),
    "Bronchiectasis": _scalar(2.4, 3.2),
    "Interlobular septal thickening": _draw_texture,
}

_PAINT: dict[str, tuple[str, Callable[[Any, Canvas], None]]] = {
    "Emphysema": ("parenchyma", _paint_emphysema),
    "Mosaic attenuation pattern": ("parenchyma", _paint_mosaic),
    "Lung opacity": ("parenchyma", _paint_ggo),
    "Interlobular septal thickening": ("parenchyma", _paint_septal),
    "Atelectasis": ("lung", _paint_atelectasis),
    "Lung nodule": ("lung", _paint_nodule),
    "Consolidation": ("lung", _paint_consolidation),
    "Pulmonary fibrotic sequela": ("lung", _paint_fibrosis),
    "Pleural effusion": ("lung", _paint_effusion),
    "Hiatal hernia": ("final", _paint_hernia),
    "Lymphadenopathy": ("final", _paint_nodes),
    "Arterial wall calcification": ("final", _paint_aortic_calc),
    "Coronary artery wall calcification": ("final", _paint_coronary_calc),
    "Medical material": ("final", _paint_material),
}
