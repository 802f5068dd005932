"""Thresholds that give a chosen voxel false-positive rate on healthy scans, and choosing among them.

A model's `calibration` holds two views of one measurement, the pooled cleaned anomaly scores of held-out healthy
scans over the whole grid brain mask (eroded-away voxels count as healthy voxels scoring 0):

* `thresholds`: {"0.001": t, "0.01": t, "0.05": t}, the table `detect --fpr` has always read;
* `curve`: {"fpr": [...], "threshold": [...]}, about 25 log-spaced FPRs from 1e-4 to 0.5 (the table's FPRs among
  them), FPR increasing and thresholds non-increasing, so any threshold can be read as a healthy FPR and back.
"""

from __future__ import annotations

from typing import Iterable, Optional, Sequence, Tuple

import numpy as np

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


def _points(meta: dict) -> Optional[Tuple[np.ndarray, np.ndarray]]:
    """(fprs ascending, thresholds non-increasing) from the curve, else the table; None if uncalibrated."""
    cal = (meta or {}).get("calibration") or {}
    curve = cal.get("curve") or {}
    if curve.get("fpr") and curve.get("threshold") and len(curve["fpr"]) == len(curve["threshold"]):
        pairs = sorted(zip((float(f) for f in curve["fpr"]), (float(t) for t in curve["threshold"])))
    elif cal.get("thresholds"):
        pairs = sorted((float(k), float(v)) for k, v in cal["thresholds"].items())
    else:
        return None
    fs = np.array([p[0] for p in pairs])
    ts = np.minimum.accumulate(np.array([p[1] for p in pairs]))
    return fs, ts


def _by_threshold(fs: np.ndarray, ts: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """(thresholds strictly increasing, log-FPR) for reading FPR from a threshold. Where several FPRs share one
    threshold (a tie, e.g. many healthy voxels scoring 0), the voxels *above* it are the smallest of those FPRs."""
    uniq = np.unique(ts)
    lf = np.array([np.log(fs[ts == u].min()) for u in uniq])
    return uniq, lf


def threshold_for_fpr(meta: dict, fpr: float) -> float:
    """The raw score threshold that flags a share `fpr` of healthy brain voxels (log-FPR interpolation along the
    curve, else the table; clamped at their ends). ValueError if the model is uncalibrated."""
    fpr = float(fpr)
    if not 0.0 < fpr < 1.0:
        raise ValueError(f"a false-positive rate lies between 0 and 1 (got {fpr:g})")
    table = ((meta or {}).get("calibration") or {}).get("thresholds") or {}
    for k, v in table.items():
        if np.isclose(float(k), fpr, rtol=1e-9, atol=0):
            return float(v)
    pts = _points(meta)
    if pts is None:
        raise ValueError("this model has no calibration table; give --threshold instead of --fpr")
    fs, ts = pts
    exact = np.isclose(fs, fpr, rtol=1e-9, atol=0)
    if exact.any():
        return float(ts[exact][0])
    # Between calibrated points, interpolate in log-FPR (thresholds fall roughly linearly in it).
    return float(np.interp(np.log(fpr), np.log(fs), ts))


def fpr_for_threshold(meta: dict, value: float) -> Optional[float]:
    """The healthy voxel FPR a raw threshold stands for (log-interpolated along the curve, clamped at its ends:
    at most the curve's largest FPR, at least its smallest); None if the model is uncalibrated."""
    pts = _points(meta)
    if pts is None:
        return None
    t, lf = _by_threshold(*pts)
    value = float(value)
    if value < t[0]:
        return float(pts[0].max())
    return float(np.exp(np.interp(value, t, lf)))


def score_to_unit(meta: dict, scores: np.ndarray) -> np.ndarray:
    """Raw scores -> [0, 1] as 1 - healthy FPR(score), monotone (float64, same shape).

    Along the curve: log-FPR interpolation. Below the curve's lowest threshold (FPR 0.5): linear from 0 at score 0
    (and below) up to 1 - 0.5 there; where that threshold is 0 itself, scores of 0 or less map to 0. Above its
    highest threshold (FPR 1e-4): the log-linear tail of the curve's last segment carries on, so scores approach 1
    (float64 keeps them apart well past the curve). ValueError if the model is uncalibrated."""
    pts = _points(meta)
    if pts is None:
        raise ValueError("this model has no healthy calibration; cannot map its scores to [0, 1]")
    t, lf = _by_threshold(*pts)
    s = np.asarray(scores, np.float64)
    out = np.empty(s.shape, np.float64)
    lo, hi = t[0], t[-1]
    below = s < lo if lo > 0 else s <= lo  # a score of 0 (or less) is 0, even where half the brain scores 0
    above = s > hi
    mid = ~below & ~above
    out[mid] = 1.0 - np.exp(np.interp(s[mid], t, lf))
    u_lo = 1.0 - float(pts[0].max())  # 0.5 at the curve's largest FPR
    if lo > 0:
        out[below] = u_lo * np.clip(s[below] / lo, 0.0, 1.0)
    else:
        out[below] = 0.0
    if above.any():
        if t.size >= 2:
            slope = (lf[-1] - lf[-2]) / (t[-1] - t[-2])  # d log-FPR / d score, negative
        else:
            slope = -1.0 / max(abs(hi), 1e-6)
        slope = min(slope, -1e-12)
        out[above] = 1.0 - np.exp(lf[-1] + slope * (s[above] - hi))
    return np.clip(out, 0.0, 1.0)


def choose_threshold(meta: dict, threshold: Optional[float] = None, fpr: Optional[float] = None) -> dict:
    """The threshold `detect` uses and what it stands for: a raw value, a calibrated FPR, or the model default."""
    if threshold is not None:
        return {"value": float(threshold), "fpr": None, "source": "user value"}
    cal = meta.get("calibration") or {}
    if _points(meta) is not None:
        want = DEFAULT_FPR if fpr is None else float(fpr)
        value = threshold_for_fpr(meta, want)
        return {"value": value, "fpr": want, "source": "healthy calibration"
                + (f" ({cal.get('n_scans')} scans)" if cal.get("n_scans") else "")}
    if fpr is not None:
        raise ValueError("this model has no calibration table; give --threshold instead of --fpr")
    return {"value": float(meta.get("default_threshold", 3.0)), "fpr": None, "source": "model default (uncalibrated)"}


# Scan-adaptive calibration. A scan from another scanner shifts and widens the whole score distribution of its
# normal tissue; a threshold from the healthy cohort then flags far more than its nominal rate (FINDINGS: 10-30 %
# on BraTS). The scan's own median and MAD of the filtered scores in the brain (robust while lesions cover well
# under half of it) say how its normal tissue sits against the cohort's, and the cohort threshold is carried
# through that location-scale change.
ADAPT_SCALE_RANGE = (0.5, 4.0)


def adaptive_reference(per_scan_stats) -> Optional[dict]:
    """The healthy cohort's typical location and spread (medians over its scans' robust statistics)."""
    stats = list(per_scan_stats)
    if not stats:
        return None
    return {"median": float(np.median([s["median"] for s in stats])),
            "mad": float(np.median([s["mad"] for s in stats])), "n_scans": len(stats)}


def _adaptive_map(meta: dict, scan_stats: Optional[dict]) -> Optional[Tuple[float, float, float, dict]]:
    """(scan median, cohort median, scale ratio, cohort reference) of the location-scale change, or None where
    the model has no adaptive reference or either spread is degenerate."""
    ref = ((meta or {}).get("calibration") or {}).get("adaptive")
    if not ref or not scan_stats or ref["mad"] <= 0 or scan_stats.get("mad", 0) <= 0:
        return None
    ratio = float(np.clip(scan_stats["mad"] / ref["mad"], *ADAPT_SCALE_RANGE))
    return float(scan_stats["median"]), float(ref["median"]), ratio, ref


def adapt_threshold(meta: dict, chosen: dict, scan_stats: dict) -> dict:
    """The chosen cohort threshold moved to this scan's own score distribution. User values, uncalibrated models
    and degenerate statistics are left as they are."""
    mapping = _adaptive_map(meta, scan_stats)
    if mapping is None or chosen.get("fpr") is None:
        return chosen
    scan_median, cohort_median, ratio, ref = mapping
    value = scan_median + (chosen["value"] - cohort_median) * ratio
    return dict(chosen, value=float(value), source=chosen["source"] + ", scan-adaptive",
                cohort_value=chosen["value"],
                adaptive={"scan_median": round(scan_stats["median"], 5), "scan_mad": round(scan_stats["mad"], 5),
                          "cohort_median": round(ref["median"], 5), "cohort_mad": round(ref["mad"], 5),
                          "scale_ratio": round(ratio, 4)})


def scan_curve(meta: dict, scan_stats: Optional[dict] = None) -> Optional[dict]:
    """The model's FPR -> threshold curve for one scan: the cohort curve, carried through the same location-scale
    change as `adapt_threshold` when scan statistics are given. A viewer maps its FPR slider through this without
    the model. None if the model is uncalibrated."""
    pts = _points(meta)
    if pts is None:
        return None
    fs, ts = pts
    mapping = _adaptive_map(meta, scan_stats)
    if mapping is not None:
        scan_median, cohort_median, ratio, _ = mapping
        ts = scan_median + (ts - cohort_median) * ratio
    return {"fpr": [float(f) for f in fs], "threshold": [float(t) for t in ts]}
