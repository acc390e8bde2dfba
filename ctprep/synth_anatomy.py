"""Normal chest anatomy for `ctprep synth`: one patient's body, airway and vessel trees, the lungs.

Patient frame: x = y = 0 is the body centre, z = 0 the carina (see `synth_geometry`). HU targets
follow standard CT attenuation values: air -1000, lung -870..-800 (denser posteriorly), fat -100,
muscle and unenhanced blood 40, liver 55, cancellous bone ~250, cortical bone ~750; contrast phases
raise blood to 150-380 HU.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import numpy as np

from ctprep.synth_geometry import Grid, Point, View, ellipsoid_xyz, smoothstep


@dataclass(frozen=True, eq=False)  # holds arrays: compared by identity
class Anatomy:
    """One patient's body (kept across that patient's scans)."""

    size: float
    a: float       # body half-width (x), mm
    b: float       # body half-depth, anterior (y < 0)
    fat: float     # subcutaneous fat thickness
    muscle: float  # chest-wall muscle thickness (ribs sit in its inner part)
    height: float  # lung height, apex to posterior costophrenic recess
    heart_r: Point
    heart_angle: float
    aorta_r: float
    spine_r: float
    bone_hu: float  # cancellous bone
    texture_seed: int
    airways: tuple[tuple[Point, Point, float, int], ...]  # p0, p1, lumen radius, generation
    vessels: np.ndarray  # (n, 7) pulmonary vessel segments: x0, y0, z0, x1, y1, z1, radius

    @property
    def ac(self) -> float:  # thoracic cavity half-axes (inside ribs)
        return self.a - self.fat - self.muscle - 10

    @property
    def bc(self) -> float:
        return self.b - self.fat - self.muscle - 10

    @property
    def z_top(self) -> float:
        return 0.32 * self.height

    @property
    def z_bot(self) -> float:
        return -0.68 * self.height

    def dome(self, side: int) -> float:
        """Height of the right (-1) or left (+1) hemidiaphragm dome; the liver lifts the right one."""
        return self.z_bot + (0.35 if side < 0 else 0.30) * self.height

    @property
    def y_spine(self) -> float:
        return self.bc - 0.35 * self.spine_r

    @property
    def y_trachea(self) -> float:
        return self.y_spine - 1.35 * self.spine_r - 28

    @property
    def desc_aorta(self) -> tuple[float, float, float]:
        r = 0.8 * self.aorta_r
        return 0.9 * self.spine_r + 0.7 * r, self.y_spine - 0.9 * self.spine_r, r

    @property
    def z_arch(self) -> float:
        return 0.13 * self.height

    def hilum(self, side: int) -> Point:
        return (side * 0.28 * self.ac, self.y_trachea + 10, -22.0 if side < 0 else -30.0)


def draw_anatomy(rng: np.random.Generator) -> Anatomy:
    """A random adult chest: size and build, organ sizes, bronchial and pulmonary vessel trees."""
    size = rng.uniform(0.85, 1.15)
    a, b = 160 * size * rng.uniform(0.92, 1.08), 115 * size * rng.uniform(0.9, 1.1)
    fat, muscle = rng.uniform(5, 28) * size, rng.uniform(8, 14)
    height = rng.uniform(220, 270) * (0.85 + 0.15 * size)
    heart_r = tuple(float(v) for v in np.array([60, 45, 50]) * size * rng.uniform(0.92, 1.08, 3))
    anat = Anatomy(size, a, b, fat, muscle, height, heart_r, -math.radians(rng.uniform(25, 45)),
                   rng.uniform(13, 17) * size, rng.uniform(17, 21) * size, rng.uniform(160, 300),
                   int(rng.integers(2**31)), (), np.zeros((0, 7)))
    airways = _airway_tree(rng, anat)
    vessels = _vessel_tree(rng, Scene(anat, Contrast("none", 40, 40, 40, 55, 45)))
    return dataclasses.replace(anat, airways=airways, vessels=vessels)


# Root directions of the pulmonary vessel trees (x is mirrored for the left lung).
_VESSEL_ROOTS = ((0.3, 0.0, 0.95), (0.7, -0.2, 0.6), (0.9, 0.0, 0.0), (0.5, -0.8, 0.0), (0.4, 0.8, -0.3),
                 (0.5, 0.2, -0.85), (0.6, -0.5, -0.6))


def _unit(v: np.ndarray) -> np.ndarray:
    return v / np.linalg.norm(v, axis=-1, keepdims=True)


def _vessel_tree(rng: np.random.Generator, scene: Scene) -> np.ndarray:
    """Pulmonary arteries and veins: from each hilum, seven roots that branch for eight generations
    (one child continues, one turns off thinner), tapering from ~4.5 mm radius to ~1 mm, bending
    away from the hilum; branches that leave the lung are pruned. Vectorised per generation; rows
    are (x0, y0, z0, x1, y1, z1, radius)."""
    an = scene.anatomy
    tips, dirs, hila = [], [], []
    for side in (-1, 1):
        hx, hy, hz = an.hilum(side)
        for dy, dz in ((-6.0, 0.0), (6.0, -25.0)):  # artery beside the bronchus, vein lower
            for d in _VESSEL_ROOTS:
                tips.append((hx + side * 6, hy + dy, hz + dz))
                dirs.append((side * d[0], d[1], d[2]))
                hila.append((hx, hy, hz))
    tips, dirs, hila = np.array(tips), _unit(np.array(dirs, dtype=float)), np.array(hila)
    radius = np.full(len(tips), 4.5 * an.size)
    out = []
    for gen in range(8):
        ends = tips + dirs * (26 * 0.83**gen * rng.uniform(0.8, 1.2, len(tips)))[:, None]
        mid = (tips + ends) / 2
        keep = lung_inside(scene, *ends.T) & (lung_inside(scene, *mid.T) | (gen == 0))
        out.append(np.concatenate([tips[keep], ends[keep], radius[keep, None]], axis=1))
        tips, dirs, hila, radius = (np.repeat(a[keep], 2, axis=0) for a in (ends, dirs, hila, radius))
        perp = rng.standard_normal(dirs.shape)
        perp = _unit(perp - (perp * dirs).sum(1, keepdims=True) * dirs)
        main = np.arange(len(dirs)) % 2 == 0  # even children continue, odd ones turn off thinner
        turn = np.where(main, rng.uniform(0.1, 0.3, len(dirs)), rng.uniform(0.5, 0.9, len(dirs)))
        dirs = _unit(np.cos(turn)[:, None] * dirs + np.sin(turn)[:, None] * perp + 0.25 * _unit(tips - hila))
        radius = radius * np.where(main, 0.85, 0.7)
    return np.concatenate(out).astype(np.float32)


def _airway_tree(rng: np.random.Generator, an: Anatomy) -> tuple:
    """Trachea, main bronchi and a random dichotomous tree (lobar to 5th generation) per lobe."""
    carina = (0.0, an.y_trachea + 4, 0.0)
    segs = [((0.0, an.y_trachea, an.z_top + 80), carina, 8.5 * an.size, 0)]
    for side in (-1, 1):
        hil = an.hilum(side)
        segs.append((carina, hil, (6.5 if side < 0 else 6.0) * an.size, 1))
        for lobe in ((side * 0.45, 0.1, 0.9), (side * 0.35, 0.45, -0.8), (side * 0.6, -0.65, -0.35)):
            _branch(rng, segs, hil, _unit(np.array(lobe)), 4.6 * an.size, 2)
    return tuple(segs)


def _branch(rng: np.random.Generator, segs: list, p0: Point, direction: np.ndarray, r: float,
            gen: int) -> None:
    p1 = tuple(float(v) for v in np.add(p0, direction * rng.uniform(22, 34) * 0.88 ** (gen - 2)))
    segs.append((tuple(float(v) for v in p0), p1, r, gen))
    if gen == 5:
        return
    for sign in (-1, 1):
        perp = rng.standard_normal(3)
        perp -= (perp @ direction) * direction
        angle = sign * rng.uniform(0.35, 0.6)
        child = math.cos(angle) * direction + math.sin(angle) * perp / np.linalg.norm(perp)
        _branch(rng, segs, p1, child / np.linalg.norm(child), r * 0.72, gen + 1)


@dataclass(frozen=True)
class Contrast:
    """Blood and organ HU of the contrast phase (none, arterial, venous)."""

    phase: str
    aorta: float
    right_heart: float  # right heart, pulmonary arteries, SVC
    myocardium: float
    liver: float
    spleen: float


def draw_contrast(rng: np.random.Generator) -> Contrast:
    """No contrast (45 %), arterial (30 %: bright aorta and left heart) or venous phase (25 %)."""
    phase = str(rng.choice(["none", "arterial", "venous"], p=[0.45, 0.3, 0.25]))
    u = rng.uniform(0, 1, 5)
    if phase == "arterial":
        return Contrast(phase, 250 + 130 * u[0], 150 + 150 * u[1], 90 + 20 * u[2], 65 + 15 * u[3],
                        100 + 30 * u[4])
    if phase == "venous":
        blood = 140 + 40 * u[0]
        return Contrast(phase, blood, blood - 10 * u[1], 90 + 20 * u[2], 100 + 25 * u[3], 110 + 20 * u[4])
    blood = 35 + 15 * u[0]
    return Contrast(phase, blood, blood, 38 + 10 * u[2], 50 + 12 * u[3], 42 + 8 * u[4])


@dataclass(frozen=True)
class Scene:
    """What one scan shows: the patient's anatomy plus scan-level state (contrast, global findings)."""

    anatomy: Anatomy
    contrast: Contrast
    table: bool = True
    heart_scale: float = 1.0     # cardiomegaly
    pericardial_mm: float = 0.0  # pericardial effusion thickness
    airway_dilation: float = 1.0  # bronchiectasis: lumen scale of the 5th generation (no tapering)
    airway_wall: float = 1.0      # peribronchial thickening: wall thickness scale

    def heart(self) -> tuple[Point, Point]:
        """Centre and radii; an enlarged heart grows leftwards, backwards and up from the diaphragm."""
        an, k = self.anatomy, self.heart_scale
        r = (an.heart_r[0] * k, an.heart_r[1] * k, an.heart_r[2] * (1 + 0.4 * (k - 1)))
        c = (0.18 * an.ac + 0.35 * (r[0] - an.heart_r[0]), -0.3 * an.bc + 0.4 * (r[1] - an.heart_r[1]),
             an.dome(1) + 0.7 * r[2])
        return c, r

    def heart_pad(self) -> float:
        """Epicardial fat + effusion + pericardium around the myocardium, mm."""
        return 3.0 + self.pericardial_mm + 1.5


def cavity_rho2(an: Anatomy, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Squared normalised radius of the thoracic cavity (< 1 inside the ribs)."""
    return (x / an.ac) ** 2 + (y / an.bc) ** 2


def dome_height(an: Anatomy, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """z of the diaphragm under (x, y): highest over each dome, lowest in the posterior recesses."""
    dome = np.where(x < 0, an.dome(-1), an.dome(1))
    bowl = ((np.abs(x) - 0.45 * an.ac) / (0.6 * an.ac)) ** 2 + ((y + 0.1 * an.bc) / an.bc) ** 2
    return dome - (dome - an.z_bot) * bowl


def lung_inside(scene: Scene, x: np.ndarray, y: np.ndarray, z: np.ndarray) -> np.ndarray:
    """Analytic lung mask (broadcastable inputs): the cavity under the apical caps and above the
    diaphragm, minus the mediastinum (a midline band, wide above the heart and behind it), the
    spine, the descending aorta and the heart with its pericardial layers. Used for voxels and for
    placing findings at points."""
    an = scene.anatomy
    cap = ((np.abs(x) - 0.5 * an.ac) / (0.5 * an.ac)) ** 2 + ((y - 0.15 * an.bc) / an.bc) ** 2
    out = (cavity_rho2(an, x, y) < 1) & (z < an.z_top - 0.35 * an.height * cap) & (z > dome_height(an, x, y))
    c, r = scene.heart()
    upper = smoothstep((z - c[2] - r[2] + 20) / 40) * (1 - smoothstep((z - an.z_top + 15) / 30))
    out &= np.abs(x) > 3 + 24 * upper + 14 * smoothstep((y - 0.2 * an.bc) / (0.3 * an.bc))
    out &= x**2 + (y - an.y_spine) ** 2 > (an.spine_r + 5) ** 2
    xd, yd, rd = an.desc_aorta
    out &= ((x - xd) ** 2 + (y - yd) ** 2 > (rd + 3) ** 2) | (z > an.z_arch)
    pad = scene.heart_pad() + 1
    return out & (ellipsoid_xyz(x, y, z, c, tuple(ri + pad for ri in r), an.heart_angle) > 1)


def lung_view(grid: Grid, an: Anatomy) -> View | None:
    """The block that contains both lungs."""
    zc = (an.z_top + an.z_bot) / 2
    return grid.block((0.0, 0.0, zc), (an.ac, an.bc, (an.z_top - an.z_bot) / 2 + 25))
