"""The lesion-level operating point: how many findings per healthy scan score at least as high as a given finding.

Users act on findings, not voxels. A finding is a connected component of the voxels above the scan's base
threshold (its voxel threshold at BASE_FPR healthy voxel FPR, moved onto the scan like any threshold), at least
the minimum lesion size. Its score is its *excess mass*: the sum over its voxels of how far each voxel's strength
(-log10 of the healthy voxel FPR its score stands for, on the scan's own curve) lies above the base strength, times
the voxel volume (mL x decades). It grows with both size and strength; it is in physical units, so findings on a
scan's own grid and on the model grid compare; and it is the same unit for every model.

A model's calibration keeps the scores of the findings each healthy calibration scan produced (`findings` entry);
a finding's *healthy rate* is how many findings per healthy scan score at least as high, read conservatively (an
upper confidence bound over resamples of the calibration scans, see FindingCalibration). The default report keeps
the findings whose healthy rate is at most DEFAULT_FALSE_FINDINGS, so a healthy scan gets at most about that many
false findings on average. Above the top healthy scores the rate continues as an exponential tail in log-score
fitted to the top TAIL_POINTS healthy findings (peaks over a threshold), so the strongest findings are still
ranked and get a rate below 1 / number of scans rather than a flat 0.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property, lru_cache
from typing import Iterable, Optional, Sequence, Tuple

import numpy as np

from .curve import CalibrationCurve

BASE_FPR = 0.01
DEFAULT_FALSE_FINDINGS = 0.5
FALSE_FINDINGS_RANGE = (0.05, 10.0)
SCORE_NAME = "excess mass (mL x decades of healthy voxel FPR above the base threshold)"
TAIL_POINTS = 10
CONFIDENCE = 0.95
BOOTSTRAP = 200
GRID_POINTS = 400
SEED = 0
_FLOOR = 1e-9  # scores are positive; a log needs a floor


def check_false_findings(value: float) -> float:
    lo, hi = FALSE_FINDINGS_RANGE
    value = float(value)
    if not lo <= value <= hi:
        raise ValueError(f"false findings per healthy scan must lie between {lo:g} and {hi:g} (got {value:g})")
    return value


def strength(curve: CalibrationCurve, scores: np.ndarray) -> np.ndarray:
    """-log10 of the healthy voxel FPR each raw score stands for on `curve` (CalibrationCurve.log_fpr: the curve's
    tail carried on above its top, so strength keeps growing)."""
    return -curve.log_fpr(scores) / np.log(10.0)


class PointRate:
    """Findings per healthy scan scoring at least a given score, from one set of healthy scans: the count of
    healthy findings at or above it (log-interpolated between them), and above the TAIL_POINTS-th highest an
    exponential tail in log-score fitted to the top ones (peaks over a threshold)."""

    def __init__(self, scores: np.ndarray, n_scans: int):
        self.logs = np.sort(np.log(np.maximum(np.asarray(scores, np.float64), _FLOOR)))  # ascending
        self.n_scans = n_scans
        uniq = np.unique(self.logs)
        counts = self.logs.size - np.searchsorted(self.logs, uniq, side="left")
        self.steps = (uniq, np.log(counts / n_scans))
        self.tail = None
        k = min(TAIL_POINTS, self.logs.size - 1)
        if k >= 2:
            top = self.logs[::-1][:k + 1]
            excess = float(np.mean(top[:k] - top[k]))
            # The tail starts at the (k+1)-th highest score, which k+1 healthy findings reach: continuous there.
            self.tail = (float(top[k]), (k + 1) / n_scans, 1.0 / max(excess, 1e-6))

    def __call__(self, log_scores: np.ndarray) -> np.ndarray:
        s = np.atleast_1d(np.asarray(log_scores, np.float64))
        if self.logs.size == 0:
            return np.zeros(s.shape)
        logs, lr = self.steps
        out = np.exp(np.interp(s, logs, lr))
        if self.tail is not None:
            start, rate0, decay = self.tail
            above = s > start
            out[above] = rate0 * np.exp(-decay * (s[above] - start))
        else:
            out[s > logs[-1]] = 0.0
        return out


@dataclass(frozen=True)
class FindingCalibration:
    """The scores of the findings each healthy calibration scan produced at `base_fpr`.

    A finding's healthy rate is read conservatively: healthy scans differ (a few produce many strong findings)
    and a calibration holds a few dozen of them, so the rate a new healthy scan meets can be well above the
    calibration scans' own average. The rate reported is the CONFIDENCE quantile of that average over BOOTSTRAP
    resamples of the calibration scans (fixed seed: the same model always gives the same rates)."""

    per_scan: Tuple[Tuple[float, ...], ...]
    base_fpr: float = BASE_FPR

    @classmethod
    def from_scans(cls, per_scan: Iterable[Sequence[float]], base_fpr: float = BASE_FPR) -> "FindingCalibration":
        per_scan = tuple(tuple(float(v) for v in s) for s in per_scan)
        if not per_scan:
            raise ValueError("no healthy scans to calibrate findings on")
        return cls(per_scan, float(base_fpr))

    @classmethod
    def from_dict(cls, record: Optional[dict]) -> Optional["FindingCalibration"]:
        if not record or not record.get("per_scan_scores"):
            return None
        return cls.from_scans(record["per_scan_scores"], float(record.get("base_fpr", BASE_FPR)))

    @classmethod
    def from_meta(cls, meta: Optional[dict]) -> Optional["FindingCalibration"]:
        return cls.from_dict(((meta or {}).get("calibration") or {}).get("findings"))

    @property
    def n_scans(self) -> int:
        return len(self.per_scan)

    @property
    def scores(self) -> np.ndarray:
        """Every healthy finding's score, highest first."""
        return np.sort(np.asarray([v for s in self.per_scan for v in s], np.float64))[::-1]

    def to_dict(self) -> dict:
        return {"method": SCORE_NAME, "base_fpr": self.base_fpr, "n_scans": self.n_scans,
                "n_findings": int(self.scores.size), "per_scan": round(self.scores.size / self.n_scans, 3),
                "rate": f"upper {CONFIDENCE:.0%} bootstrap bound ({BOOTSTRAP} resamples of the scans), "
                        f"exponential tail over the top {TAIL_POINTS}",
                "per_scan_scores": [[float(f"{v:.6g}") for v in s] for s in self.per_scan]}

    def point_rate(self, scores) -> np.ndarray:
        """The calibration scans' own average: findings per scan scoring at least `scores`."""
        s = np.log(np.maximum(np.asarray(scores, np.float64), _FLOOR))
        return PointRate(self.scores, self.n_scans)(s).reshape(np.shape(scores))

    @cached_property
    def _upper(self) -> Tuple[np.ndarray, np.ndarray]:
        """(log-score grid, log of the conservative rate there, non-increasing)."""
        return _conservative_rate(self.per_scan)

    def rate(self, scores) -> np.ndarray:
        """Findings per healthy scan scoring at least `scores` (conservative, see the class; float64, the shape of
        `scores`). Below every healthy finding: all of them."""
        grid, lr = self._upper
        s = np.log(np.maximum(np.asarray(scores, np.float64), _FLOOR))
        out = np.exp(np.interp(s, grid, lr))
        if np.isfinite(lr[-1]) and lr.size > 1:  # past the grid the tail's decay carries on
            slope = (lr[-1] - lr[-2]) / (grid[-1] - grid[-2])
            out = np.where(s > grid[-1], np.exp(lr[-1] + slope * (s - grid[-1])), out)
        return out

    def threshold(self, false_findings: float) -> float:
        """The finding score from which healthy scans produce `false_findings` findings per scan (conservatively);
        0 where they produce fewer at the base threshold (every finding is then reported)."""
        target = np.log(check_false_findings(false_findings))
        grid, lr = self._upper
        if not np.isfinite(lr[0]) or target >= lr[0]:
            return 0.0
        if target < lr[-1]:
            slope = (lr[-1] - lr[-2]) / (grid[-1] - grid[-2])
            return float(np.exp(grid[-1] + (target - lr[-1]) / slope))
        # first grid point at or below the target, then linear back to where the curve crosses it
        i = int(np.argmax(lr <= target))
        if i == 0:
            return float(np.exp(grid[0]))
        x0, x1, y0, y1 = grid[i - 1], grid[i], lr[i - 1], lr[i]
        return float(np.exp(x1 if y1 == y0 else x0 + (target - y0) * (x1 - x0) / (y1 - y0)))


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


@lru_cache(maxsize=64)
def _conservative_rate(per_scan: Tuple[Tuple[float, ...], ...]) -> Tuple[np.ndarray, np.ndarray]:
    """FindingCalibration._upper, kept per calibration: the bootstrap takes a fifth of a second, and a model's
    calibration is read again for every scan it scores (the same seed gives the same arrays; they are read-only)."""
    all_scores = np.asarray([v for s in per_scan for v in s], np.float64)
    if all_scores.size == 0:
        return np.zeros(1), np.full(1, -np.inf)
    lo = np.log(max(float(all_scores.min()), _FLOOR)) - 1.0
    hi = np.log(max(float(all_scores.max()), _FLOOR)) + 6.0
    grid = np.linspace(lo, hi, GRID_POINTS)
    rng = np.random.default_rng(SEED)
    arrays = [np.asarray(s, np.float64) for s in per_scan]
    rates = np.empty((BOOTSTRAP, grid.size))
    for b in range(BOOTSTRAP):
        pick = rng.integers(0, len(arrays), len(arrays))
        rates[b] = PointRate(np.concatenate([arrays[i] for i in pick]), len(arrays))(grid)
    upper = np.maximum.accumulate(np.quantile(rates, CONFIDENCE, axis=0)[::-1])[::-1]  # never rises
    with np.errstate(divide="ignore"):
        log_upper = np.log(upper)
    for array in (grid, log_upper):
        array.setflags(write=False)
    return grid, log_upper
