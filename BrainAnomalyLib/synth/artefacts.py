"""Acquisition artefacts. They change the whole image but are not lesions, so their masks are empty: a detector
that flags them is producing false positives, which is what benchmarking them measures."""

from __future__ import annotations

from typing import Tuple

import numpy as np
import SimpleITK as sitk
from scipy import fft

from .noise import fractal_noise
from .tissue import Geometry

ROUNDOFF = 1e-5


def _phase_axis(rng: np.random.Generator) -> int:
    """A numpy axis (1 = y, 2 = x) standing for the in-plane phase-encode direction of an axial acquisition."""
    return int(rng.choice([1, 2]))


def _back_to_image(kspace: np.ndarray, original: np.ndarray) -> np.ndarray:
    """Scanners show magnitude images; keep signed data (already normalised volumes) signed."""
    image = fft.ifftn(kspace, workers=-1)
    out = np.abs(image) if float(original.min()) >= 0 else image.real
    # Single-precision FFT round-off (~1e-6 of the peak) would fill an empty background with specks that
    # no one could see but that make files ten times larger; clear what is below that level.
    out[np.abs(out) < ROUNDOFF * float(np.abs(out).max())] = 0.0
    return out.astype(np.float32)


def bias(array: np.ndarray, geo: Geometry, rng: np.random.Generator) -> Tuple[np.ndarray, dict]:
    """Smooth multiplicative receive-coil field, up to about +-20 % over the head."""
    strength = float(rng.uniform(0.1, 0.2))
    extent_mm = np.array(geo.shape) * np.array(geo.spacing_zyx)
    scale_vox = 0.5 * extent_mm.max() / np.array(geo.spacing_zyx)
    field = np.exp(strength * fractal_noise(array.shape, rng, scale_vox, octaves=2)).astype(np.float32)
    return (array * field).astype(np.float32), {"strength": round(strength, 4),
                                                 "field_min": round(float(field.min()), 4),
                                                 "field_max": round(float(field.max()), 4)}


def ghosting(array: np.ndarray, geo: Geometry, rng: np.random.Generator) -> Tuple[np.ndarray, dict]:
    """N/2 (Nyquist) ghost: odd phase-encode lines carry a gain and phase error c (eddy currents, physiological
    modulation), which puts an attenuated copy of the head half a field of view away.

    Scaling odd k-space lines by 1 + c is, in image space, exactly (1 + c/2) x - (c/2) x shifted by N/2 (the
    alternating sign (-1)^k is a half-FOV shift), so it is computed there: no FFT round-off in the background.
    """
    axis = _phase_axis(rng)
    error = float(rng.uniform(0.15, 0.4))
    phase = float(rng.uniform(0, 2 * np.pi))
    c = error * np.exp(1j * phase)
    x = array.astype(np.float64)
    ghost = np.roll(x, array.shape[axis] // 2, axis=axis)
    image = (1.0 + c / 2.0) * x - (c / 2.0) * ghost
    out = np.abs(image) if float(array.min()) >= 0 else image.real
    return out.astype(np.float32), {"phase_axis": "zyx"[axis], "line_error": round(error, 4),
                                    "ghost_amplitude": round(error / 2, 4), "phase_rad": round(phase, 4)}


def motion(array: np.ndarray, geo: Geometry, rng: np.random.Generator) -> Tuple[np.ndarray, dict]:
    """Sudden head movement during the scan: phase-encode lines acquired after it come from a moved head."""
    axis = _phase_axis(rng)
    angles = rng.uniform(-4.0, 4.0, 3)
    shift = rng.uniform(-4.0, 4.0, 3)
    image = sitk.GetImageFromArray(array.astype(np.float32))
    image.SetSpacing(geo.spacing)
    image.SetOrigin(geo.origin)
    image.SetDirection(geo.direction)
    centre = image.TransformContinuousIndexToPhysicalPoint([(s - 1) / 2.0 for s in geo.size])
    move = sitk.Euler3DTransform()
    move.SetCenter(centre)
    move.SetRotation(*[float(a) for a in np.deg2rad(angles)])
    move.SetTranslation([float(v) for v in shift])
    background = float(array.min())
    moved = sitk.GetArrayFromImage(sitk.Resample(image, image, move, sitk.sitkLinear, background, sitk.sitkFloat32))
    k_still = fft.fftshift(fft.fftn(array.astype(np.complex64), workers=-1), axes=axis)
    k_moved = fft.fftshift(fft.fftn(moved.astype(np.complex64), workers=-1), axes=axis)
    # Lines are acquired in order across k-space; moving late keeps the centre (contrast) from the still head
    # and corrupts the edges, giving the ringing and blurring of real motion.
    n = array.shape[axis]
    start = int(round(n * rng.uniform(0.6, 0.85)))
    shape = [1, 1, 1]
    shape[axis] = n
    late = (np.arange(n) >= start).reshape(shape)
    kspace = fft.ifftshift(np.where(late, k_moved, k_still), axes=axis)
    out = _back_to_image(kspace, array)
    return out, {"phase_axis": "zyx"[axis], "rotation_deg": [round(float(a), 3) for a in angles],
                 "translation_mm": [round(float(v), 3) for v in shift], "first_moved_line": start,
                 "moved_fraction": round((n - start) / n, 4)}


GENERATORS = {"artefact-bias": bias, "artefact-ghosting": ghosting, "artefact-motion": motion}
