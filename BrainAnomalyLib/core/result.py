"""The one object every consumer (CLI, evaluator, batch script, Slicer) reads a detection from."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional

import numpy as np
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
    model: dict  # name, kind, version, path
    preprocessing: List[dict]
    timings: dict
    reconstruction: Optional[sitk.Image] = None
    grid_map: Optional[np.ndarray] = None  # cleaned map on the model grid (evaluation works there too)
    grid_mask: Optional[np.ndarray] = None
    notes: List[str] = field(default_factory=list)

    def summary(self) -> dict:
        return {"model": self.model, "modality": self.modality, "pred_score": round(self.pred_score, 5),
                "threshold": self.threshold, "min_lesion_ml": self.min_lesion_ml,
                "n_lesions": len(self.lesions),
                "anomalous_volume_ml": round(sum(les["volume_ml"] for les in self.lesions), 3),
                "lesions": self.lesions, "preprocessing": self.preprocessing, "timings": self.timings,
                "notes": self.notes}
