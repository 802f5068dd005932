"""The threshold a detection uses, and what it stands for."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Optional

from .adaptive import ScanMove
from .curve import DEFAULT_FPR, CalibrationCurve
from .findings import DEFAULT_FALSE_FINDINGS, FindingCalibration, check_false_findings

USER_VALUE = "user value"


@dataclass(frozen=True)
class Threshold:
    """A raw score threshold: the healthy voxel FPR it stands for (None for a raw or default value), where it came
    from, and, once moved onto one scan, the cohort value it was moved from and the move.

    At the lesion-level operating point (`false_findings` set) the value is the base threshold the findings are
    cut at, and a finding is reported when at most `false_findings` findings per healthy scan score as high
    (its score at least `finding_threshold`, see calibration.findings)."""

    value: float
    fpr: Optional[float] = None
    source: str = USER_VALUE
    cohort_value: Optional[float] = None
    adaptive: Optional[ScanMove] = None
    false_findings: Optional[float] = None
    finding_threshold: Optional[float] = None

    def to_dict(self) -> dict:
        """The `threshold` record of result.json (cohort_value and adaptive only for a moved threshold,
        false_findings and finding_threshold only at the lesion-level operating point)."""
        out = {"value": self.value, "fpr": self.fpr, "source": self.source}
        if self.false_findings is not None:
            out.update(false_findings=self.false_findings, finding_threshold=self.finding_threshold)
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


def choose_threshold(meta: dict, threshold: Optional[float] = None, fpr: Optional[float] = None,
                     false_findings: Optional[float] = None) -> Threshold:
    """The threshold `detect` uses: a raw value as given; else the calibrated voxel threshold at `fpr`; else the
    lesion-level operating point at `false_findings` per healthy scan (default 0.5) when the model has a finding
    calibration; else the voxel threshold at 1 %; else the model's default. ValueError for a value out of range or
    one the model's calibration cannot honour."""
    given = [name for name, v in (("--threshold", threshold), ("--fpr", fpr), ("--false-findings", false_findings))
             if v is not None]
    if len(given) > 1:
        raise ValueError(f"give only one of {', '.join(given)}")
    if threshold is not None:
        return Threshold(float(threshold))
    curve = CalibrationCurve.from_meta(meta)
    n_scans = (meta.get("calibration") or {}).get("n_scans")
    source = "healthy calibration" + (f" ({n_scans} scans)" if n_scans else "")
    findings = FindingCalibration.from_meta(meta)
    if curve is not None and fpr is None and findings is not None:
        target = DEFAULT_FALSE_FINDINGS if false_findings is None else check_false_findings(false_findings)
        return Threshold(curve.threshold(findings.base_fpr), findings.base_fpr, source + ", lesion-level",
                         false_findings=target, finding_threshold=findings.threshold(target))
    if false_findings is not None:
        raise ValueError("this model has no lesion-level calibration; give --fpr instead of --false-findings, or "
                         "re-calibrate it with 'brainanomaly calibrate'")
    if curve is not None:
        want = DEFAULT_FPR if fpr is None else float(fpr)
        return Threshold(curve.threshold(want), want, source)
    if fpr is not None:
        raise ValueError("this model has no calibration table; give --threshold instead of --fpr")
    return Threshold(float(meta.get("default_threshold", 3.0)), None, "model default (uncalibrated)")
