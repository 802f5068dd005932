"""Lesion generators. Each edits a copy of the scan and returns the exact mask of what it changed.

Every generator blends `out = in + w * (target - in)` with weights `w` that are exactly zero outside the mask, so
outside the mask the output is bit-identical to the input (for the tumour: to the input after mass effect).
Work is confined to a box around each lesion so 1 mm scans stay cheap.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence, Tuple

import numpy as np
from scipy import ndimage

from .appearance import BLOB_SHIFT, BLOB_TEXTURE, LESION_TEXTURE, TissueStats, target
from .noise import fractal_noise
from .tissue import Geometry, TissueMaps, lps_to_ras

Box = Tuple[slice, slice, slice]

# BraTS label values.
NECROSIS, OEDEMA, ENHANCING = 1, 2, 4

# x (1 - x^2)^2 peaks at x = 1/sqrt(5) with this value; used to size the mass-effect amplitude.
_BUMP_PEAK = (1 / np.sqrt(5)) * (1 - 1 / 5) ** 2


@dataclass
class LesionEdit:
    array: np.ndarray  # float32, the edited scan (z,y,x)
    mask: np.ndarray  # uint8 labels, 0 where nothing changed
    record: dict
    # Tumour only: (z,y,x,3) LPS mm, ITK convention out(p) = in(p + u(p)); see tumour().
    displacement: Optional[np.ndarray] = None


# ---------------------------------------------------------------------------------------------------- helpers

def _random_rotation(rng: np.random.Generator) -> np.ndarray:
    """Uniform random rotation matrix (from a unit quaternion)."""
    q = rng.standard_normal(4)
    w, x, y, z = q / np.linalg.norm(q)
    return np.array([[1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)],
                     [2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)],
                     [2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)]])


def _pick(options: Sequence[np.ndarray], rng: np.random.Generator) -> np.ndarray:
    """A random voxel (z,y,x) of the first non-empty candidate mask; later masks are looser fallbacks."""
    for candidates in options:
        flat = np.flatnonzero(candidates)
        if flat.size:
            return np.array(np.unravel_index(int(flat[rng.integers(flat.size)]), candidates.shape))
    raise ValueError("no voxel in the brain can hold this lesion")


def _slices(lo: np.ndarray, hi: np.ndarray) -> Box:
    return tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))


def _ellipsoid_radius(points: np.ndarray, centre: np.ndarray, axes: np.ndarray, rot: np.ndarray) -> np.ndarray:
    """Normalised ellipsoid radius (1 on the surface) of points (...,3)."""
    local = (points - centre) @ rot
    return np.sqrt(((local / axes) ** 2).sum(axis=-1))


def _noise_mm(shape, rng: np.random.Generator, geo: Geometry, scale_mm: float, octaves: int = 3) -> np.ndarray:
    return fractal_noise(shape, rng, np.maximum(scale_mm / np.array(geo.spacing_zyx), 1.0), octaves)


def _texture(shape, rng: np.random.Generator, geo: Geometry, weight: np.ndarray, scale_mm: float = 4.0
             ) -> np.ndarray:
    """Texture with zero weighted mean and unit weighted std over the lesion, so amplitudes are in IQRs."""
    tex = _noise_mm(shape, rng, geo, scale_mm).astype(np.float64)
    total = float(weight.sum())
    if total <= 0:
        return tex
    for _ in range(2):  # the second pass re-centres after clipping the rare extremes
        tex -= float((weight * tex).sum()) / total
        std = np.sqrt(float((weight * tex * tex).sum()) / total)
        if std <= 0:
            return tex
        tex = np.clip(tex / std, -3.0, 3.0)
    return tex - float((weight * tex).sum()) / total


def _keep_component(inside: np.ndarray, seed_zyx: Sequence[int]) -> np.ndarray:
    """The connected piece of `inside` that holds the seed voxel, so a lesion is one lesion, not confetti."""
    labels, _ = ndimage.label(inside)
    value = labels[tuple(int(v) for v in seed_zyx)]
    return labels == value if value else inside


def _paint(out: np.ndarray, box: Box, weight: np.ndarray, goal: np.ndarray, stats: TissueStats) -> None:
    """Blend `goal` into `out[box]` by `weight`; voxels with zero weight are not touched at all."""
    region = out[box]
    goal = np.clip(goal, stats.lo, stats.hi)
    blended = (region + weight * (goal - region)).astype(np.float32)
    out[box] = np.where(weight > 0, blended, region)


def _centre_record(geo: Geometry, centre_zyx: np.ndarray) -> list:
    return lps_to_ras(geo.points(np.asarray(centre_zyx, np.float64)[None])[0])


# ------------------------------------------------------------------------------------------------------ blobs

def blob(array: np.ndarray, tissue: TissueMaps, stats: TissueStats, kind: str,
         rng: np.random.Generator) -> LesionEdit:
    """Irregular textured blob: a noise-perturbed ellipsoid, brighter, darker, or same mean with new texture."""
    if kind not in BLOB_SHIFT:
        raise ValueError(f"unknown blob kind {kind!r}")
    geo = tissue.geometry
    radius = float(rng.uniform(6.0, 18.0))
    axes = radius * rng.uniform(0.65, 1.35, 3)
    rot = _random_rotation(rng)
    reach = float(axes.max())
    centre = _pick([tissue.brain & ~tissue.csf & (tissue.depth_mm > 0.6 * reach),
                    tissue.brain & (tissue.depth_mm > 0.3 * reach), tissue.brain], rng)
    lo, hi = geo.box_around(centre, 1.4 * reach)
    box = _slices(lo, hi)
    shape = tuple(hi - lo)
    r = _ellipsoid_radius(geo.box_points(lo, hi), geo.points(centre[None].astype(float))[0], axes, rot)
    # Noise on the level set makes the outline lobulated; the soft edge lives entirely inside s > 0.
    s = 1.0 - r + 0.35 * _noise_mm(shape, rng, geo, 0.6 * radius, octaves=2)
    inside = _keep_component((s > 0) & tissue.brain[box], centre - lo)
    weight = np.where(inside, np.clip(s / 0.25, 0.0, 1.0), 0.0)

    region = array[box].astype(np.float64)
    total = float(weight.sum())
    mean_before = float((weight * region).sum() / total)
    tex = _texture(shape, rng, geo, weight)
    amp = BLOB_TEXTURE[kind] * stats.iqr
    shift = float(rng.uniform(*BLOB_SHIFT[kind]))
    out = array.copy()
    if kind == "blob-iso":
        # Adding zero-mean texture (under the blend weights) keeps the lesion's mean exactly where it was.
        goal = region + amp * tex
    else:
        goal = mean_before + shift * stats.iqr + amp * tex
    _paint(out, box, weight, goal, stats)
    mask = np.zeros(array.shape, np.uint8)
    mask[box] = inside.astype(np.uint8)
    record = {"radius_mm": round(radius, 2), "semi_axes_mm": [round(float(a), 2) for a in axes],
              "seed_centre_ras": _centre_record(geo, centre),
              "intensity": {"mean_before": round(mean_before, 6), "shift_iqr": round(shift, 3),
                            "target_mean": round(mean_before + shift * stats.iqr, 6),
                            "texture_iqr": BLOB_TEXTURE[kind]}}
    return LesionEdit(out, mask, record)


# ------------------------------------------------------------------------------------------------------ tumour

def warp(array: np.ndarray, displacement: np.ndarray, geo: Geometry) -> np.ndarray:
    """Apply a displacement field (LPS mm, ITK convention out(p) = in(p + u(p))) with linear interpolation.

    Only voxels with non-zero displacement are resampled; the rest are copied, so the warp is exact there.
    """
    out = array.copy()
    moved = np.any(displacement != 0, axis=-1)
    if not moved.any():
        return out
    idx = np.argwhere(moved)
    source = geo.points(idx) + displacement[moved].astype(np.float64)
    coords = geo.indices(source).T
    out[moved] = ndimage.map_coordinates(array, coords, order=1, mode="nearest").astype(array.dtype)
    return out


def _mass_effect(points: np.ndarray, centre: np.ndarray, amplitude: float, support: float,
                 depth: np.ndarray, taper_mm: float) -> np.ndarray:
    """Pull field (LPS mm) of a radial push away from `centre`.

    Tissue that ends up at distance r came from r - d(r) with d(r) = A x (1 - x^2)^2, x = r / support: smooth,
    zero at the centre and beyond `support`, and never folding because d' <= A / support < 1. It fades to zero
    at the brain surface (over `taper_mm`) so the skull and background never move.
    """
    delta = points - centre
    x2 = (delta ** 2).sum(axis=-1) / support ** 2
    # d(r) / r, finite at the centre.
    ratio = np.where(x2 < 1.0, amplitude / support * (1.0 - x2) ** 2, 0.0)
    t = np.clip(depth / taper_mm, 0.0, 1.0)
    fade = t * t * (3.0 - 2.0 * t)
    return (-(ratio * fade)[..., None] * delta).astype(np.float32)


def tumour(array: np.ndarray, tissue: TissueMaps, stats: TissueStats, modality: str,
           rng: np.random.Generator) -> LesionEdit:
    """Glioma-like tumour: necrotic core (1), enhancing rim (4) and oedema (2), after mass effect.

    The returned displacement is in physical LPS mm with components (x, y, z) stored as a (z,y,x,3) array, in
    ITK's convention: the output at point p is the input at p + u(p) (so u points towards the tumour centre,
    the tissue there having been pushed outwards). sitk.DisplacementFieldTransform of it, given to
    sitk.Resample, reproduces the warp.
    """
    geo = tissue.geometry
    radius = float(rng.uniform(8.0, 16.0))  # outer radius of the enhancing rim
    axes = radius * rng.uniform(0.8, 1.2, 3)
    rot = _random_rotation(rng)
    core_frac = float(rng.uniform(0.45, 0.75))
    oedema_mm = float(rng.uniform(6.0, 16.0))
    max_disp = float(rng.uniform(0.25, 0.5)) * radius
    support = 2.2 * radius
    amplitude = max_disp / _BUMP_PEAK
    taper = max(8.0, 2.0 * max_disp)
    reach = float(axes.max())
    depth = tissue.depth_mm
    centre = _pick([tissue.brain & (tissue.wm > 0.5) & (depth > max(reach + 5.0, 0.6 * support)),
                    tissue.brain & (depth > reach + 5.0), tissue.brain & (depth > 0.5 * reach), tissue.brain], rng)
    lo, hi = geo.box_around(centre, max(support, 1.4 * (reach + oedema_mm)) + 1.0)
    box = _slices(lo, hi)
    shape = tuple(hi - lo)
    points = geo.box_points(lo, hi)
    centre_lps = geo.points(centre[None].astype(float))[0]

    displacement = np.zeros(array.shape + (3,), np.float32)
    displacement[box] = _mass_effect(points, centre_lps, amplitude, support, depth[box], taper)
    warped = warp(array, displacement, geo)
    wm = warp(tissue.wm, displacement, geo)[box]
    gm = warp(tissue.gm, displacement, geo)[box]

    r = _ellipsoid_radius(points, centre_lps, axes, rot)
    brain = tissue.brain[box]
    seed = centre - lo
    s_tumour = 1.0 - r + 0.25 * _noise_mm(shape, rng, geo, 0.5 * radius, octaves=2)
    solid = _keep_component((s_tumour > 0) & brain, seed)
    core = solid & (core_frac - r + 0.15 * _noise_mm(shape, rng, geo, 0.4 * radius, octaves=2) > 0)
    # Vasogenic oedema spreads along white matter and stays out of CSF.
    r_oedema = r * radius / (radius + oedema_mm)
    s_oedema = (1.0 - r_oedema + 0.3 * _noise_mm(shape, rng, geo, 0.7 * radius, octaves=3)
                + 0.3 * (wm - 0.5))
    oedema = (s_oedema > 0) & brain & ~solid & (wm + gm > 0.2)
    oedema = _keep_component(oedema | solid, seed) & ~solid

    labels = np.zeros(shape, np.uint8)
    labels[oedema] = OEDEMA
    labels[solid] = ENHANCING
    labels[core] = NECROSIS
    weight = np.where(solid, 1.0, np.where(oedema, 0.85 * np.clip(s_oedema / 0.3, 0.0, 1.0), 0.0))
    labels[weight <= 0] = 0

    goals = {NECROSIS: target(stats, modality, "necrosis"), ENHANCING: target(stats, modality, "enhancing"),
             OEDEMA: target(stats, modality, "oedema")}
    region = warped[box].astype(np.float64)
    goal = region.copy()
    for label, value in goals.items():
        goal[labels == label] = value
    # A slight blur joins the compartments smoothly; it cannot leak out because the weight is zero there.
    goal = ndimage.gaussian_filter(goal, 0.5)
    goal += LESION_TEXTURE * stats.iqr * _texture(shape, rng, geo, (labels > 0).astype(float), 3.0)
    out = warped
    _paint(out, box, weight, goal, stats)
    mask = np.zeros(array.shape, np.uint8)
    mask[box] = labels
    actual = float(np.sqrt((displacement[box].astype(np.float64) ** 2).sum(axis=-1)).max())
    record = {"radius_mm": round(radius, 2), "semi_axes_mm": [round(float(a), 2) for a in axes],
              "core_fraction": round(core_frac, 3), "oedema_extent_mm": round(oedema_mm, 2),
              "seed_centre_ras": _centre_record(geo, centre), "labels": {"necrosis": NECROSIS, "oedema": OEDEMA,
                                                                         "enhancing": ENHANCING},
              "intensity": {"necrosis": round(goals[NECROSIS], 6), "enhancing": round(goals[ENHANCING], 6),
                            "oedema": round(goals[OEDEMA], 6), "oedema_blend": 0.85,
                            "texture_iqr": LESION_TEXTURE},
              "mass_effect": {"displacement_max_mm": round(actual, 3), "support_mm": round(support, 2),
                              "convention": "ITK pull field, LPS mm: out(p) = in(p + u(p))"}}
    return LesionEdit(out, mask, record, displacement)


# ------------------------------------------------------------------------------------------------------ MS

def ms(array: np.ndarray, tissue: TissueMaps, stats: TissueStats, modality: str,
       rng: np.random.Generator) -> LesionEdit:
    """3-8 small ovoid lesions (2-8 mm) in periventricular white matter."""
    geo = tissue.geometry
    n = int(rng.integers(3, 9))
    wm, depth, near = tissue.wm, tissue.depth_mm, tissue.ventricle_distance_mm
    options = [tissue.brain & (wm > 0.7) & (near <= 12.0) & (depth > 10.0),
               tissue.brain & (wm > 0.5) & (near <= 20.0), tissue.brain & (wm > 0.5), tissue.brain]
    goal_value = target(stats, modality, "ms")
    out = array.copy()
    mask = np.zeros(array.shape, np.uint8)
    lesions = []
    for _ in range(n):
        # Lesion centres sit on voxel centres, so even a 2 mm lesion on a coarse grid covers one voxel.
        centre = _pick(options, rng)
        axes = rng.uniform(1.0, 4.0, 3)
        rot = _random_rotation(rng)
        lo, hi = geo.box_around(centre, 1.3 * float(axes.max()) + max(geo.spacing))
        box = _slices(lo, hi)
        shape = tuple(hi - lo)
        r = _ellipsoid_radius(geo.box_points(lo, hi), geo.points(centre[None].astype(float))[0], axes, rot)
        s = 1.0 - r + 0.15 * _noise_mm(shape, rng, geo, 3.0, octaves=1)
        inside = _keep_component((s > 0) & tissue.brain[box], centre - lo)
        weight = np.where(inside, np.clip(s / 0.3, 0.0, 1.0), 0.0)
        goal = goal_value + LESION_TEXTURE * stats.iqr * _texture(shape, rng, geo, weight, 2.0)
        _paint(out, box, weight, goal, stats)
        mask[box] |= inside.astype(np.uint8)
        lesions.append({"centre_ras": _centre_record(geo, centre),
                        "semi_axes_mm": [round(float(a), 2) for a in axes]})
    record = {"n_lesions": n, "lesions": lesions,
              "intensity": {"ms": round(goal_value, 6), "texture_iqr": LESION_TEXTURE}}
    return LesionEdit(out, mask, record)


# ------------------------------------------------------------------------------------------------------ stroke

# Territory of the middle cerebral artery in MNI space (RAS mm, right hemisphere; mirrored for the left): a cone
# from the M1 segment near the insula base, opening laterally and a little upwards over the lateral cortex.
MCA_APEX_RAS = (22.0, 2.0, -8.0)
MCA_AXIS_RAS = (1.0, 0.0, 0.45)


def _affine_of(transform) -> Tuple[np.ndarray, np.ndarray]:
    """(M, b) with transform(p) = M p + b, read off by transforming four points (any affine sitk transform)."""
    o = np.array(transform.TransformPoint((0.0, 0.0, 0.0)))
    cols = [np.array(transform.TransformPoint(tuple(float(v) for v in e))) - o for e in np.eye(3) * 100.0]
    return np.stack(cols, axis=1) / 100.0, o


def _tilt(axis: np.ndarray, rng: np.random.Generator, max_deg: float) -> np.ndarray:
    """Axis rotated by a random angle up to max_deg about a random perpendicular direction."""
    perp = np.cross(axis, rng.standard_normal(3))
    perp /= np.linalg.norm(perp)
    angle = np.deg2rad(rng.uniform(0, max_deg))
    out = np.cos(angle) * axis + np.sin(angle) * perp
    return out / np.linalg.norm(out)


def stroke(array: np.ndarray, tissue: TissueMaps, stats: TissueStats, modality: str,
           rng: np.random.Generator) -> LesionEdit:
    """Subacute infarct: a wedge of one hemisphere's MCA territory (GM and WM), hypo on T1, hyper on T2/FLAIR."""
    geo = tissue.geometry
    side = 1.0 if rng.uniform() < 0.5 else -1.0
    apex_ras = np.array(MCA_APEX_RAS) * [side, 1, 1]
    axis_ras = np.array(MCA_AXIS_RAS) * [side, 1, 1]
    axis_ras = _tilt(axis_ras / np.linalg.norm(axis_ras), rng, 25.0)
    half_angle = np.deg2rad(rng.uniform(18.0, 38.0))
    r_min = float(rng.uniform(5.0, 25.0))
    flip = np.array([-1.0, -1.0, 1.0])  # RAS <-> LPS
    apex, axis = apex_ras * flip, axis_ras * flip

    # The cone lives in template space; scan voxels are mapped back there through the registration.
    m, b = _affine_of(tissue.template_to_scan)
    to_template_m, to_template_b = np.linalg.inv(m), -np.linalg.inv(m) @ b
    idx = np.argwhere(tissue.brain)
    q = geo.points(idx) @ to_template_m.T + to_template_b
    rel = q - apex
    dist = np.linalg.norm(rel, axis=1)
    cos = (rel @ axis) / np.maximum(dist, 1e-6)
    theta = np.arccos(np.clip(cos, -1, 1))
    coarse = (theta < 1.4 * half_angle + 0.2) & (dist > r_min - 1.0) & (side * -q[:, 0] > 0)
    if not coarse.any():
        raise ValueError("the stroke territory falls outside this scan's brain")
    lo, hi = idx[coarse].min(axis=0), idx[coarse].max(axis=0) + 1
    box = _slices(lo, hi)
    shape = tuple(hi - lo)
    noise = _noise_mm(shape, rng, geo, 15.0, octaves=2)
    sel = idx[coarse]
    local = tuple((sel - lo).T)
    angle_limit = half_angle * (1.0 + 0.3 * noise[local])
    w = (np.clip((angle_limit - theta[coarse]) / 0.12, 0.0, 1.0)
         * np.clip((dist[coarse] - r_min) / 5.0, 0.0, 1.0)
         * np.clip((tissue.gm[tuple(sel.T)] + tissue.wm[tuple(sel.T)] - 0.3) / 0.4, 0.0, 1.0))
    weight = np.zeros(shape)
    weight[local] = w
    if not (weight > 0).any():
        raise ValueError("the stroke territory holds no brain tissue in this scan")
    inside = weight > 0
    goal_value = target(stats, modality, "stroke")
    goal = goal_value + LESION_TEXTURE * stats.iqr * _texture(shape, rng, geo, weight, 4.0)
    out = array.copy()
    _paint(out, box, weight, goal, stats)
    mask = np.zeros(array.shape, np.uint8)
    mask[box] = inside.astype(np.uint8)
    record = {"territory": "MCA", "hemisphere": "right" if side > 0 else "left",
              "apex_template_ras": [round(float(v), 2) for v in apex_ras],
              "axis_template_ras": [round(float(v), 4) for v in axis_ras],
              "half_angle_deg": round(float(np.rad2deg(half_angle)), 2), "start_mm": round(r_min, 2),
              "intensity": {"stroke": round(goal_value, 6), "texture_iqr": LESION_TEXTURE}}
    return LesionEdit(out, mask, record)


