"""A demo case made from the bundled MNI152 template: a hypointense lesion in white matter, a little noise, and
an oblique, anisotropic grid with a non-zero origin, so the demo exercises the whole geometry path."""

from __future__ import annotations

from typing import Sequence, Tuple

import numpy as np
import SimpleITK as sitk

from ..core.template import template_1mm

# A point in right frontal periventricular white matter (RAS mm).
DEMO_LESION_RAS = (24.0, 10.0, 24.0)


def _rotation(angles_deg: Sequence[float]) -> np.ndarray:
    ax, ay, az = np.deg2rad(angles_deg)
    rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
    ry = np.array([[np.cos(ay), 0, np.sin(ay)], [0, 1, 0], [-np.sin(ay), 0, np.cos(ay)]])
    rz = np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]])
    return rz @ ry @ rx


def insert_lesion(image: sitk.Image, centre_ras: Sequence[float], radius_mm: float, contrast: float,
                  seed: int = 0) -> Tuple[sitk.Image, sitk.Image]:
    """Multiply intensities inside a soft-edged, slightly irregular ball by `contrast`; return (image, mask)."""
    rng = np.random.default_rng(seed)
    arr = sitk.GetArrayFromImage(image).astype(np.float32)
    centre_lps = np.array([-centre_ras[0], -centre_ras[1], centre_ras[2]])
    axes = radius_mm * np.array([1.0, 0.8, 0.9]) * (1 + 0.1 * rng.standard_normal(3))
    # The weight is zero beyond r = 1.15, so only the voxels of the ball's bounding box are computed (on the 1 mm
    # template the whole volume took seconds); a displacement of length L moves at most L / spacing voxels per axis.
    spacing = np.array(image.GetSpacing())
    centre_idx = np.array(image.TransformPhysicalPointToContinuousIndex([float(v) for v in centre_lps]))
    reach = 1.15 * np.abs(axes).max() / spacing + 1
    lo = np.clip(np.floor(centre_idx - reach).astype(int), 0, None)  # x, y, z
    hi = np.minimum(np.ceil(centre_idx + reach).astype(int) + 1, image.GetSize())
    mask = np.zeros(arr.shape, np.uint8)
    out = arr.copy()
    if np.all(hi > lo):
        box = tuple(slice(a, b) for a, b in zip(lo[::-1], hi[::-1]))  # z, y, x
        zz, yy, xx = np.indices(tuple(hi[::-1] - lo[::-1]), dtype=np.float64)
        idx = np.stack([xx.ravel() + lo[0], yy.ravel() + lo[1], zz.ravel() + lo[2]], axis=1)
        d = np.array(image.GetDirection()).reshape(3, 3)
        pts = (idx * spacing) @ d.T + np.array(image.GetOrigin())
        r = np.sqrt((((pts - centre_lps) / axes) ** 2).sum(axis=1)).reshape(zz.shape)
        weight = np.clip((1.15 - r) / 0.3, 0.0, 1.0)  # soft edge between r = 0.85 and 1.15
        weight *= arr[box] > 0.05 * arr.max()  # brain only
        out[box] = arr[box] * (1 - weight * (1 - contrast))
        mask[box] = weight >= 0.5
    img = sitk.GetImageFromArray(out.astype(np.float32))
    img.CopyInformation(image)
    m = sitk.GetImageFromArray(mask)
    m.CopyInformation(image)
    return img, m


def oblique_grid(reference: sitk.Image, angles_deg: Sequence[float], spacing: Sequence[float],
                 origin_shift: Sequence[float]) -> sitk.Image:
    """A rotated, anisotropic grid that still covers the whole of `reference`'s field of view."""
    size_mm = np.array(reference.GetSize()) * np.array(reference.GetSpacing())
    rot = _rotation(angles_deg) @ np.array(reference.GetDirection()).reshape(3, 3)
    size = np.ceil(size_mm * 1.15 / np.array(spacing)).astype(int)
    centre = np.array(reference.TransformContinuousIndexToPhysicalPoint(
        [(s - 1) / 2.0 for s in reference.GetSize()])) + np.array(origin_shift)
    origin = centre - rot @ ((size - 1) / 2.0 * np.array(spacing))
    grid = sitk.Image([int(s) for s in size], sitk.sitkFloat32)
    grid.SetSpacing([float(s) for s in spacing])
    grid.SetDirection([float(v) for v in rot.ravel()])
    grid.SetOrigin([float(v) for v in origin])
    return grid


def head_motion(angles_deg: Sequence[float], shift_mm: Sequence[float]) -> sitk.Transform:
    """A rigid move of the head in the scanner (maps scan points to template points)."""
    t = sitk.Euler3DTransform()
    t.SetRotation(*np.deg2rad(angles_deg))
    t.SetTranslation([float(v) for v in shift_mm])
    return t


def make_demo_case(angles_deg=(8.0, -5.0, 12.0), spacing=(1.2, 1.0, 1.5), origin_shift=(7.0, -11.0, 5.0),
                   motion_deg=(4.0, -3.0, 6.0), motion_mm=(5.0, -4.0, 3.0), centre_ras=DEMO_LESION_RAS,
                   radius_mm: float = 10.0, contrast: float = 0.55, noise: float = 0.02,
                   seed: int = 0) -> Tuple[sitk.Image, sitk.Image]:
    """(T1 scan, lesion mask) on the same oblique grid, intensities in a scanner-like 0..1000 range.

    The head is moved rigidly away from the template position, so detection has to register it back.
    """
    base = template_1mm("T1") * 1000.0
    lesioned, truth = insert_lesion(base, centre_ras, radius_mm, contrast, seed)
    grid = oblique_grid(base, angles_deg, spacing, origin_shift)
    motion = head_motion(motion_deg, motion_mm)
    scan = sitk.Resample(lesioned, grid, motion, sitk.sitkLinear, 0.0, sitk.sitkFloat32)
    truth = sitk.Resample(truth, grid, motion, sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8)
    arr = sitk.GetArrayFromImage(scan)
    rng = np.random.default_rng(seed + 1)
    brain = arr > 0
    arr = np.where(brain, np.maximum(arr + noise * 1000.0 * rng.standard_normal(arr.shape), 0), 0)
    out = sitk.GetImageFromArray(arr.astype(np.float32))
    out.CopyInformation(scan)
    return out, truth
