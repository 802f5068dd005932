"""Calibration: score <-> healthy false-positive rate, the scan-adaptive move and the labelled refinement.

curve     CalibrationCurve (score <-> healthy voxel FPR, for a model or one scan) and the tables a model stores
adaptive  AdaptiveReference (the healthy cohort's location and spread) and ScanMove (its move onto one scan)
findings  FindingCalibration: the lesion-level operating point (findings per healthy scan) and finding strength
threshold Threshold (value, the FPR it stands for, source, the move) and choose_threshold
cohort    HealthyPool: healthy scans' cleaned scores -> a model's `calibration` record
labelled  the labelled refinement record, kept beside the healthy calibration
"""

from .adaptive import AdaptiveReference, ScanMove
from .cohort import HealthyPool
from .findings import (BASE_FPR, DEFAULT_FALSE_FINDINGS, FALSE_FINDINGS_RANGE, FindingCalibration,
                       check_false_findings, strength)
from .curve import DEFAULT_FPR, DEFAULT_FPRS, CalibrationCurve, calibration_tables, thresholds_for_fpr
from .labelled import labelled_refinement, with_labelled
from .threshold import Threshold, choose_threshold

__all__ = ["AdaptiveReference", "BASE_FPR", "CalibrationCurve", "DEFAULT_FALSE_FINDINGS", "DEFAULT_FPR",
           "DEFAULT_FPRS", "FALSE_FINDINGS_RANGE", "FindingCalibration", "HealthyPool", "ScanMove", "Threshold",
           "calibration_tables", "check_false_findings", "choose_threshold", "labelled_refinement", "strength",
           "thresholds_for_fpr", "with_labelled"]
