"""The one object every front end (CLI, worker, batch script, Slicer, evaluator) reads a detection from."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional

import SimpleITK as sitk


@dataclass
class Result:
    anomaly_map: sitk.Image  # float32 on the input grid
    pred_mask: sitk.Image  # uint8 label map on the input grid (1 = anomaly)
    brain_mask: sitk.Image  # uint8 on the input grid
    pred_score: float  # volume-level anomaly score
    lesions: List[dict]
    threshold: dict  # value, fpr it stands for (or None), where it came from
    min_lesion_ml: float
    modality: str
    model: dict  # name, kind, version, modality, description, path
    preprocessing: List[dict]
    timings: dict
    reconstruction: Optional[sitk.Image] = None
    # The model's FPR -> threshold curve for this scan (moved to it when calibration is scan-adaptive), so a viewer
    # can re-threshold by FPR without the model; None for an uncalibrated model.
    scan_curve: Optional[dict] = None
    # The model's healthy finding scores (calibration.findings), so a viewer can move the lesion-level operating
    # point without the model; None for a model without that calibration.
    finding_calibration: Optional[dict] = None
    display_range: Optional[List[float]] = None  # heatmap window [low, high]
    peak_score: float = 0.0
    device: str = "cpu"  # where the scorer actually ran (after any out-of-memory fallback)
    notes: List[str] = field(default_factory=list)

    def summary(self) -> dict:
        return {"model": self.model, "modality": self.modality, "pred_score": round(self.pred_score, 5),
                "threshold": self.threshold, "min_lesion_ml": self.min_lesion_ml,
                "n_lesions": len(self.lesions),
                "anomalous_volume_ml": round(sum(les["volume_ml"] for les in self.lesions), 3),
                "lesions": self.lesions, "scan_calibration": self.scan_curve,
                "finding_calibration": self.finding_calibration, "display_range": self.display_range,
                "peak_score": self.peak_score, "device": self.device, "preprocessing": self.preprocessing,
                "timings": self.timings, "notes": self.notes}
