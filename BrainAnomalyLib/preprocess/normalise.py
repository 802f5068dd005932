"""Intensity standardisation inside the brain mask, on the model grid.

Every method is invariant to a global intensity scale and offset of the scan and idempotent, so a scan from
another scanner or an already standardised scan lands on the same scale:
  median-iqr    (x - median) / IQR; robust to lesions covering less than a quarter of the brain.
  percentile    p1 -> 0, p99 -> 1; the scale many published models use, brittle when a lesion is very bright.
  tissue-peaks  grey matter at 0, white matter at +-1 (the white-matter-peak idea, with the peaks located by the
                template's tissue maps, which the registered scan shares); keeps the contrast's own sign.
  histogram     Nyul-style: brain percentiles at LANDMARKS mapped piecewise-linearly onto a standard scale learned
                from the training cohort (`fit_histogram_reference`), so tissue contrasts line up across scanners.
"""

from __future__ import annotations

from typing import Dict, Iterable, Optional, Sequence

import numpy as np

METHODS = ("median-iqr", "percentile", "tissue-peaks", "histogram")
# The methods whose statistics are plain quantiles of the brain, which preprocess.torch_grid computes on the GPU;
# the histogram method's piecewise map stays on numpy.
TORCH_METHODS = ("median-iqr", "percentile", "tissue-peaks")
LANDMARKS = (1, 10, 20, 30, 40, 50, 60, 70, 80, 90, 99)
# Voxels counted as one tissue: template probability at least this, inside the scan's brain mask.
TISSUE_PROBABILITY = {"WM": 0.9, "GM": 0.6}
MIN_TISSUE_VOXELS = 50


def histogram_landmarks(array: np.ndarray, mask: np.ndarray) -> np.ndarray:
    return np.percentile(array[mask], LANDMARKS).astype(np.float64)


def fit_histogram_reference(landmarks: Iterable[Sequence[float]]) -> list:
    """Standard scale: each scan's landmarks mapped linearly so p1 -> 0 and p99 -> 100, then averaged."""
    scaled = []
    for lm in landmarks:
        lm = np.asarray(lm, np.float64)
        span = max(lm[-1] - lm[0], 1e-9)
        scaled.append(100.0 * (lm - lm[0]) / span)
    if not scaled:
        raise ValueError("no scans to learn a histogram reference from")
    ref = np.mean(scaled, axis=0)
    return [round(float(v), 6) for v in np.maximum.accumulate(ref)]


def _piecewise(x: np.ndarray, src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """Piecewise-linear map through (src, dst), extended beyond the ends with the end segments' slopes."""
    src = np.maximum.accumulate(src + np.arange(src.size) * 1e-9 * max(abs(src[-1] - src[0]), 1.0))
    out = np.interp(x, src, dst)
    lo, hi = x < src[0], x > src[-1]
    out[lo] = dst[0] + (x[lo] - src[0]) * (dst[1] - dst[0]) / (src[1] - src[0])
    out[hi] = dst[-1] + (x[hi] - src[-1]) * (dst[-1] - dst[-2]) / (src[-1] - src[-2])
    return out


def normalise(array: np.ndarray, mask: np.ndarray, method: str = "median-iqr", reference: Optional[list] = None,
              tissue: Optional[Dict[str, np.ndarray]] = None) -> tuple[np.ndarray, dict]:
    """Standardise `array` (z,y,x) using brain voxels `mask`; outside the brain is set to the darkest brain value.

    `reference` is the histogram method's standard scale; `tissue` maps "WM"/"GM" to template probability maps on
    the same grid (tissue-peaks).
    """
    inside = array[mask]
    if inside.size == 0:
        raise ValueError("empty brain mask")
    info: dict = {"method": method}
    if method == "median-iqr":
        p25, p50, p75 = np.percentile(inside, [25, 50, 75])
        scale = max(float(p75 - p25), 1e-6 * max(abs(float(p50)), 1.0))
        out = (array - float(p50)) / scale
        info.update(offset=float(p50), scale=scale)
    elif method == "percentile":
        p1, p99 = np.percentile(inside, [1, 99])
        scale = max(float(p99 - p1), 1e-6)
        out = (array - float(p1)) / scale
        info.update(offset=float(p1), scale=scale)
    elif method == "tissue-peaks":
        if tissue is None:
            raise ValueError("tissue-peaks needs the template's WM and GM maps on the grid")
        peaks = {}
        for name, p in TISSUE_PROBABILITY.items():
            voxels = array[mask & (tissue[name] >= p)]
            if voxels.size < MIN_TISSUE_VOXELS:
                raise ValueError(f"too few {name} voxels in the brain mask to find the tissue peak")
            peaks[name] = float(np.median(voxels))
        scale = max(abs(peaks["WM"] - peaks["GM"]), 1e-6 * max(abs(peaks["GM"]), 1.0))
        out = (array - peaks["GM"]) / scale
        info.update(offset=peaks["GM"], scale=scale, wm_peak=peaks["WM"], gm_peak=peaks["GM"])
    elif method == "histogram":
        if not reference:
            raise ValueError("histogram standardisation needs the reference learned from the training cohort")
        lm = histogram_landmarks(array, mask)
        ref = np.asarray(reference, np.float64)
        out = _piecewise(array.astype(np.float64), lm, ref) / 100.0
        info.update(landmarks=[round(float(v), 4) for v in lm], offset=float(lm[0]),
                    scale=float((lm[-1] - lm[0]) / max((ref[-1] - ref[0]) / 100.0, 1e-9)))
    else:
        raise ValueError(f"unknown normalisation {method!r}; choose from {', '.join(METHODS)}")
    out = out.astype(np.float32)
    out[~mask] = float(out[mask].min())
    return out, info
