"""The threshold a detection uses, and what it stands for."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Optional

from .adaptive import ScanMove
from .curve import DEFAULT_FPR, CalibrationCurve

USER_VALUE = "user value"


@dataclass(frozen=True)
class Threshold:
    """A raw score threshold: the healthy voxel FPR it stands for (None for a raw or default value), where it came
    from, and, once moved onto one scan, the cohort value it was moved from and the move."""

    value: float
    fpr: Optional[float] = None
    source: str = USER_VALUE
    cohort_value: Optional[float] = None
    adaptive: Optional[ScanMove] = None

    def to_dict(self) -> dict:
        """The `threshold` record of result.json (cohort_value and adaptive only for a moved threshold)."""
        out = {"value": self.value, "fpr": self.fpr, "source": self.source}
        if self.adaptive is not None:
            out.update(cohort_value=self.cohort_value, adaptive=self.adaptive.to_dict())
        return out

    def moved(self, move: Optional[ScanMove]) -> "Threshold":
        """This cohort threshold carried onto one scan. Raw values (no FPR) and a missing move leave it as it is."""
        if move is None or self.fpr is None:
            return self
        return replace(self, value=float(move.apply(self.value)), source=self.source + ", scan-adaptive",
                       cohort_value=self.value, adaptive=move)

    def noted(self, note: str) -> "Threshold":
        return replace(self, source=self.source + note)


def choose_threshold(meta: dict, threshold: Optional[float] = None, fpr: Optional[float] = None) -> Threshold:
    """The threshold `detect` uses: a raw value as given, else the calibrated one at `fpr` (default 1 %), else the
    model's default. ValueError for an FPR outside (0, 1) or an FPR asked of an uncalibrated model."""
    if threshold is not None:
        return Threshold(float(threshold))
    curve = CalibrationCurve.from_meta(meta)
    if curve is not None:
        want = DEFAULT_FPR if fpr is None else float(fpr)
        n_scans = (meta.get("calibration") or {}).get("n_scans")
        return Threshold(curve.threshold(want), want,
                         "healthy calibration" + (f" ({n_scans} scans)" if n_scans else ""))
    if fpr is not None:
        raise ValueError("this model has no calibration table; give --threshold instead of --fpr")
    return Threshold(float(meta.get("default_threshold", 3.0)), None, "model default (uncalibrated)")
