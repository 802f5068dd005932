"""The lesion-level operating point: how many findings per healthy scan score at least as high as a given finding.

Users act on findings, not voxels. A finding is a connected component of the voxels above the scan's base
threshold (its voxel threshold at BASE_FPR healthy voxel FPR, moved onto the scan like any threshold), at least
the minimum lesion size. Its score is its *excess mass*: the sum over its voxels of how far each voxel's strength
(-log10 of the healthy voxel FPR its score stands for, on the scan's own curve) lies above the base strength, times
the voxel volume (mL x decades). It grows with both size and strength; it is in physical units, so findings on a
scan's own grid and on the model grid compare; and it is the same unit for every model.

A model's calibration keeps the scores of all findings its healthy calibration scans produced (`findings` entry);
a finding's *healthy rate* is how many findings per healthy scan score at least as high. The default report keeps
the findings whose healthy rate is at most DEFAULT_FALSE_FINDINGS, so a healthy scan gets that many false findings
on average. Above the top healthy scores the rate continues as an exponential tail in log-score fitted to the top
TAIL_POINTS healthy findings (peaks over a threshold), so the strongest findings are still ranked and get a rate
below 1 / number of scans rather than a flat 0.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Optional, Sequence

import numpy as np

from .curve import CalibrationCurve

BASE_FPR = 0.01
DEFAULT_FALSE_FINDINGS = 0.5
FALSE_FINDINGS_RANGE = (0.05, 10.0)
SCORE_NAME = "excess mass (mL x decades of healthy voxel FPR above the base threshold)"
TAIL_POINTS = 10
_FLOOR = 1e-9  # scores are positive; a log needs a floor


def check_false_findings(value: float) -> float:
    lo, hi = FALSE_FINDINGS_RANGE
    value = float(value)
    if not lo <= value <= hi:
        raise ValueError(f"false findings per healthy scan must lie between {lo:g} and {hi:g} (got {value:g})")
    return value


def strength(curve: CalibrationCurve, scores: np.ndarray) -> np.ndarray:
    """-log10 of the healthy voxel FPR each raw score stands for on `curve` (float64). Between calibrated points:
    log-FPR interpolation; above the curve's top: its last segment carried on (strength keeps growing); below its
    bottom: the bottom's strength."""
    t, lf = curve._by_threshold()
    s = np.asarray(scores, np.float64)
    out = np.interp(s, t, lf)
    if t.size >= 2:
        slope = min((lf[-1] - lf[-2]) / (t[-1] - t[-2]), -1e-12)
        above = s > t[-1]
        out[above] = lf[-1] + slope * (s[above] - t[-1])
    return -out / np.log(10.0)


@dataclass(frozen=True)
class FindingCalibration:
    """The scores of the findings a model's healthy calibration scans produced at `base_fpr`, highest first."""

    scores: np.ndarray
    n_scans: int
    base_fpr: float = BASE_FPR

    @classmethod
    def from_scans(cls, per_scan: Iterable[Sequence[float]], base_fpr: float = BASE_FPR) -> "FindingCalibration":
        per_scan = [list(s) for s in per_scan]
        if not per_scan:
            raise ValueError("no healthy scans to calibrate findings on")
        scores = np.sort(np.asarray([v for s in per_scan for v in s], np.float64))[::-1]
        return cls(scores, len(per_scan), float(base_fpr))

    @classmethod
    def from_dict(cls, record: Optional[dict]) -> Optional["FindingCalibration"]:
        if not record or "scores" not in record or not record.get("n_scans"):
            return None
        return cls(np.sort(np.asarray(record["scores"], np.float64))[::-1], int(record["n_scans"]),
                   float(record.get("base_fpr", BASE_FPR)))

    @classmethod
    def from_meta(cls, meta: Optional[dict]) -> Optional["FindingCalibration"]:
        return cls.from_dict(((meta or {}).get("calibration") or {}).get("findings"))

    def to_dict(self) -> dict:
        return {"method": SCORE_NAME, "base_fpr": self.base_fpr, "n_scans": self.n_scans,
                "n_findings": int(self.scores.size), "per_scan": round(self.scores.size / self.n_scans, 3),
                "tail_points": TAIL_POINTS, "scores": [float(f"{v:.6g}") for v in self.scores]}

    def _tail(self):
        """(log-score where the tail starts, its rate there, decay per unit log-score) or None with too few
        findings: an exponential tail fitted by the mean excess of the top log-scores over the k-th."""
        k = min(TAIL_POINTS, self.scores.size - 1)
        if k < 2:
            return None
        logs = np.log(np.maximum(self.scores[:k + 1], _FLOOR))
        excess = float(np.mean(logs[:k] - logs[k]))
        # The tail starts at the (k+1)-th highest score, which k+1 healthy findings reach: continuous there.
        return float(logs[k]), (k + 1) / self.n_scans, 1.0 / max(excess, 1e-6)

    def _steps(self):
        """(distinct healthy log-scores ascending, log of the findings per scan scoring at least each)."""
        logs = np.log(np.maximum(self.scores[::-1], _FLOOR))
        uniq = np.unique(logs)
        counts = logs.size - np.searchsorted(logs, uniq, side="left")
        return uniq, np.log(counts / self.n_scans)

    def rate(self, scores) -> np.ndarray:
        """Findings per healthy scan scoring at least `scores` (an array or a number; float64). Below the lowest
        healthy score: every healthy finding counts."""
        s = np.log(np.maximum(np.asarray(scores, np.float64), _FLOOR))
        if self.scores.size == 0:
            return np.zeros(s.shape)
        logs, lr = self._steps()
        out = np.atleast_1d(np.exp(np.interp(s, logs, lr)))
        s = np.atleast_1d(s)
        tail = self._tail()
        if tail is not None:
            start, rate0, decay = tail
            above = s > start
            out[above] = rate0 * np.exp(-decay * (s[above] - start))
        else:
            out[s > logs[-1]] = 0.0
        return out.reshape(np.shape(scores))

    def threshold(self, false_findings: float) -> float:
        """The finding score above which healthy scans produce `false_findings` findings per scan on average (0
        where they produce fewer than that at the base threshold: every finding is then reported)."""
        target = check_false_findings(false_findings)
        if self.scores.size == 0:
            return 0.0
        tail = self._tail()
        if tail is not None and target <= tail[1]:
            start, rate0, decay = tail
            return float(np.exp(start + np.log(rate0 / target) / decay))
        logs, lr = self._steps()
        if np.log(target) >= lr[0]:
            return 0.0
        if np.log(target) < lr[-1]:  # no tail (too few findings): just above the top healthy score
            return float(np.nextafter(np.exp(logs[-1]), np.inf))
        return float(np.exp(np.interp(-np.log(target), -lr, logs)))


@dataclass(frozen=True)
class FindingRule:
    """The lesion-level operating point on one scan: the scan's calibration curve (its voxel strengths), the
    model's finding calibration (None while it is being measured: scores only) and the target number of false
    findings per healthy scan (None: every finding)."""

    curve: CalibrationCurve
    calibration: Optional[FindingCalibration] = None
    false_findings: Optional[float] = None

    def rates(self, scores: np.ndarray) -> Optional[np.ndarray]:
        return None if self.calibration is None else self.calibration.rate(scores)

    def scores(self, values: np.ndarray, labels: np.ndarray, n_labels: int, voxel_ml: float,
               threshold: float) -> np.ndarray:
        """Each component's excess mass (index 0 = background) from its voxels' raw `values` and `labels`; the
        strength at `threshold`, the scan's base threshold, is the zero of the excess."""
        base = float(strength(self.curve, np.array([threshold]))[0])
        excess = np.maximum(strength(self.curve, values) - base, 0.0)
        return np.bincount(labels, weights=excess, minlength=n_labels + 1) * voxel_ml

    def reported(self, rates: Optional[np.ndarray]):
        """Which findings the operating point reports, from their healthy rates."""
        if self.false_findings is None or rates is None:
            return True
        return np.asarray(rates) <= self.false_findings
