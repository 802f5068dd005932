"""Robust intensity normalisation inside the brain mask."""

from __future__ import annotations

import numpy as np

METHODS = ("median-iqr", "percentile")


def normalise(array: np.ndarray, mask: np.ndarray, method: str = "median-iqr") -> tuple[np.ndarray, dict]:
    """Map brain intensities to a scan-independent scale; outside the brain is set to the darkest brain value.

    median-iqr: (x - median) / IQR, robust to lesions covering less than a quarter of the brain.
    percentile: p1 -> 0, p99 -> 1 (the scale many published models use; brittle when a lesion is very bright).
    """
    inside = array[mask]
    if inside.size == 0:
        raise ValueError("empty brain mask")
    if method == "median-iqr":
        p25, p50, p75 = np.percentile(inside, [25, 50, 75])
        scale = max(float(p75 - p25), 1e-6 * max(abs(float(p50)), 1.0))
        offset = float(p50)
    elif method == "percentile":
        p1, p99 = np.percentile(inside, [1, 99])
        scale = max(float(p99 - p1), 1e-6)
        offset = float(p1)
    else:
        raise ValueError(f"unknown normalisation {method!r}; choose from {METHODS}")
    out = ((array - offset) / scale).astype(np.float32)
    out[~mask] = float(out[mask].min())
    return out, {"method": method, "offset": offset, "scale": scale}
