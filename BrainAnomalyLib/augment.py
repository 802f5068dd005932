"""Training augmentation that mimics other scanners and protocols, so models (and their calibration) do not
learn one site's look: gamma and contrast changes, bias fields, noise levels, thick-slice acquisition, and a small
affine jitter applied to the image and its mask together (masks stay aligned).

Intensity transforms act inside the brain only (the background stays as standardisation left it); the affine is
the only geometric one and moves image and mask with one draw.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Tuple

import numpy as np
from scipy import ndimage


@dataclass
class AugmentConfig:
    prob: float = 0.5  # chance of each transform
    gamma: Tuple[float, float] = (0.7, 1.5)
    contrast: Tuple[float, float] = (0.85, 1.2)
    bias_coeff: float = 0.15
    noise_std: Tuple[float, float] = (0.0, 0.08)  # relative to the brain's intensity spread
    thick_slice: Tuple[float, float] = (2.0, 3.5)  # acquired slice thickness / grid spacing
    rotate_deg: float = 4.0
    translate_vox: float = 2.0
    scale: float = 0.04

    def to_dict(self) -> dict:
        return asdict(self)


def thick_slice(image: np.ndarray, factor: float, axis: int, rng: np.random.Generator) -> np.ndarray:
    """Simulate a thick-slice acquisition along `axis`: blur with the slice profile, sample every `factor`
    voxels, interpolate back to the grid."""
    sigma = [0.0, 0.0, 0.0]
    sigma[axis] = factor / 2.355  # slice profile FWHM = thickness
    blurred = ndimage.gaussian_filter(image, sigma, mode="nearest")
    n = image.shape[axis]
    start = rng.uniform(0, factor)
    positions = np.arange(start, n, factor)
    if positions.size < 2:
        return blurred
    sampled = np.take(blurred, np.round(positions).astype(int).clip(0, n - 1), axis=axis)
    coords = np.interp(np.arange(n), positions, np.arange(positions.size))
    grid = np.indices(image.shape, dtype=np.float64)
    grid[axis] = coords.reshape([-1 if a == axis else 1 for a in range(3)]) * np.ones(image.shape)
    return ndimage.map_coordinates(sampled, grid, order=1, mode="nearest").astype(np.float32)


class Augmenter:
    """Seeded random augmentation of (image, mask) grid volumes (z,y,x)."""

    def __init__(self, config: AugmentConfig = AugmentConfig(), seed: int = 0) -> None:
        self.config = config
        self.rng = np.random.default_rng(seed)

    def __call__(self, image: np.ndarray, mask: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
        c, rng = self.config, self.rng
        out = image.astype(np.float32).copy()
        inside = out[mask]
        lo, hi = np.percentile(inside, [0.5, 99.5])
        spread = max(float(hi - lo), 1e-6)
        if rng.random() < c.prob:  # gamma on the brain's own 0..1 range, then back
            u = np.clip((out - lo) / spread, 0, None)
            out = np.where(mask, lo + spread * u ** rng.uniform(*c.gamma), out)
        if rng.random() < c.prob:
            centre = float(np.median(out[mask]))
            out = np.where(mask, centre + (out - centre) * rng.uniform(*c.contrast), out)
        if rng.random() < c.prob:
            out = np.where(mask, out * self._bias_field(out.shape, rng), out)
        if rng.random() < c.prob:
            out = thick_slice(out, rng.uniform(*c.thick_slice), int(rng.integers(0, 3)), rng)
        if rng.random() < c.prob:
            noise = rng.normal(0.0, rng.uniform(*c.noise_std) * spread, out.shape).astype(np.float32)
            out = np.where(mask, out + noise, out)
        if rng.random() < c.prob:
            out, mask = self._affine(out, mask, rng)
        background = float(out[mask].min()) if mask.any() else 0.0
        out = np.where(mask, out, background).astype(np.float32)
        return out, mask

    def _bias_field(self, shape, rng) -> np.ndarray:
        coarse = rng.normal(0.0, self.config.bias_coeff, (3, 3, 3))
        field = ndimage.zoom(coarse, np.array(shape) / 3.0, order=3)[: shape[0], : shape[1], : shape[2]]
        return np.exp(field).astype(np.float32)

    def _affine(self, image, mask, rng):
        c = self.config
        angles = np.deg2rad(rng.uniform(-c.rotate_deg, c.rotate_deg, 3))
        rx = np.array([[1, 0, 0], [0, np.cos(angles[0]), -np.sin(angles[0])], [0, np.sin(angles[0]), np.cos(angles[0])]])
        ry = np.array([[np.cos(angles[1]), 0, np.sin(angles[1])], [0, 1, 0], [-np.sin(angles[1]), 0, np.cos(angles[1])]])
        rz = np.array([[np.cos(angles[2]), -np.sin(angles[2]), 0], [np.sin(angles[2]), np.cos(angles[2]), 0], [0, 0, 1]])
        matrix = rz @ ry @ rx * rng.uniform(1 - c.scale, 1 + c.scale)
        centre = (np.array(image.shape) - 1) / 2.0
        offset = centre - matrix @ centre + rng.uniform(-c.translate_vox, c.translate_vox, 3)
        fill = float(image[mask].min())
        warped = ndimage.affine_transform(image, matrix, offset, order=1, cval=fill)
        warped_mask = ndimage.affine_transform(mask.astype(np.float32), matrix, offset, order=1, cval=0.0) >= 0.5
        return warped.astype(np.float32), warped_mask
