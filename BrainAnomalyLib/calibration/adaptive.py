"""Scan-adaptive calibration: the cohort's thresholds carried onto one scan's own score distribution.

A scan from another scanner shifts and widens the whole score distribution of its normal tissue; a threshold from
the healthy cohort then flags far more than its nominal rate (FINDINGS: 10-30 % on BraTS). The scan's own median
and MAD of the filtered scores in the brain (robust while lesions cover well under half of it) say how its normal
tissue sits against the cohort's, and the cohort threshold is carried through that location-scale change.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Optional

import numpy as np

ADAPT_SCALE_RANGE = (0.5, 4.0)


@dataclass(frozen=True)
class AdaptiveReference:
    """The healthy cohort's typical location and spread (medians over its scans' robust statistics), stored as
    the `adaptive` entry of a model's calibration."""

    median: float
    mad: float
    n_scans: Optional[int] = None

    @classmethod
    def from_stats(cls, per_scan_stats: Iterable[dict]) -> Optional["AdaptiveReference"]:
        stats = list(per_scan_stats)
        if not stats:
            return None
        return cls(float(np.median([s["median"] for s in stats])), float(np.median([s["mad"] for s in stats])),
                   len(stats))

    @classmethod
    def from_meta(cls, meta: Optional[dict]) -> Optional["AdaptiveReference"]:
        ref = ((meta or {}).get("calibration") or {}).get("adaptive")
        if not ref:
            return None
        return cls(float(ref["median"]), float(ref["mad"]), ref.get("n_scans"))

    def to_dict(self) -> dict:
        return {"median": self.median, "mad": self.mad, "n_scans": self.n_scans}


@dataclass(frozen=True)
class ScanMove:
    """The location-scale change from the cohort's normal tissue to one scan's: x -> scan median + (x - cohort
    median) * ratio, the ratio of spreads clamped to ADAPT_SCALE_RANGE."""

    scan_median: float
    scan_mad: float
    cohort_median: float
    cohort_mad: float
    ratio: float

    @classmethod
    def between(cls, reference: Optional[AdaptiveReference], scan_stats: Optional[dict]) -> Optional["ScanMove"]:
        """None where the model has no reference or either spread is degenerate: thresholds then stay put."""
        if reference is None or not scan_stats or reference.mad <= 0 or scan_stats.get("mad", 0) <= 0:
            return None
        ratio = float(np.clip(scan_stats["mad"] / reference.mad, *ADAPT_SCALE_RANGE))
        return cls(float(scan_stats["median"]), float(scan_stats["mad"]), reference.median, reference.mad, ratio)

    def apply(self, values):
        """Cohort thresholds (a number or an array) -> this scan's."""
        return self.scan_median + (values - self.cohort_median) * self.ratio

    def to_dict(self) -> dict:
        """The record result.json keeps as the threshold's `adaptive` entry."""
        return {"scan_median": round(self.scan_median, 5), "scan_mad": round(self.scan_mad, 5),
                "cohort_median": round(self.cohort_median, 5), "cohort_mad": round(self.cohort_mad, 5),
                "scale_ratio": round(self.ratio, 4)}
