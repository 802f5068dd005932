"""Voxel-wise normative model (the non-deep baseline of Chen et al. 2018): per-voxel mean and spread of healthy
scans registered to the template; a scan is scored by its z-score against them."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from ..core.progress import Reporter
from .base import ScoreOutput, Scorer, register, signed

# Voxels where fewer than this share of training scans had brain are outside the model's support.
SUPPORT_FRACTION = 0.9


@register
class NormativeScorer(Scorer):
    kind = "normative"
    needs_tensors = True

    def score(self, image, mask, reporter: Reporter):
        reporter("score", 0.0)
        mean, std = self.tensors["mean"].astype(np.float32), self.tensors["std"].astype(np.float32)
        if mean.shape != image.shape:
            raise ValueError(f"model grid {mean.shape} does not match the preprocessed volume {image.shape}")
        z = (image - mean) / np.maximum(std, float(self.params["std_floor"]))
        support = mask & (self.tensors["support"] > 0)
        out = np.where(support, signed(z, self.params["direction"]), 0.0).astype(np.float32)
        reporter("score", 1.0)
        return ScoreOutput(out, reconstruction=np.where(mask, mean, image).astype(np.float32))

    @classmethod
    def fit(cls, samples, params, reporter: Reporter):
        moments = voxel_moments(samples)
        n_scans, mean, var = moments.n_scans, moments.mean, moments.var
        if n_scans < 2:
            raise ValueError("the normative model needs at least two healthy scans")
        support = moments.count >= SUPPORT_FRACTION * n_scans
        # A few scans give a noisy spread; smoothing it slightly and flooring it keeps z-scores from exploding.
        std = ndimage.gaussian_filter(np.sqrt(var), sigma=1.0)
        floor = float(np.percentile(std[support], 5)) if support.any() else 1e-3
        out = dict(params, std_floor=floor, n_scans=n_scans)
        tensors = {"mean": np.where(support, mean, 0).astype(np.float32),
                   "std": np.where(support, std, 1).astype(np.float32),
                   "support": support.astype(np.uint8)}
        return out, tensors


@dataclass
class VoxelMoments:
    n_scans: int
    count: np.ndarray  # scans with brain at each voxel
    sum: np.ndarray  # of the values over those scans
    sum_sq: np.ndarray

    @property
    def mean(self) -> np.ndarray:
        return self.sum / np.maximum(self.count, 1.0)

    @property
    def var(self) -> np.ndarray:
        """Unbiased per-voxel variance (0 where fewer than two scans had brain)."""
        c = np.maximum(self.count, 1.0)
        return np.maximum(self.sum_sq / c - self.mean ** 2, 0.0) * c / np.maximum(c - 1.0, 1.0)


def voxel_moments(samples) -> VoxelMoments:
    """Per-voxel sums of (values, mask) volumes, each voxel over the scans whose mask holds it."""
    count = s1 = s2 = None
    n_scans = 0
    for values, mask in samples:
        if count is None:
            count = np.zeros(values.shape, np.float64)
            s1, s2 = np.zeros_like(count), np.zeros_like(count)
        v = np.where(mask, values, 0).astype(np.float64)
        count += mask
        s1 += v
        s2 += v ** 2
        n_scans += 1
    return VoxelMoments(n_scans, count, s1, s2)
