"""Seeded fractal value noise in 3D: octaves of random coarse lattices upsampled with cubic interpolation.

Upsampling is separable (one small matrix product per axis) rather than ndimage.zoom, because a cubic zoom of a
200^3 volume costs seconds while three matrix products cost a fraction of one.
"""

from __future__ import annotations

from typing import Sequence, Tuple, Union

import numpy as np

Scale = Union[float, Sequence[float]]


def _cubic_weights(t: np.ndarray) -> np.ndarray:
    """Catmull-Rom weights of the four lattice points around fractional position t (rows sum to one)."""
    t2, t3 = t * t, t * t * t
    return 0.5 * np.stack([-t3 + 2 * t2 - t,
                           3 * t3 - 5 * t2 + 2,
                           -3 * t3 + 4 * t2 + t,
                           t3 - t2], axis=1)


def _upsample_matrix(n_out: int, step: float, phase: float) -> np.ndarray:
    """(n_out, n_lattice) matrix that interpolates a lattice of spacing `step` voxels onto n_out voxels."""
    u = np.arange(n_out) / step + phase
    base = np.floor(u).astype(int)
    weights = _cubic_weights(u - base)
    n_lattice = int(base.max()) + 3 if n_out else 4
    matrix = np.zeros((n_out, n_lattice + 1), np.float32)
    rows = np.arange(n_out)
    for k in range(4):
        # Lattice index base-1..base+2, shifted by one so that base-1 is never negative.
        np.add.at(matrix, (rows, base + k), weights[:, k])
    return matrix


def _octave(shape: Tuple[int, int, int], rng: np.random.Generator, steps: np.ndarray) -> np.ndarray:
    mats = [_upsample_matrix(n, max(float(s), 1e-3), float(rng.uniform())) for n, s in zip(shape, steps)]
    lattice = rng.standard_normal(tuple(m.shape[1] for m in mats)).astype(np.float32)
    out = np.tensordot(mats[0], lattice, axes=(1, 0))  # (z, ly, lx)
    out = np.tensordot(out, mats[1], axes=(1, 1))  # (z, lx, y)
    out = np.tensordot(out, mats[2], axes=(1, 1))  # (z, y, x)
    return out


def fractal_noise(shape: Sequence[int], rng: np.random.Generator, scale_vox: Scale,
                  octaves: int = 3, persistence: float = 0.5) -> np.ndarray:
    """Smooth random texture of `shape` (z,y,x), float32 scaled so that its largest magnitude is exactly 1.

    `scale_vox` is the feature size of the coarsest octave in voxels, one number or one per axis (z,y,x), so
    anisotropic grids can ask for isotropic features in mm. Each further octave halves the feature size and
    multiplies the amplitude by `persistence`. Everything random comes from `rng`.
    """
    shape = tuple(int(s) for s in shape)
    if len(shape) != 3 or min(shape) < 1:
        raise ValueError(f"fractal_noise needs a 3D shape, got {shape}")
    steps = np.broadcast_to(np.asarray(scale_vox, np.float64), (3,)).copy()
    total = np.zeros(shape, np.float32)
    amplitude = 1.0
    for _ in range(max(int(octaves), 1)):
        total += amplitude * _octave(shape, rng, steps)
        amplitude *= persistence
        steps = np.maximum(steps / 2.0, 1.0)
    peak = float(np.abs(total).max())
    return total / peak if peak > 0 else total
