"""Intensity outlier scorer (Meissen et al. 2021): how far a voxel's intensity departs from the brain's typical
value, in robust units, on the side where lesions show in that contrast."""

from __future__ import annotations

import numpy as np

from .base import ScoreOutput, Scorer, register, signed


@register
class IntensityScorer(Scorer):
    kind = "intensity"
    scan_relative = True

    def score(self, image, mask, reporter):
        reporter("score", 0.0)
        inside = image[mask]
        p25, p50, p75 = np.percentile(inside, [25, 50, 75])
        deviation = (image - p50) / max(float(p75 - p25), 1e-6)
        out = np.where(mask, signed(deviation, self.params["direction"]), 0.0).astype(np.float32)
        reporter("score", 1.0)
        return ScoreOutput(out)

    @classmethod
    def fit(cls, samples, params, reporter):
        return dict(params), {}
