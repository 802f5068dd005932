"""Score <-> healthy voxel false-positive rate, and the tables a model stores to read it from.

A model's `calibration` holds two views of one measurement, the pooled cleaned anomaly scores of held-out healthy
scans over the whole grid brain mask (eroded-away voxels count as healthy voxels scoring 0):

* `thresholds`: {"0.001": t, "0.01": t, "0.05": t}, the table `detect --fpr` has always read;
* `curve`: {"fpr": [...], "threshold": [...]}, about 25 log-spaced FPRs from 1e-4 to 0.5 (the table's FPRs among
  them), FPR increasing and thresholds non-increasing, so any threshold can be read as a healthy FPR and back.
"""

from __future__ import annotations

from typing import Iterable, Optional, Sequence

import numpy as np

from .adaptive import ScanMove

DEFAULT_FPRS = (0.001, 0.01, 0.05)
DEFAULT_FPR = 0.01
CURVE_RANGE = (1e-4, 0.5)
CURVE_POINTS = 25


def _pool(healthy_values: Iterable[np.ndarray]) -> np.ndarray:
    pooled = np.concatenate([np.asarray(v, np.float32).ravel() for v in healthy_values])
    if pooled.size == 0:
        raise ValueError("no healthy voxels to calibrate on")
    return pooled


def thresholds_for_fpr(healthy_values: Iterable[np.ndarray], fprs: Sequence[float] = DEFAULT_FPRS) -> dict:
    """Pooled in-brain scores of healthy scans -> {fpr: threshold} so that a share `fpr` of voxels lies above."""
    pooled = _pool(healthy_values)
    return {f"{f:g}": float(np.quantile(pooled, 1.0 - f)) for f in fprs}


def curve_fprs(extra: Sequence[float] = DEFAULT_FPRS, lo: float = CURVE_RANGE[0], hi: float = CURVE_RANGE[1],
               n: int = CURVE_POINTS) -> np.ndarray:
    """Log-spaced FPRs from `lo` to `hi` with the `extra` ones exactly (near-duplicates of them dropped)."""
    extra = np.array(sorted({float(f) for f in extra}), float)
    grid = np.geomspace(lo, hi, n)
    if extra.size:
        # A grid point within 5 % (in ratio) of a table FPR would only make a near-vertical step: drop it.
        near = np.abs(np.log(grid[:, None]) - np.log(extra[None, :])).min(axis=1) < np.log(1.05)
        grid = grid[~near]
    return np.unique(np.concatenate([grid, extra]))


def calibration_tables(healthy_values: Iterable[np.ndarray], fprs: Sequence[float] = DEFAULT_FPRS) -> dict:
    """{"thresholds": table at `fprs`, "curve": dense curve} from pooled healthy scores (one pass over the pool)."""
    fprs = [float(f) for f in fprs]
    for f in fprs:
        if not 0.0 < f < 1.0:
            raise ValueError(f"false-positive rates must lie between 0 and 1 (got {f:g})")
    pooled = _pool(healthy_values)
    fs = curve_fprs(fprs)
    ts = np.quantile(pooled, 1.0 - fs).astype(float)
    ts = np.minimum.accumulate(ts)  # guard against rounding: thresholds never rise with the FPR
    table = {f"{f:g}": float(ts[np.isclose(fs, f, rtol=1e-12, atol=0)][0]) for f in fprs}
    return {"thresholds": table, "curve": {"fpr": [float(f) for f in fs], "threshold": [float(t) for t in ts]}}


def _check_fpr(fpr: float) -> float:
    fpr = float(fpr)
    if not 0.0 < fpr < 1.0:
        raise ValueError(f"a false-positive rate lies between 0 and 1 (got {fpr:g})")
    return fpr


class CalibrationCurve:
    """The healthy voxel FPR each raw score stands for, in both directions, for one model or for one scan.

    `fprs` ascend and `thresholds` never rise with them. Built from a model's `calibration` (its dense curve, else
    its table; the table is then also read exactly at its own FPRs) or from a plain curve dict such as the worker
    writes for one scan (`scan_calibration` in result.json), which a viewer maps its FPR slider through.
    """

    def __init__(self, fprs: np.ndarray, thresholds: np.ndarray, table: Optional[dict] = None):
        self.fprs = np.asarray(fprs, float)
        self.thresholds = np.asarray(thresholds, float)
        self.table = dict(table or {})

    @classmethod
    def from_pairs(cls, pairs: Iterable, table: Optional[dict] = None) -> Optional["CalibrationCurve"]:
        """From (fpr, threshold) pairs in any order; None if there are none."""
        pairs = sorted((float(f), float(t)) for f, t in pairs)
        if not pairs:
            return None
        # Thresholds must not rise with the FPR; a stored curve already holds that, a hand-made table may not.
        ts = np.minimum.accumulate(np.array([p[1] for p in pairs]))
        return cls(np.array([p[0] for p in pairs]), ts, table)

    @classmethod
    def from_dict(cls, curve: Optional[dict]) -> Optional["CalibrationCurve"]:
        """From {"fpr": [...], "threshold": [...]}; None if it is missing, empty or its lists differ in length."""
        curve = curve or {}
        fs, ts = curve.get("fpr"), curve.get("threshold")
        if not fs or not ts or len(fs) != len(ts):
            return None
        return cls.from_pairs(zip(fs, ts))

    @classmethod
    def from_calibration(cls, calibration: Optional[dict]) -> Optional["CalibrationCurve"]:
        """From a model's `calibration` record (its curve, else its table); None if it has neither."""
        cal = calibration or {}
        table = cal.get("thresholds") or {}
        curve = cls.from_dict(cal.get("curve"))
        if curve is not None:
            curve.table = dict(table)
            return curve
        return cls.from_pairs(((float(k), v) for k, v in table.items()), table)

    @classmethod
    def from_meta(cls, meta: Optional[dict]) -> Optional["CalibrationCurve"]:
        """From a model's meta; None if the model is uncalibrated."""
        return cls.from_calibration((meta or {}).get("calibration"))

    def to_dict(self) -> dict:
        return {"fpr": [float(f) for f in self.fprs], "threshold": [float(t) for t in self.thresholds]}

    def _by_threshold(self):
        """(thresholds strictly increasing, log-FPR) for reading FPR from a threshold. Where several FPRs share one
        threshold (a tie, e.g. many healthy voxels scoring 0), the voxels *above* it are the smallest of those
        FPRs."""
        uniq = np.unique(self.thresholds)
        lf = np.array([np.log(self.fprs[self.thresholds == u].min()) for u in uniq])
        return uniq, lf

    def threshold(self, fpr: float) -> float:
        """The raw score threshold that flags a share `fpr` of healthy brain voxels (log-FPR interpolation along
        the curve; clamped at its ends)."""
        fpr = _check_fpr(fpr)
        for k, v in self.table.items():
            if np.isclose(float(k), fpr, rtol=1e-9, atol=0):
                return float(v)
        exact = np.isclose(self.fprs, fpr, rtol=1e-9, atol=0)
        if exact.any():
            return float(self.thresholds[exact][0])
        # Between calibrated points, interpolate in log-FPR (thresholds fall roughly linearly in it).
        return float(np.interp(np.log(fpr), np.log(self.fprs), self.thresholds))

    def fpr(self, value: float) -> float:
        """The healthy voxel FPR a raw threshold stands for (log-interpolated along the curve, clamped at its
        ends: at most the curve's largest FPR, at least its smallest)."""
        t, lf = self._by_threshold()
        value = float(value)
        if value < t[0]:
            return float(self.fprs.max())
        return float(np.exp(np.interp(value, t, lf)))

    def log_fpr(self, scores: np.ndarray) -> np.ndarray:
        """Natural log of the healthy voxel FPR each raw score stands for (float64, same shape): log-FPR
        interpolation along the curve, the curve's largest FPR below its lowest threshold, and above its highest
        threshold the log-linear tail of its last segment carried on (a one-point curve: a slope of -1 per its
        threshold's size), so scores past the curve keep their order."""
        t, lf = self._by_threshold()
        s = np.atleast_1d(np.asarray(scores, np.float64))
        out = np.interp(s, t, lf)
        above = s > t[-1]
        if above.any():
            slope = (lf[-1] - lf[-2]) / (t[-1] - t[-2]) if t.size >= 2 else -1.0 / max(abs(t[-1]), 1e-6)
            out[above] = lf[-1] + min(slope, -1e-12) * (s[above] - t[-1])
        return out.reshape(np.shape(scores))

    def score_to_unit(self, scores: np.ndarray) -> np.ndarray:
        """Raw scores -> [0, 1] as 1 - healthy FPR(score), monotone (float64, same shape).

        Along the curve and above it: 1 - exp(log_fpr), so scores approach 1 past the curve (float64 keeps them
        apart well past it). Below the curve's lowest threshold (FPR 0.5): linear from 0 at score 0 (and below)
        up to 1 - 0.5 there; where that threshold is 0 itself, scores of 0 or less map to 0."""
        t, _ = self._by_threshold()
        s = np.asarray(scores, np.float64)
        lo = t[0]
        below = s < lo if lo > 0 else s <= lo  # a score of 0 (or less) is 0, even where half the brain scores 0
        out = np.asarray(1.0 - np.exp(self.log_fpr(s)))
        u_lo = 1.0 - float(self.fprs.max())  # 0.5 at the curve's largest FPR
        out[below] = u_lo * np.clip(s[below] / lo, 0.0, 1.0) if lo > 0 else 0.0
        return np.clip(out, 0.0, 1.0)

    def moved(self, move: Optional[ScanMove]) -> "CalibrationCurve":
        """This curve for one scan: every threshold carried through the scan's location-scale move (the same move
        as `Threshold.moved`, so the scan's threshold lies on it). Unchanged when there is no move."""
        if move is None:
            return self
        # The move is increasing, so the thresholds keep their order; the table was the cohort's and goes.
        return CalibrationCurve(self.fprs, move.apply(self.thresholds))
