"""Thresholds that give a chosen voxel false-positive rate on healthy scans, and choosing among them."""

from __future__ import annotations

from typing import Iterable, Optional, Sequence

import numpy as np

DEFAULT_FPRS = (0.001, 0.01, 0.05)
DEFAULT_FPR = 0.01


def thresholds_for_fpr(healthy_values: Iterable[np.ndarray], fprs: Sequence[float] = DEFAULT_FPRS) -> dict:
    """Pooled in-brain scores of healthy scans -> {fpr: threshold} so that a share `fpr` of voxels lies above."""
    pooled = np.concatenate([np.asarray(v, np.float32).ravel() for v in healthy_values])
    if pooled.size == 0:
        raise ValueError("no healthy voxels to calibrate on")
    return {f"{f:g}": float(np.quantile(pooled, 1.0 - f)) for f in fprs}


def choose_threshold(meta: dict, threshold: Optional[float] = None, fpr: Optional[float] = None) -> dict:
    """The threshold `detect` uses and what it stands for: a raw value, a calibrated FPR, or the model default."""
    if threshold is not None:
        return {"value": float(threshold), "fpr": None, "source": "user value"}
    table = (meta.get("calibration") or {}).get("thresholds") or {}
    if table:
        want = DEFAULT_FPR if fpr is None else float(fpr)
        curve = sorted((float(k), float(v)) for k, v in table.items())
        fs = np.array([c[0] for c in curve])
        ts = np.array([c[1] for c in curve])
        exact = np.isclose(fs, want)
        if exact.any():
            value = float(ts[exact][0])
        else:
            # Between calibrated points, interpolate in log-FPR (thresholds fall roughly linearly in it).
            value = float(np.interp(np.log(want), np.log(fs), ts))
        return {"value": value, "fpr": want, "source": "healthy calibration"
                + (f" ({meta['calibration'].get('n_scans')} scans)" if meta["calibration"].get("n_scans") else "")}
    if fpr is not None:
        raise ValueError("this model has no calibration table; give --threshold instead of --fpr")
    return {"value": float(meta.get("default_threshold", 3.0)), "fpr": None, "source": "model default (uncalibrated)"}
