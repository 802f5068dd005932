"""Voxel-wise normative model (the non-deep baseline of Chen et al. 2018): per-voxel mean and spread of healthy
scans registered to the template; a scan is scored by its z-score against them."""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from ..progress import Reporter
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
        total = s1 = s2 = None
        n_scans = 0
        for image, mask in samples:
            if total is None:
                total = np.zeros(image.shape, np.float64)
                s1, s2 = np.zeros_like(total), np.zeros_like(total)
            m = mask.astype(np.float64)
            total += m
            s1 += image * m
            s2 += (image.astype(np.float64) ** 2) * m
            n_scans += 1
        if n_scans < 2:
            raise ValueError("the normative model needs at least two healthy scans")
        count = np.maximum(total, 1.0)
        mean = s1 / count
        var = np.maximum(s2 / count - mean ** 2, 0.0) * count / np.maximum(count - 1.0, 1.0)
        support = total >= SUPPORT_FRACTION * n_scans
        # A few scans give a noisy spread; smoothing it slightly and flooring it keeps z-scores from exploding.
        std = ndimage.gaussian_filter(np.sqrt(var), sigma=1.0)
        floor = float(np.percentile(std[support], 5)) if support.any() else 1e-3
        out = dict(params, std_floor=floor, n_scans=n_scans)
        tensors = {"mean": np.where(support, mean, 0).astype(np.float32),
                   "std": np.where(support, std, 1).astype(np.float32),
                   "support": support.astype(np.uint8)}
        return out, tensors
